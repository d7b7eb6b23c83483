"""Fixtures of the components' own tests: each runs its component's Python function (`.python_func`) with
real KFP artifact objects on a temporary folder, KFP's runner out of the way. The whole pipeline under
kfp.local is tests/pipeline/test_pipeline_local.py."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from kfp import dsl

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no downloads, as in tests/


@pytest.fixture
def artifact(tmp_path) -> Callable[..., dsl.Artifact]:
    """`artifact(dsl.Model, "model", base_model=...)`: an artifact whose path is a folder under tmp_path."""

    def make(cls: type[dsl.Artifact], name: str, **metadata) -> dsl.Artifact:
        return cls(name=name, uri=str(tmp_path / name), metadata=dict(metadata))

    return make


@pytest.fixture
def no_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow and no S3 endpoint from the environment; what a component sets is undone afterwards."""
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
