"""The whole `lora-finetune` pipeline through kfp.local, on a tiny random BERT and generated data.

Two runs against one local MLflow store: the first passes the gate (min_delta=-1) and becomes
champion; the second cannot pass (min_delta=1), is registered as challenger only, and was scored
against the first run's champion.
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


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from vembed.tiny_models import make_tiny_bert

    root = tmp_path_factory.mktemp("tiny-pipeline")
    model = make_tiny_bert(root / "tiny-bert")
    raw = root / "raw" / "pairs.jsonl"
    raw.parent.mkdir()
    with raw.open("w") as fh:
        for i in range(48):
            topic = TOPICS[i % len(TOPICS)]
            fh.write(json.dumps({"query": f"how to {topic} case {i}", "positive": f"To {topic}, see recipe {i}."}) + "\n")
    return model, raw


def run_pipeline(out: Path, model: Path, raw: Path, min_delta: float, seed: int) -> int:
    return main([
        "run", "--local", "--output-dir", str(out), "--data", str(raw), "--base-model", str(model),
        "--model-name", "tiny-embed", "--min-delta", str(min_delta),
        "--config-override", "max_steps=2", "batch_size=8", "lora_r=4", "lora_target_modules=[query,value]",
        f"seed={seed}", "--param", "eval_fraction=0.25",
    ])  # fmt: skip


@pytest.mark.slow
def test_local_pipeline_registers_and_gates_promotion(tiny_setup, tmp_path: Path, monkeypatch, capsys) -> None:
    from vembed.registry import Registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    model, raw = tiny_setup
    out = tmp_path / "pipeline"

    assert run_pipeline(out, model, raw, min_delta=-1.0, seed=1) == 0
    first = capsys.readouterr()
    assert "Gate: PROMOTE" in first.out
    assert "registered tiny-embed version 1 (aliases: challenger, champion)" in first.out
    assert "Executing task 'train'" in first.err  # progress on the terminal, step output in the log
    assert "Executing task" not in first.out
    assert (out / "pipeline.log").stat().st_size > 0

    assert run_pipeline(out, model, raw, min_delta=1.0, seed=2) == 0
    second = capsys.readouterr().out
    assert "Gate: HOLD" in second
    assert "champion" in second.split("Gate: HOLD")[0], "the metrics table must have a champion column"
    assert "registered tiny-embed version 2 (aliases: challenger)" in second

    registry = Registry(f"sqlite:///{out / 'mlflow.db'}")
    assert registry.alias_version("tiny-embed", "champion").version == "1"
    assert registry.alias_version("tiny-embed", "challenger").version == "2"

    # Both runs wrote their artifacts under the pipeline root: adapter, merged model, reports.
    runs = sorted((out / "kfp").glob("lora-finetune-*"))
    assert len(runs) == 2
    last = runs[-1]
    assert "| metric | tuned | base | champion |" in (last / "evaluate" / "report").read_text()
    assert (last / "train" / "model" / "adapter_model.safetensors").is_file()
    assert (last / "merge" / "merged_model" / "model.safetensors").is_file()
    assert "data:image/png;base64," in (last / "train" / "report").read_text()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl")), "weights only as safetensors"


def test_local_run_needs_the_local_flag(capsys) -> None:
    assert main(["run"]) == 2
    assert "needs --local" in capsys.readouterr().err


def test_local_run_rejects_unknown_parameters(tmp_path: Path, capsys) -> None:
    assert main(["run", "--local", "--output-dir", str(tmp_path), "--data", "x.jsonl", "--param", "min_delta_x=1"]) == 2
    assert "unknown pipeline parameter 'min_delta_x'" in capsys.readouterr().err
