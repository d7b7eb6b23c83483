"""The evaluate component; see README.md in this folder."""
