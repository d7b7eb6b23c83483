"""Reading registered models back (vembed.artifacts.mlflow_store) from a real embedded MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from vembed.errors import RegistryError


def test_a_failed_download_says_why_in_one_line(tmp_path: Path, monkeypatch):
    from mlflow import MlflowClient

    from vembed.artifacts.mlflow_store import download_model

    monkeypatch.setenv("VEMBED_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model("emb")
    (tmp_path / "model").mkdir()
    client.create_model_version("emb", source=(tmp_path / "model").as_uri())
    (tmp_path / "model").rmdir()  # the version's files are gone (a cleaned-up artifact store)
    with pytest.raises(RegistryError) as err:
        download_model("models:/emb/1", uri)
    message = str(err.value)
    # MLflow puts the reason below a first line that ends in ':'; it must not be cut off.
    assert message.startswith("models:/emb/1: download from ") and "\n" not in message
    assert not message.endswith(":") and "No such" in message
    assert not err.value.transient  # a missing file stays missing: a step must not retry it for minutes
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []  # no partial download left


@pytest.mark.parametrize(
    "error, transient",
    [(ConnectionError("connection reset"), True), (FileNotFoundError(2, "No such file"), False),
     (PermissionError(13, "Permission denied"), False)],
)  # fmt: skip
def test_only_network_errors_are_retried(error, transient):
    from vembed.artifacts.mlflow_store import registry_errors

    with pytest.raises(RegistryError) as err, registry_errors("http://mlflow:5000: log_artifacts"):
        raise error
    assert err.value.transient is transient
