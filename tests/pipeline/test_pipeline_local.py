"""The whole `lora-finetune` pipeline through kfp.local, on a tiny random BERT and generated data.

Two runs, one per branch of the gate:
- embedded defaults (local data file, sqlite MLflow store) with a champion already registered and
  min_delta=1: evaluate scores the champion too, the gate holds, the new version is only `challenger`;
- S3 (moto) data read from the newest `dt=` snapshot under a prefix, and a real MLflow server, with
  min_delta=-1: the gate passes and the new version becomes `champion`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main

TOPICS = [
    "sort a list", "read a file", "open a socket", "parse json", "hash a password",
    "format a date", "split a string", "join paths", "start a process", "unzip an archive",
]  # fmt: skip


def write_pairs(path: Path, n: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            fh.write(json.dumps({"query": f"how to {topic} case {i}", "positive": f"To {topic}, see recipe {i}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_models import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-pipeline") / "tiny-bert")


def run_pipeline(out: Path, model: Path, data: str, model_name: str, min_delta: float) -> int:
    return main([
        "run", "--local", "--output-dir", str(out), "--data", data, "--base-model", str(model),
        "--model-name", model_name, "--min-delta", str(min_delta),
        "--config-override", "max_steps=2", "batch_size=8", "lora_r=4", "lora_target_modules=[query,value]",
        "--param", "eval_fraction=0.25",
    ])  # fmt: skip


def pipeline_runs(out: Path) -> list[Path]:
    return sorted((out / "kfp").glob("lora-finetune-*"))


@pytest.mark.slow
def test_local_run_with_embedded_stores_holds_against_the_champion(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from vembed.artifacts.registry import Registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    out = tmp_path / "pipeline"
    out.mkdir()
    registry = Registry(f"sqlite:///{(out / 'mlflow.db').resolve()}")  # the run's embedded default store
    seeded = registry.register(model_name="tiny-embed", eval_metrics={"ndcg@10": 0.0}, eval_set_sha256="seed",
                               merged_dir=tiny_model)  # fmt: skip
    assert seeded.aliases == ["challenger", "champion"] and seeded.version == "1"

    assert run_pipeline(out, tiny_model, str(write_pairs(tmp_path / "raw" / "pairs.jsonl")), "tiny-embed", 1.0) == 0
    captured = capsys.readouterr()
    assert "Gate: HOLD" in captured.out
    assert "champion" in captured.out.split("Gate: HOLD")[0], "the metrics table must have a champion column"
    assert "registered tiny-embed version 2 (aliases: challenger)" in captured.out
    assert "Executing task 'train'" in captured.err  # progress on the terminal, step output in the log
    assert "Executing task" not in captured.out
    assert (out / "pipeline.log").stat().st_size > 0
    assert str(registry.alias_version("tiny-embed", "champion").version) == "1"
    assert str(registry.alias_version("tiny-embed", "challenger").version) == "2"

    (run,) = pipeline_runs(out)
    assert "| metric | tuned | base | champion |" in (run / "evaluate" / "report").read_text()
    assert (run / "train" / "model" / "adapter_model.safetensors").is_file()
    assert (run / "merge" / "merged_model" / "model.safetensors").is_file()
    assert "data:image/png;base64," in (run / "train" / "report").read_text()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl")), "weights only as safetensors"


@pytest.mark.slow
def test_local_run_against_s3_and_mlflow_server_promotes(
    tiny_model: Path, tmp_path: Path, s3_env, mlflow_server, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from tests.support import secret_scan
    from vembed.artifacts.registry import Registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    # MLflow credentials too (the test server has no auth and ignores them), so both stores' secrets
    # are in every step's environment and in use.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-pass-0c7e1d2b-do-not-log")
    secrets = [s3_env.secret_key, s3_env.access_key, "mlflow-pass-0c7e1d2b-do-not-log"]
    s3 = s3_env.client()
    artifacts_before = secret_scan.s3_keys(s3, mlflow_server.bucket)
    runs_before = secret_scan.mlflow_run_ids(mlflow_server.uri)
    s3.create_bucket(Bucket="pipeline-data")
    # An older snapshot that prepare would reject: reading it instead of the newest fails the run.
    s3.put_object(Bucket="pipeline-data", Key="pairs/dt=2024-01-01/pairs.jsonl", Body=b"not json\n")
    good = write_pairs(tmp_path / "pairs.jsonl").read_bytes()
    s3.put_object(Bucket="pipeline-data", Key="pairs/dt=2024-01-02/pairs.jsonl", Body=good)
    out = tmp_path / "pipeline"

    assert run_pipeline(out, tiny_model, "s3://pipeline-data/pairs/latest", "tiny-embed-remote", -1.0) == 0
    terminal = capsys.readouterr()
    captured = terminal.out
    assert "Gate: PROMOTE" in captured
    assert "registered tiny-embed-remote version 1 (aliases: challenger, champion)" in captured
    # No cluster here: deploy is off for local runs, which print the laptop equivalent instead.
    serve = f"serve it:  MLFLOW_TRACKING_URI={mlflow_server.uri} vembed serve models:/tiny-embed-remote@champion"
    assert serve in captured
    registry = Registry(mlflow_server.uri)
    assert str(registry.alias_version("tiny-embed-remote", "champion").version) == "1"
    assert not (out / "mlflow.db").exists(), "the MLflow server named by the environment is used"
    (run,) = pipeline_runs(out)
    assert not (run / "deploy").exists()
    executor = json.loads((run / "prepare" / "executor_output.json").read_text())
    assert "dt=2024-01-02" in executor["artifacts"]["dataset"]["artifacts"][0]["metadata"]["source"]

    # No secret anywhere the run wrote: every file (pipeline.log, the compiled spec, executor outputs,
    # training_log.txt, the run's config, reports, models), the terminal, the new S3 objects, and what
    # the MLflow server keeps about the new runs and the registered model (params, tags, inputs, versions).
    # (The train step's scratch output_dir, with its config.yaml, is removed when the step ends; the
    # same config is kept in the checkpoint as vembed_config.yaml.)
    leaks, n_files = secret_scan.scan_files(tmp_path, secrets)
    scanned = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert {"pipeline.log", "lora_finetune.local.yaml", "executor_output.json", "training_log.txt",
            "vembed_config.yaml", "adapter_config.json"} <= scanned, scanned  # fmt: skip
    assert len(list(run.glob("*/executor_output.json"))) >= 5, "every step's executor output is scanned"
    leaks += [f"terminal: {s}" for s in secret_scan.hits((terminal.out + terminal.err).encode(), secrets)]
    new_objects = secret_scan.s3_keys(s3, mlflow_server.bucket) - artifacts_before
    assert any(k.endswith("model.safetensors") for k in new_objects), "the models went through the server"
    leaks += secret_scan.scan_s3(s3, mlflow_server.bucket, new_objects, secrets)
    leaks += secret_scan.scan_s3(s3, "pipeline-data", secret_scan.s3_keys(s3, "pipeline-data"), secrets)
    new_runs = secret_scan.mlflow_run_ids(mlflow_server.uri) - runs_before
    records = secret_scan.mlflow_records(mlflow_server.uri, new_runs, ["tiny-embed-remote"])
    assert new_runs and any(r["data"]["params"] for k, r in records.items() if k.startswith("run "))
    leaks += secret_scan.scan_records(records, secrets)
    assert n_files > 20 and leaks == []


def test_local_run_needs_the_local_flag(capsys) -> None:
    assert main(["run"]) == 2
    assert "needs --local" in capsys.readouterr().err


def test_local_run_rejects_unknown_parameters(tmp_path: Path, capsys) -> None:
    data, out = write_pairs(tmp_path / "x.jsonl", n=4), tmp_path / "out"
    assert main(["run", "--local", "--output-dir", str(out), "--param", "min_delta_x=1"]) == 2
    assert "unknown pipeline parameter 'min_delta_x'" in capsys.readouterr().err
    assert not out.exists()  # refused before the output dir, the compiled YAML or the demo data are written
    assert main(["run", "--local", "--output-dir", str(out), "--data", str(data), "--param", "min_delta=x"]) == 2
    assert "--param min_delta=x: expected a number" in capsys.readouterr().err and not out.exists()


def test_step_output_goes_to_the_log_and_progress_to_the_terminal() -> None:
    import io

    from pipelines.local_run import _StepLog

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log, terminal = io.StringIO(), Terminal()
    sink = _StepLog(log, terminal)
    sink.write("22:00:01.000 - INFO - Executing task \x1b[96m'train'\x1b[0m\n    Loading weights\n")
    sink.write("    training:  50%|#####     | 1/2 [00:01<00:01]\r    training: 100%|##########| 2/2\n")
    sink.write("22:00:09.000 - INFO - Task 'train' finished with status SUCCESS\n")
    shown = terminal.getvalue()
    assert shown.startswith("Executing task 'train'\n")
    assert "\r  training: 100%" in shown and shown.endswith("\nTask 'train' finished with status SUCCESS\n")
    assert "Loading weights" not in shown and "Loading weights" in log.getvalue()
