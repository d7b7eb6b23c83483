"""The register component; see README.md in this folder."""
