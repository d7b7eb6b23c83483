"""MLflow registry against real servers: an `mlflow server` subprocess (sqlite backend) whose artifacts
are proxied to moto's S3 server, plus the embedded sqlite default. Models are tiny random BERTs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vembed.errors import ConfigError, RegistryError

EVAL_A = "a" * 64
EVAL_B = "b" * 64
TEXTS = ["how do I open a file", "parse a JSON string", "sort a list in place"]


@dataclass
class TinyModels:
    base: Path
    adapter1: Path
    merged1: Path
    adapter2: Path
    merged2: Path
    adapter3: Path


def _make_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.manual_seed(seed)
    # Random (non-zero) LoRA weights, so every adapter embeds differently from the base and the others.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    get_peft_model(BertModel.from_pretrained(base), lora).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    from safetensors.numpy import save_file

    from tests.support.tiny_models import make_tiny_bert
    from vembed.inference.export import merge_adapter

    root = tmp_path_factory.mktemp("tiny-models")
    base = make_tiny_bert(root / "base", hidden=32, layers=2)
    adapters = [_make_adapter(base, root / f"adapter{i}", seed=i) for i in (1, 2, 3)]
    # Resume state in a checkpoint must not be registered.
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(adapters[0] / "optimizer.safetensors"))
    merged = [merge_adapter(a, root / f"merged{i}") for i, a in ((1, adapters[0]), (2, adapters[1]))]
    return TinyModels(base, adapters[0], merged[0], adapters[1], merged[1], adapters[2])


def _metrics(score: float, champion: float | None = None, passed: bool = True) -> dict:
    """Shaped like the evaluate step's output (results per model and MRL dim, plus its decision)."""
    results = {
        "tuned": {"full": {"ndcg@10": score, "recall@1": score / 2}, "16": {"ndcg@10": score - 0.05}, "8": {"ndcg@10": score - 0.1}},
        "base": {"full": {"ndcg@10": 0.1, "recall@1": 0.05}, "16": {"ndcg@10": 0.08}},
    }
    if champion is not None:
        results["champion"] = {"full": {"ndcg@10": champion}}
    return {"results": results, "decision": {"passed": passed}}


def _history() -> list[dict]:
    return [
        {"step": s, "epoch": s / 4, "loss": 2.0 / s, "lr": 1e-4, "samples_per_s": 10.0} for s in (1, 2, 3, 4)
    ]


@pytest.fixture
def server_env(mlflow_server, s3_env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Client side of a pipeline step: tracking URI and (unused by the client, but present) S3 creds."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("VEMBED_CACHE_DIR", str(tmp_path / "cache"))
    return mlflow_server


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(uri: str, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in _client(uri).get_registered_model(name).aliases.items()}


def _version_count(uri: str, name: str) -> int:
    return len(_client(uri).search_model_versions(f"name = '{name}'"))


def test_round_trip_register_promote_and_load_champion(
    server_env, s3_server, models: TinyModels, tmp_path: Path
):
    import mlflow

    from vembed.artifacts.mlflow_store import download_model
    from vembed.config import load_config
    from vembed.inference.predictor import Predictor
    from vembed.pipeline.steps.register import register

    name = "emb-roundtrip"
    config = load_config(overrides={"model_name": str(models.base), "lora_r": "4"}).model_dump()
    info = {
        "config": config,
        "history": _history(),
        "base_model": str(models.base),
        "dataset_sha256": "d" * 64,
        "git_commit": "0123abcd",
        "pipeline_run_id": "kfp-run-42",
    }
    out = register(
        models.adapter1,
        models.merged1,
        _metrics(0.5),
        name,
        EVAL_A,
        output_dir=tmp_path,
        training_run_info=info,
    )
    assert out["promoted"] and out["created"] and out["version"] == "1"
    assert out["aliases"] == ["challenger", "champion"]

    client = _client(server_env.uri)
    run = client.get_run(out["run_id"])
    assert run.data.params["lora_r"] == "4" and run.data.params["model_name"] == str(models.base)
    assert run.data.metrics["eval/tuned/ndcg_at_10"] == pytest.approx(0.5)
    assert run.data.metrics["eval/base/dim16/ndcg_at_10"] == pytest.approx(0.08)  # the KFP metric names, MLflow-safe
    assert [m.step for m in client.get_metric_history(out["run_id"], "train/loss")] == [1, 2, 3, 4]
    tags = run.data.tags
    assert tags["vembed.dataset_sha256"] == "d" * 64 and tags["vembed.git_commit"] == "0123abcd"
    assert tags["vembed.pipeline_run_id"] == "kfp-run-42" and tags["vembed.base_model"] == str(models.base)
    # The score by MRL dim is a series whose step is the dim (MLflow charts it); the full dim is eval/tuned/...
    by_dim = client.get_metric_history(out["run_id"], "eval/tuned/ndcg_at_10_by_dim")
    assert sorted((m.step, m.value) for m in by_dim) == [(8, pytest.approx(0.4)), (16, pytest.approx(0.45))]
    assert [m.value for m in client.get_metric_history(out["run_id"], "eval/base/ndcg_at_10_by_dim")] == [0.08]

    # The artifacts went through the server's proxy into S3; resume state stayed behind.
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=server_env.bucket)["Contents"]]
    assert any(k.endswith("adapter/adapter_model.safetensors") for k in keys)
    assert any(k.endswith("artifacts/model.sentence_transformer/model.safetensors") for k in keys)
    assert not any(k.endswith(("optimizer.safetensors", ".pkl")) for k in keys)  # no resume state, no pickle

    expected = Predictor(str(models.merged1)).encode_text(TEXTS)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    np.testing.assert_allclose(pyfunc.predict(TEXTS), expected, atol=1e-6)
    import pandas as pd

    np.testing.assert_allclose(pyfunc.predict(pd.DataFrame({"text": TEXTS})), expected, atol=1e-6)
    # MRL truncation through the standard flavor's params: truncate first, then normalise.
    truncated = Predictor(str(models.merged1)).encode_text(TEXTS, dim=16)
    np.testing.assert_allclose(pyfunc.predict(TEXTS, params={"truncate_dim": 16}), truncated, atol=1e-6)
    signature = pyfunc.metadata.signature
    assert signature is not None and tuple(signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (
        -1,
        expected.shape[1],
    )
    _check_standard_model(name, server_env.uri, tmp_path, expected)

    # Predictor (through download_model) reads the same version; adapter and base embed differently.
    local = download_model(f"models:/{name}@champion")
    assert (local / "embedder.json").is_file()
    np.testing.assert_allclose(Predictor(f"models:/{name}@champion").encode_text(TEXTS), expected, atol=1e-6)
    assert not np.allclose(Predictor(str(models.merged2)).encode_text(TEXTS), expected, atol=1e-3)


def _check_standard_model(name: str, uri: str, tmp_path: Path, expected: np.ndarray) -> None:
    """The champion is MLflow's native sentence_transformers flavor: it loads without vembed's code,
    its requirements are public packages, and the adapter travels in the same version."""
    import mlflow
    import mlflow.sentence_transformers
    import yaml

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=_client(uri).get_model_version_download_uri(name, "1"),
            dst_path=str(tmp_path / "champion-dir"),
            tracking_uri=uri,
        )
    )
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"python_function", "sentence_transformers"}
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.sentence_transformers"
    assert (
        "code" not in mlmodel["flavors"]["python_function"]
        or not mlmodel["flavors"]["python_function"]["code"]
    )
    params = {p["name"]: p for p in json.loads(mlmodel["signature"]["params"])}
    assert set(params) >= {"prompt_name", "truncate_dim", "normalize_embeddings"}
    reqs = [line.split("==")[0] for line in (local / "requirements.txt").read_text().split()]
    assert set(reqs) == {"mlflow", "torch", "transformers", "sentence-transformers"}, reqs
    assert not any("vembed" in r for r in reqs)
    assert (local / "adapter" / "adapter_model.safetensors").is_file()
    st = mlflow.sentence_transformers.load_model(f"models:/{name}@champion")
    np.testing.assert_allclose(st.encode(TEXTS, normalize_embeddings=True), expected, atol=1e-5)


def test_gate_refuses_worse_model_and_retry_is_idempotent(server_env, models: TinyModels, tmp_path: Path):
    from vembed.pipeline.steps.register import register

    name = "emb-gate"
    first = register(models.adapter1, models.merged1, _metrics(0.6), name, EVAL_A, output_dir=tmp_path)
    assert first["promoted"] and first["version"] == "1"

    worse = register(models.adapter2, models.merged2, _metrics(0.4), name, EVAL_A, output_dir=tmp_path)
    assert not worse["promoted"] and worse["version"] == "2"
    assert worse["aliases"] == ["challenger"] and "champion stays v1" in worse["reason"]
    assert _aliases(server_env.uri, name) == {"champion": "1", "challenger": "2"}

    retry = register(models.adapter2, models.merged2, _metrics(0.4), name, EVAL_A, output_dir=tmp_path)
    assert retry["version"] == "2" and not retry["created"] and not retry["promoted"]
    assert _version_count(server_env.uri, name) == 2

    # A better score on another eval set is not compared blindly with the champion's stored score...
    other_set = register(models.adapter3, None, _metrics(0.9), name, EVAL_B, output_dir=tmp_path)
    assert not other_set["promoted"] and "same eval set" in other_set["reason"]
    assert _aliases(server_env.uri, name)["champion"] == "1"
    # ...but is, once the champion's score on that set is given (the evaluate step measures it).
    measured = register(models.adapter3, None, _metrics(0.9, champion=0.7), name, EVAL_B, output_dir=tmp_path)
    assert measured["promoted"] and measured["version"] == "3" and not measured["created"]
    assert _aliases(server_env.uri, name) == {"champion": "3", "challenger": "3"}
    assert _version_count(server_env.uri, name) == 3


def test_server_restart_between_register_and_alias(server_env, models: TinyModels, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from vembed.pipeline.steps.register import register

    name = "emb-restart"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while the server is down
    real_create = MlflowClient.create_model_version

    def create_then_server_dies(self, *args, **kwargs):
        version = real_create(self, *args, **kwargs)
        server_env.stop()
        return version

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_server_dies)
    try:
        with pytest.raises(RegistryError) as err:
            register(models.adapter1, models.merged1, _metrics(0.5), name, EVAL_A, output_dir=tmp_path)
        assert "\n" not in str(err.value) and server_env.uri in str(err.value)
    finally:
        monkeypatch.setattr(MlflowClient, "create_model_version", real_create)
        server_env.start()  # same port, sqlite file and S3 prefix

    assert _version_count(server_env.uri, name) == 1 and _aliases(server_env.uri, name) == {}
    retry = register(models.adapter1, models.merged1, _metrics(0.5), name, EVAL_A, output_dir=tmp_path)
    assert retry["version"] == "1" and not retry["created"] and retry["promoted"]
    assert _version_count(server_env.uri, name) == 1
    assert _aliases(server_env.uri, name) == {"champion": "1", "challenger": "1"}


def _store_contents(uri: str) -> tuple[list[str], list[str], list[str]]:
    """Experiments, runs and registered models in a tracking store."""
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [r.info.run_id for r in client.search_runs(experiments)] if experiments else []
    return experiments, runs, [m.name for m in client.search_registered_models()]


def test_bad_input_fails_before_anything_reaches_mlflow(server_env, models: TinyModels, tmp_path, monkeypatch):
    import shutil

    from vembed.pipeline.steps.register import register

    (tmp_path / "empty").mkdir()
    damaged = Path(shutil.copytree(models.adapter1, tmp_path / "damaged"))
    (damaged / "vembed_config.yaml").write_text("model_name: [unclosed\n")
    bad = [
        ((tmp_path / "missing", models.merged1, _metrics(0.5)), "adapter directory not found"),
        ((models.adapter1, tmp_path / "empty", _metrics(0.5)), "not a merged model directory"),
        ((models.adapter1, models.merged1, {"recall@1": 0.5}), "no numeric 'ndcg@10'"),
        ((damaged, None, _metrics(0.5)), "vembed_config.yaml:2: invalid YAML"),
    ]
    before = _store_contents(server_env.uri)
    for args, message in bad:
        with pytest.raises((RegistryError, ConfigError), match=message):
            register(*args, "emb-bad-input", EVAL_A, output_dir=tmp_path / "out")
    with pytest.raises(RegistryError, match="give an adapter directory, a merged model directory, or both"):
        register(None, None, _metrics(0.5), "emb-bad-input", EVAL_A, training_run_info={"run_key": "no-dirs"})
    assert _store_contents(server_env.uri) == before
    # Without MLFLOW_TRACKING_URI: no embedded store is created either.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RegistryError, match="adapter directory not found"):
        register(tmp_path / "missing", None, _metrics(0.5), "emb-bad-input", EVAL_A, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_secrets_never_reach_mlflow_or_logs(
    server_env, s3_env, s3_server, models, tmp_path, caplog, capfd, monkeypatch
):
    from tests.support import secret_scan
    from vembed.config import load_config
    from vembed.pipeline.steps.register import register

    secret = s3_env.secret_key
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "tracking-pass-1234")
    s3 = s3_server.client()
    artifacts_before = secret_scan.s3_keys(s3, server_env.bucket)
    caplog.set_level(logging.DEBUG)
    config = {
        **load_config(overrides={"model_name": str(models.base)}).model_dump(),
        "hub_token": "hf_notarealtoken",
        "notes": f"copied from env: {secret}",
        "mirror": "https://alice:hunter2hunter2@hub.example/models",
        "login": "tracking-pass-1234",
    }
    info = {
        "config": config,
        "history": _history(),
        "pipeline_run_id": f"run-{secret}",
        "run_key": "secrets-run",
    }
    out = register(
        models.adapter2,
        None,
        _metrics(0.5),
        "emb-secrets",
        EVAL_A,
        output_dir=tmp_path,
        training_run_info=info,
    )

    client = _client(server_env.uri)
    run = client.get_run(out["run_id"])
    version = client.get_model_version("emb-secrets", out["version"])
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    stored = json.dumps(
        [
            run.data.params,
            run.data.tags,
            version.tags,
            logged.tags,
            client.get_registered_model("emb-secrets").tags,
        ]
    )
    assert run.data.params["hub_token"] == "[REDACTED]" and "[REDACTED]" in run.data.params["notes"]
    captured = capfd.readouterr()
    needles = (secret, "hf_notarealtoken", "hunter2hunter2", "tracking-pass-1234")
    for needle in needles:
        assert needle not in stored
        assert needle not in caplog.text
        assert needle not in captured.out + captured.err
        assert needle not in json.dumps(out, default=str)  # anywhere inside the step's output, not whole values
    assert s3_env.access_key not in stored
    # Server side, a leaked value would sit in the backend store (sqlite) or the artifact store (S3);
    # its access log holds only request lines, never the bodies that carry params and tags.
    leaks, n_files = secret_scan.scan_files(server_env.workdir, [*needles, s3_env.access_key])
    new_objects = secret_scan.s3_keys(s3, server_env.bucket) - artifacts_before
    assert any(k.endswith("adapter_model.safetensors") for k in new_objects)
    leaks += secret_scan.scan_s3(s3, server_env.bucket, new_objects, [*needles, s3_env.access_key])
    assert (server_env.workdir / "mlflow.db").is_file() and leaks == []


def test_embedded_sqlite_default_and_cli(models: TinyModels, tmp_path, monkeypatch, capsys):
    from vembed.artifacts.mlflow_store import download_model
    from vembed.cli import main as vembed_main
    from vembed.inference.predictor import Predictor
    from vembed.pipeline.steps.register import register

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("VEMBED_CACHE_DIR", str(tmp_path / "cache"))
    out_dir = tmp_path / "out"
    name = "emb-local"
    first = register(models.adapter1, models.merged1, _metrics(0.5), name, EVAL_A, output_dir=out_dir)
    assert first["tracking_uri"] == f"sqlite:///{out_dir.resolve() / 'mlflow.db'}" and first["promoted"]
    assert (out_dir / "mlflow.db").is_file()
    assert list((out_dir / "mlartifacts").rglob("adapter_model.safetensors"))
    second = register(models.adapter2, models.merged2, _metrics(0.7), name, EVAL_A, output_dir=out_dir)
    assert second["promoted"] and second["version"] == "2"
    failed_eval = register(
        models.adapter3, None, _metrics(0.9, passed=False), name, EVAL_A, output_dir=out_dir
    )
    assert not failed_eval["promoted"] and "evaluation gate" in failed_eval["reason"]

    local = download_model(f"models:/{name}@champion", tracking_uri=first["tracking_uri"])
    np.testing.assert_allclose(
        Predictor(str(local)).encode_text(TEXTS), Predictor(str(models.merged2)).encode_text(TEXTS), atol=1e-6
    )

    capsys.readouterr()
    assert vembed_main(["registry", "show", name, "--output-dir", str(out_dir)]) == 0
    shown = capsys.readouterr().out
    assert "champion history: v1 -> v2" in shown and "challenger" in shown
    assert vembed_main(["registry", "rollback", name, "--output-dir", str(out_dir)]) == 0
    assert "champion is now v1" in capsys.readouterr().out
    assert _aliases(first["tracking_uri"], name)["champion"] == "1"
    assert vembed_main(["registry", "promote", name, "3", "--output-dir", str(out_dir)]) == 0
    assert _aliases(first["tracking_uri"], name)["champion"] == "3"
    assert vembed_main(["registry", "rollback", name, "--output-dir", str(out_dir)]) == 0
    assert _aliases(first["tracking_uri"], name)["champion"] == "1"

    # Nothing to roll back to, unknown model, unknown version: one line each, exit code 2.
    for argv in (["rollback", name], ["show", "no-such-model"], ["promote", name, "99"]):
        capsys.readouterr()
        assert vembed_main(["registry", *argv, "--output-dir", str(out_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and argv[1] in err


def test_crash_before_champion_alias_is_finished_by_retry(models: TinyModels, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from vembed.artifacts.registry import Registry
    from vembed.pipeline.steps.register import register

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out_dir, name = tmp_path / "out", "emb-crash"
    first = register(models.adapter1, None, _metrics(0.5), name, EVAL_A, output_dir=out_dir)
    registry = Registry(first["tracking_uri"])

    real_set_alias = MlflowClient.set_registered_model_alias

    def crash_on_champion(self, model, alias, version):
        if alias == "champion":
            raise MlflowException("simulated crash before the champion alias moved")
        return real_set_alias(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", crash_on_champion)
    with pytest.raises(RegistryError, match="simulated crash"):
        register(models.adapter2, None, _metrics(0.7), name, EVAL_A, output_dir=out_dir)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real_set_alias)

    # The stored history already names v2, but champion never moved: the history reads as trimmed.
    assert _aliases(first["tracking_uri"], name) == {"champion": "1", "challenger": "2"}
    assert registry.champion_history(name) == ["1"]
    retry = register(models.adapter2, None, _metrics(0.7), name, EVAL_A, output_dir=out_dir)
    assert retry["promoted"] and retry["version"] == "2" and not retry["created"]
    assert registry.champion_history(name) == ["1", "2"] and _version_count(first["tracking_uri"], name) == 2
    assert registry.rollback(name).version == "1"
    assert _aliases(first["tracking_uri"], name)["champion"] == "1"


def test_redaction_keys_and_metric_lookup(monkeypatch):
    from vembed.artifacts.registry import pick_metric, safe_key
    from vembed.redaction import REDACTED, scrub

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    scrubbed = scrub(
        {
            "hub_token": "hf_x",
            "db_password": "pw",
            "tokenizer_name": "bert",
            "author": "me",
            "notes": "a s3cr3t-value b",
            "mirror": "https://u:pw123@host/x",
            "learning_rate": 0.1,
            "mrl_dims": [8, 4],
        }
    )
    assert scrubbed == {
        "hub_token": REDACTED,
        "db_password": REDACTED,
        "tokenizer_name": "bert",
        "author": "me",
        "notes": f"a {REDACTED} b",
        "mirror": f"https://u:{REDACTED}@host/x",
        "learning_rate": "0.1",
        "mrl_dims": "[8, 4]",
    }
    assert pick_metric({"ndcg@10": 0.3}, "ndcg@10") == 0.3
    assert pick_metric(_metrics(0.4), "ndcg@10") == 0.4
    assert pick_metric({"tuned/ndcg@10": 0.2, "base/ndcg@10": 0.1}, "ndcg@10") == 0.2
    with pytest.raises(RegistryError, match="mrr@10"):
        pick_metric(_metrics(0.4), "mrr@10")
    assert safe_key("abc123") == "abc123"
    assert len(safe_key("it's; a key")) == 64


def test_vision_model_is_a_pyfunc_whose_code_travels_with_it(tmp_path, monkeypatch):
    """CLIP (as Qwen3-VL) keeps the pyfunc route: the vembed code is bundled (code_paths) and the
    requirements are public packages; a fresh interpreter loads it from the bundled code."""
    import subprocess
    import sys

    import yaml

    from tests.support.tiny_models import make_tiny_clip
    from vembed.artifacts.mlflow_store import resolve_tracking_uri
    from vembed.artifacts.registry import Registry
    from vembed.inference.predictor import Predictor

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    clip = make_tiny_clip(tmp_path / "clip")
    registry = Registry(resolve_tracking_uri(tmp_path / "out"))
    out = registry.register(
        model_name="clip-emb", eval_metrics=_metrics(0.5), eval_set_sha256=EVAL_A, merged_dir=clip
    )
    assert out.promoted
    model_dir = Path(
        registry.client.get_model_version_download_uri("clip-emb", out.version).removeprefix("file://")
    )
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"python_function"}
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    assert (model_dir / "code" / "vembed" / "artifacts" / "mlflow_model.py").is_file()
    reqs = (model_dir / "requirements.txt").read_text().split()
    assert not any("vembed" in r for r in reqs) and any(r.startswith("torch==") for r in reqs)

    script = (
        "import sys, json, mlflow.pyfunc\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import vembed.artifacts.mlflow_model as mm\n"
        "print(json.dumps({'file': mm.__file__, 'emb': m.predict(sys.argv[2:]).tolist()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = ""
    done = subprocess.run(
        [sys.executable, "-c", script, str(model_dir), *TEXTS],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(model_dir)
    np.testing.assert_allclose(np.array(got["emb"]), Predictor(str(clip)).encode_text(TEXTS), atol=1e-5)


def test_query_instruction_travels_as_a_sentence_transformers_prompt(models: TinyModels, tmp_path, monkeypatch):
    """A model with a query instruction: the standard flavor's `prompt_name="query"` (with or without
    `truncate_dim`) gives Predictor's `is_query=True` embeddings, without vembed at load time."""
    import mlflow
    from sentence_transformers import SentenceTransformer

    from vembed.artifacts.mlflow_store import resolve_tracking_uri
    from vembed.artifacts.registry import Registry
    from vembed.inference.predictor import Predictor

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = tmp_path / "with-prompt"
    st = SentenceTransformer(str(models.merged1), device="cpu")
    st.prompts = {"query": "query: "}
    st.save(str(src))
    spec = json.loads((models.merged1 / "embedder.json").read_text()) | {"query_instruction": "query: "}
    (src / "embedder.json").write_text(json.dumps(spec))
    pred = Predictor(str(src))
    queries = pred.encode_text(TEXTS, is_query=True)
    assert not np.allclose(queries, pred.encode_text(TEXTS), atol=1e-3)

    registry = Registry(resolve_tracking_uri(tmp_path / "out"))
    out = registry.register(model_name="emb-prompt", eval_metrics=_metrics(0.5), eval_set_sha256=EVAL_A, merged_dir=src)
    uri = registry.client.get_model_version_download_uri("emb-prompt", out.version)
    pyfunc = mlflow.pyfunc.load_model(uri)
    np.testing.assert_allclose(pyfunc.predict(TEXTS, params={"prompt_name": "query"}), queries, atol=1e-5)
    np.testing.assert_allclose(
        pyfunc.predict(TEXTS, params={"prompt_name": "query", "truncate_dim": 8}),
        pred.encode_text(TEXTS, is_query=True, dim=8),
        atol=1e-5,
    )
