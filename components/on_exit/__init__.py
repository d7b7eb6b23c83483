"""The on-exit component (cleanup and failure record); see README.md in this folder."""
