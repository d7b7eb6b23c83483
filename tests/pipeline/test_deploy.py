"""The deploy step against a real MLflow server (artifacts in moto S3) and the loopback fake
Kubernetes API (tests/support/fake_k8s.py: no API server can run here). It plays KServe's controller:
revisions, Ready conditions and canary traffic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.artifacts.test_registry import EVAL_A, TEXTS, _make_adapter, _metrics
from tests.support.fake_k8s import fake_kube

IMAGE = "ghcr.io/vembed-factory/vembed:0.1.0-cpu"
NAME = "emb-deploy"


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from tests.support.tiny_models import make_tiny_bert
    from vembed.inference.export import merge_adapter

    root = tmp_path_factory.mktemp("deploy-models")
    base = make_tiny_bert(root / "base", hidden=32, layers=2)
    return [merge_adapter(_make_adapter(base, root / f"a{i}", seed=i), root / f"m{i}") for i in (1, 2)]


@pytest.fixture(scope="module")
def versions(mlflow_server, s3_server, merged: list[Path], tmp_path_factory) -> dict:
    """Two registered versions of NAME."""
    import os

    from vembed.artifacts.registry import Registry

    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri, **s3_server.env()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        registry = Registry(mlflow_server.uri)
        for i, m in enumerate(merged):
            registry.register(model_name=NAME, eval_metrics=_metrics(0.5 - 0.1 * i), eval_set_sha256=EVAL_A, merged_dir=m)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"registry": registry, "destination": f"s3://{mlflow_server.bucket}/artifacts"}


@pytest.fixture
def env(mlflow_server, s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("VEMBED_CACHE_DIR", str(tmp_path / "cache"))
    return mlflow_server


def _deploy(fake, versions, **kw):
    from vembed.pipeline.steps.deploy import deploy

    args = dict(namespace="ml", poll_s=0.01, timeout_s=30, client_configuration=fake.configuration(),
                mlflow_artifacts_destination=versions["destination"])  # fmt: skip
    return deploy(NAME, IMAGE, **{**args, **kw})


def _container(obj: dict) -> dict:
    return obj["spec"]["predictor"]["containers"][0]


def _storage_uri(obj: dict) -> str:
    return next(e["value"] for e in _container(obj)["env"] if e["name"] == "STORAGE_URI")


def _download(s3_server, uri: str, dest: Path) -> Path:
    """What KServe's storage initializer does with STORAGE_URI: copy the prefix to a directory."""
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    client = s3_server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            target = dest / o["Key"][len(prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, o["Key"], str(target))
    return dest


def _tags(versions, version: str) -> dict:
    return versions["registry"].client.get_model_version(NAME, version).tags


def test_create_then_canary_patch_and_the_served_model_is_the_champion(env, s3_server, versions, merged, tmp_path):
    from fastapi.testclient import TestClient

    from vembed.inference.predictor import Predictor
    from vembed.inference.serve import create_app

    registry = versions["registry"]
    registry.promote(NAME, "1")
    with fake_kube() as fake:
        out = _deploy(fake, versions)
        assert out["action"] == "created" and out["ready"] and out["version"] == "1"
        assert out["endpoint"] == "http://emb-deploy.ml.example.com/v1/embeddings"
        body = fake.created[0]
        assert body["apiVersion"] == "serving.kserve.io/v1beta1" and body["kind"] == "InferenceService"
        assert body["metadata"]["annotations"]["vembed.io/model-uri"] == f"models:/{NAME}/1"
        container = _container(body)
        assert container["image"] == IMAGE and container["args"][:3] == ["vembed", "serve", "/mnt/models"]
        assert "canaryTrafficPercent" not in body["spec"]["predictor"]
        uri = _storage_uri(body)
        assert uri.startswith("s3://mlflow-artifacts/artifacts/") and uri.endswith("/model.sentence_transformer")
        assert _tags(versions, "1")["vembed.deployed"] == "true"

        # The chosen runtime (`vembed serve` on what the storage initializer fetched) gives Predictor's embeddings.
        served = _download(s3_server, uri, tmp_path / "mnt-models")
        app = TestClient(create_app(Predictor(str(served)), "emb"))
        got = app.post("/v1/embeddings", json={"input": TEXTS, "model": "emb"}).json()
        np.testing.assert_allclose(
            [d["embedding"] for d in got["data"]], Predictor(str(merged[0])).encode_text(TEXTS), atol=1e-5
        )

        # A new champion: the predictor is patched, the new revision takes the canary share.
        registry.promote(NAME, "2")
        out2 = _deploy(fake, versions, canary_traffic_percent=25)
        assert out2["action"] == "patched" and out2["ready"] and out2["version"] == "2"
        assert out2["previous_revision"] == "emb-deploy-predictor-00001"
        assert [(t["revisionName"], t["percent"]) for t in out2["traffic"]] == [
            ("emb-deploy-predictor-00002", 25),
            ("emb-deploy-predictor-00001", 75),
        ]
        obj = fake.isvcs["emb-deploy"]["obj"]
        assert obj["metadata"]["annotations"]["vembed.io/model-uri"] == f"models:/{NAME}/2"
        assert _storage_uri(obj) != uri and "/model.sentence_transformer" in _storage_uri(obj)
        assert any(c.startswith("PATCH /apis/serving.kserve.io/v1beta1/namespaces/ml/inferenceservices/") for c in fake.calls)
        deployment = json.loads(registry.client.get_registered_model(NAME).tags["vembed.deployment"])
        assert deployment["version"] == "2" and deployment["service"] == "emb-deploy"

        # Full rollout: canary 100 drops the field; all traffic to the latest revision.
        out3 = _deploy(fake, versions, canary_traffic_percent=100)
        assert "canaryTrafficPercent" not in fake.isvcs["emb-deploy"]["obj"]["spec"]["predictor"]
        assert [t["percent"] for t in out3["traffic"]] == [100]


@pytest.mark.parametrize("outcome", ["fail", "pending", "api-server-gone"])
def test_failed_or_slow_rollout_keeps_the_previous_revision_and_tags_the_version(env, versions, outcome, monkeypatch):
    from vembed.pipeline.launchers.inference_service import InferenceServices
    from vembed.pipeline.steps.deploy import DeployError

    registry = versions["registry"]
    registry.promote(NAME, "1")
    with fake_kube() as fake:
        _deploy(fake, versions)
        good_spec = json.loads(json.dumps(fake.isvcs["emb-deploy"]["obj"]["spec"]))
        registry.promote(NAME, "2")
        if outcome == "api-server-gone":
            apply = InferenceServices.apply

            def apply_then_lose_the_api_server(self, *args, **kwargs):
                out = apply(self, *args, **kwargs)
                fake.isvc_get_errors = 5  # every poll of the wait answers 503; the server is back for the restore
                return out

            monkeypatch.setattr(InferenceServices, "apply", apply_then_lose_the_api_server)
        else:
            fake.isvc_outcomes = [outcome]
        with pytest.raises(DeployError) as err:
            _deploy(fake, versions, timeout_s=0.5, poll_s=0.05)
        msg = str(err.value)
        expected = {"fail": "RevisionFailed", "pending": "not Ready after 0.5s", "api-server-gone": "HTTP 503"}[outcome]
        assert expected in msg and "previous revision emb-deploy-predictor-00001 keeps serving" in msg, msg
        assert "\n" not in msg
        obj = fake.isvcs["emb-deploy"]["obj"]
        assert obj["spec"] == good_spec  # the previous predictor spec is back
        assert obj["metadata"]["annotations"]["vembed.io/model-uri"] == f"models:/{NAME}/1"
        assert any(c.startswith("PUT ") for c in fake.calls)
        tags = _tags(versions, "2")
        assert tags["vembed.deployed"] == "false" and expected in tags["vembed.deploy_error"]


def test_bad_parameters_and_foreign_services_are_refused(env, versions):
    from vembed.pipeline.steps.deploy import DeployError, service_name_for

    assert service_name_for("Docs_Search v2") == "docs-search-v2" and service_name_for("7x") == "m-7x"
    with fake_kube() as fake:
        with pytest.raises(DeployError, match="canary_traffic_percent"):
            _deploy(fake, versions, canary_traffic_percent=0)
        with pytest.raises(DeployError, match="mlflow_artifacts_destination"):
            _deploy(fake, versions, mlflow_artifacts_destination="")
        fake.isvcs["emb-deploy"] = {"obj": {"metadata": {"name": "emb-deploy", "namespace": "ml", "generation": 1}, "spec": {"predictor": {}}}, "revisions": [{"name": "x", "outcome": "ready", "gets": 5}]}  # fmt: skip
        with pytest.raises(DeployError, match="not managed by vembed"):
            _deploy(fake, versions)
        assert not any(c.startswith(("PATCH", "PUT", "POST")) for c in fake.calls)


def test_deploy_without_a_registry_store_creates_none(tmp_path, monkeypatch, capsys):
    from vembed.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out_dir = tmp_path / "out"
    assert main(["deploy", NAME, "--image", IMAGE, "--output-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "no MLflow store there" in err and str(out_dir) in err
    assert not out_dir.exists()


def test_deployer_role_allows_exactly_the_calls_the_step_makes(env, versions):
    import yaml

    from vembed.pipeline.steps.deploy import DeployError

    verbs = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update"}
    registry = versions["registry"]
    used: set[tuple[str, str, str]] = set()
    with fake_kube() as fake:
        registry.promote(NAME, "1")
        _deploy(fake, versions)  # create
        registry.promote(NAME, "2")
        fake.isvc_outcomes = ["fail"]
        with pytest.raises(DeployError):
            _deploy(fake, versions, timeout_s=0.5, poll_s=0.05)  # patch, then restore (update)
        for call in fake.calls:
            method, path = call.split(" ", 1)
            group = path.split("/")[2]
            used.add((group, path.split("/")[6], verbs[method]))
    root = Path(__file__).resolve().parents[2]
    role = next(d for d in yaml.safe_load_all((root / "pipelines/rbac/deployer.yaml").read_text()) if d["kind"] == "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert used == granted


def test_registry_rollback_points_the_service_back_or_prints_the_command(env, versions, tmp_path, monkeypatch, capsys):
    from vembed.registry_cli import main as registry_main

    registry = versions["registry"]
    with fake_kube() as fake:
        registry.promote(NAME, "1")
        _deploy(fake, versions)
        registry.promote(NAME, "2")
        _deploy(fake, versions)
        monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        capsys.readouterr()
        assert registry_main(["rollback", NAME]) == 0
        out = capsys.readouterr().out
        assert "champion is now v1" in out and "InferenceService ml/emb-deploy serves v1" in out
        obj = fake.isvcs["emb-deploy"]["obj"]
        assert obj["metadata"]["annotations"]["vembed.io/model-uri"] == f"models:/{NAME}/1"
        dead_port = fake.url
    # The cluster is gone: the alias still moves, and the exact command to finish the job is printed.
    registry.promote(NAME, "2")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))  # points at the stopped server
    assert dead_port in (tmp_path / "kubeconfig").read_text()
    assert registry_main(["rollback", NAME, "--timeout", "5"]) == 2
    captured = capsys.readouterr()
    assert "champion is now v1" in captured.out
    expected = (
        f"to point it at the champion, run: vembed deploy {NAME} --alias champion --service emb-deploy "
        f"--namespace ml --image {IMAGE} --mlflow-artifacts-destination {versions['destination']}"
    )
    assert expected in captured.err and "not updated" in captured.err
    assert str(registry.alias_version(NAME, "champion").version) == "1"


def test_encode_from_the_registry_prints_a_quiet_summary(env, versions, capfd):
    from vembed.cli import main

    versions["registry"].promote(NAME, "1")
    capfd.readouterr()
    assert main(["encode", f"models:/{NAME}@champion", "--text", "sort a list", "parse JSON"]) == 0
    out, err = capfd.readouterr()
    lines = out.strip().splitlines()
    assert lines[0] == "2 embeddings of dim 32 (float32)" and len(lines) == 4
    assert lines[1].lstrip().startswith("sort a list") and "norm 1.0000" in lines[1] and lines[1].endswith(", ...]")
    assert "Downloading artifacts" not in err and "Loading weights" not in err and "WARNING" not in err, err
