"""The deploy component; see README.md in this folder."""
