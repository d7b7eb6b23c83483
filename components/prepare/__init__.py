"""The prepare component; see README.md in this folder."""
