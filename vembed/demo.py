"""`vembed demo`: fine-tune all-MiniLM-L6-v2 on the built-in docstring set, offline, and
print base vs fine-tuned retrieval metrics on held-out pairs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from vembed.config import load_config
from vembed.data.demo_data import build_demo_dataset
from vembed.errors import StorageError
from vembed.inference.evaluation import compare_models, format_table
from vembed.training import train
from vembed.training.checkpoint import list_checkpoints

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "minilm_demo.yaml"
# Written into --output-dir before anything else: its files are then a demo's own, which a rerun replaces.
MARKER = "vembed_demo.json"
WRITES = ("data/train.jsonl", "data/eval.jsonl", "data/corpus.jsonl", "metrics.json")  # the training run guards minilm/


def claim_output_dir(out: Path) -> None:
    """Refuse an output dir holding a file the demo would overwrite that an earlier demo did not write;
    else mark it as the demo's."""
    if not (out / MARKER).is_file():
        if taken := [out / rel for rel in WRITES if (out / rel).exists()]:
            raise StorageError(f"{taken[0]}: exists and was not written by vembed demo; choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"written_by": "vembed demo"}) + "\n")


def fresh_run_dir(run: Path) -> Path:
    """`run`, else `run-2`, `run-3`, ...: a demo run with other settings never meets an earlier run's checkpoints."""
    candidates = (run.with_name(f"{run.name}-{n}") if n > 1 else run for n in itertools.count(1))
    return next(c for c in candidates if not list_checkpoints(c))


def run_demo(output_dir: str | Path = "output/demo", minutes: float = 3.0) -> int:
    out = Path(output_dir)
    claim_output_dir(out)
    data = build_demo_dataset(out / "data")
    print(f"demo data: {data['n_train']} train / {data['n_eval']} held-out pairs from Python's docstrings")
    overrides = {
        "data_path": data["train"],
        "eval_data_path": data["eval"],
        "corpus_path": data["corpus"],
        "output_dir": str(fresh_run_dir(out / "minilm")),
        # ~1.5 s per step of 32 pairs on 2 CPU cores; bound the run by the time budget.
        "max_steps": max(10, int(minutes * 60 / 1.5)),
    }
    cfg = load_config(EXAMPLE if EXAMPLE.is_file() else None, overrides)
    result = train(cfg)
    results = compare_models(
        {"base": cfg.model_name, "tuned": str(result.checkpoint_dir)}, data["eval"], data["corpus"]
    )
    print(format_table(results))
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    print(f"adapter: {result.checkpoint_dir}\nmetrics: {out / 'metrics.json'}")
    return 0
