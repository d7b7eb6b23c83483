"""LoRA recipe sweep: one factor at a time from a baseline, on the demo data and the man-page set.

    nice -n 15 .venv/bin/python -m bench.recipe_sweep [--dataset demo|manpages] [--only NAME,...]

all-MiniLM-L6-v2, one epoch, batch 32, fp32, 2 torch threads. Each run trains in this process and
ranks the held-out queries against held-out plus training positives (nDCG@10). Results are appended
to bench/results/recipe_sweep.json run by run (a run already there is skipped), and the table is
rewritten to bench/results/recipe_sweep.md. The man-page set needs `apt-get install manpages manpages-dev`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, child_setup, demo_data, md_table, minilm_path

ALL_LINEAR = ["query", "key", "value", "dense"]
COMMON: dict[str, Any] = {
    "batch_size": 32,
    "max_seq_length": 128,
    "torch_dtype": "float32",
    "logging_steps": 8,
    "save_steps": 10**9,
    "epochs": 1,
}
BASE = {"use_lora": True, "lora_target_modules": ALL_LINEAR, "lora_r": 16, "lora_alpha": 32, "learning_rate": 1e-3}
# One factor at a time from BASE; the name says what changed.
RUNS: dict[str, dict[str, Any]] = {
    "baseline (all linear, r16 a32, lr 1e-3)": BASE,
    "targets query/value": {**BASE, "lora_target_modules": ["query", "value"]},
    "targets query/key/value": {**BASE, "lora_target_modules": ["query", "key", "value"]},
    "lr 1e-4": {**BASE, "learning_rate": 1e-4},
    "lr 5e-4": {**BASE, "learning_rate": 5e-4},
    "lr 2e-3": {**BASE, "learning_rate": 2e-3},
    "warmup 0": {**BASE, "warmup_ratio": 0.0},
    "warmup 0.3": {**BASE, "warmup_ratio": 0.3},
    "r8 a16": {**BASE, "lora_r": 8, "lora_alpha": 16},
    "r64 a128": {**BASE, "lora_r": 64, "lora_alpha": 128},
    "rsLoRA r16 a32": {**BASE, "use_rslora": True},
    "rsLoRA r64 a16": {**BASE, "use_rslora": True, "lora_r": 64, "lora_alpha": 16},
    "DoRA": {**BASE, "use_dora": True},
    "temperature 0.02": {**BASE, "temperature": 0.02},
    "temperature 0.1": {**BASE, "temperature": 0.1},
    "full FT lr 3e-5": {"use_lora": False, "learning_rate": 3e-5},
    "full FT lr 1e-4": {"use_lora": False, "learning_rate": 1e-4},
}


def dataset(name: str) -> dict[str, Any]:
    if name == "demo":
        return demo_data()
    from vembed.manpage_data import build_manpage_dataset

    out = Path(tempfile.gettempdir()) / "vembed-bench" / "manpages"
    info_file = out / "info.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    info = build_manpage_dataset(out)
    info_file.write_text(json.dumps(info))
    return info


def train_and_eval(overrides: dict[str, Any], data: dict[str, Any], model: str, out: Path) -> dict[str, Any]:
    from vembed.config import load_config
    from vembed.evaluation import compare_models
    from vembed.training import train

    cfg = load_config(None, {**COMMON, **overrides, "model_name": model, "data_path": data["train"], "output_dir": str(out)})
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    metrics = compare_models({"m": str(result.checkpoint_dir)}, data["eval"], data["corpus"])["m"]["full"]
    shutil.rmtree(out, ignore_errors=True)
    return {"ndcg@10": metrics["ndcg@10"], "recall@10": metrics["recall@10"], "train_s": seconds}


def base_score(data: dict[str, Any], model: str) -> float:
    from vembed.evaluation import compare_models

    return compare_models({"base": model}, data["eval"], data["corpus"])["base"]["full"]["ndcg@10"]


def write_table(results: dict[str, Any]) -> str:
    parts = []
    for ds, runs in results.items():
        base = runs.get("base", {}).get("ndcg@10")
        full = max((r["ndcg@10"] for n, r in runs.items() if n.startswith("full FT")), default=None)
        rows = []
        for name, r in runs.items():
            if name == "base":
                continue
            gain = r["ndcg@10"] - base if base is not None else float("nan")
            share = f"{100 * gain / (full - base):.0f}%" if base is not None and full and full > base else "-"
            rows.append([name, r["ndcg@10"], f"{gain:+.3f}", share, f"{r['train_s']:.0f}"])
        parts.append(
            f"**{ds}** (base nDCG@10 {base:.3f}; share = gain / best full fine-tune gain)\n\n"
            + md_table(["run", "nDCG@10", "gain vs base", "share of full-FT gain", "train s"], rows)
        )
    return "\n\n".join(parts)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="demo", choices=["demo", "manpages"])
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--name", default="recipe_sweep")
    a = p.parse_args(argv)
    for k, v in {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    child_setup()
    import logging

    logging.disable(logging.WARNING)
    data, model = dataset(a.dataset), minilm_path()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{a.name}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    runs = results.setdefault(a.dataset, {})
    if "base" not in runs:
        runs["base"] = {"ndcg@10": base_score(data, model), "train_s": 0.0}
    wanted = [n.strip() for n in a.only.split(",") if n.strip()] or list(RUNS)
    for name in wanted:
        if name in runs:
            continue
        print(f"{a.dataset}: {name} ...", flush=True)
        out = Path(tempfile.mkdtemp(prefix="vembed-sweep-"))
        runs[name] = train_and_eval(RUNS[name], data, model, out)
        print(f"  nDCG@10 {runs[name]['ndcg@10']:.4f} in {runs[name]['train_s']:.0f}s", flush=True)
        path.write_text(json.dumps(results, indent=1))
        (RESULTS / f"{a.name}.md").write_text(write_table(results) + "\n")
    print(write_table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
