"""The train component; see README.md in this folder."""
