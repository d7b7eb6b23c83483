"""The merge component; see README.md in this folder."""
