"""Where results live: object storage with manifests, integrity checks, the MLflow registry
adapter and the promotion rule. Imports no torch at module level."""
