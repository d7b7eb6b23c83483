"""One plain function per pipeline step (prepare, train, evaluate, merge, register).

KFP components in `components/` are thin shells over these; nothing here imports kfp.
"""

from __future__ import annotations

import os

from vembed.errors import ConfigError


def use_endpoints(mlflow_tracking_uri: str = "", s3_endpoint_url: str = "", mlflow_needed_to: str = "") -> None:
    """A step's endpoint parameters win over the pod's environment (empty keeps it). `mlflow_needed_to`
    ("register in", ...): without any MLflow the step would write to a throwaway store in its pod: refuse."""
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    if mlflow_needed_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(f"no MLflow to {mlflow_needed_to}: set the mlflow_tracking_uri parameter")
