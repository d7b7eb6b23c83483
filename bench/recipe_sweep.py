"""LoRA recipe sweep: one factor at a time from a baseline, on the demo data and the man-page set.

    nice -n 15 .venv/bin/python -m bench.recipe_sweep --threads 1 [--dataset demo|manpages] [--only "NAME|NAME"]

all-MiniLM-L6-v2, one epoch, batch 32, fp32, --threads torch threads (1 on a crowded machine). Each run trains in this process and
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

from bench.common import RESULTS, demo_data, md_table, minilm_path

ALL_LINEAR = ["query", "key", "value", "dense"]
DIMS = [384, 192, 96, 48]
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
    "LoRA + mined negatives": {**BASE, "_mine": True},
    "LoRA + MRL (weights 1,1,1,1)": {**BASE, "use_mrl": True, "mrl_dims": DIMS, "mrl_weights": [1, 1, 1, 1]},
    "LoRA + MRL (weights 1,1,2,2)": {**BASE, "use_mrl": True, "mrl_dims": DIMS, "mrl_weights": [1, 1, 2, 2]},
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


def mined_train(data: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """The train split with one negative per query mined by the base model (ranks 10-50, margin 0.95)."""
    path = Path(data["train"]).with_name("train_mined.jsonl")
    info = path.with_suffix(".json")
    if not path.is_file():
        from vembed.data.mining import mine_file

        start = time.perf_counter()
        summary = mine_file(data["train"], str(path), model)
        summary["mine_s"] = time.perf_counter() - start
        info.write_text(json.dumps(summary))
    return str(path), json.loads(info.read_text())


def train_and_eval(overrides: dict[str, Any], data: dict[str, Any], model: str, out: Path) -> dict[str, Any]:
    from vembed.config import load_config
    from vembed.evaluation import compare_models
    from vembed.training import train

    overrides = dict(overrides)
    extra: dict[str, Any] = {}
    train_path = data["train"]
    if overrides.pop("_mine", False):
        train_path, extra["mining"] = mined_train(data, model)
    cfg = load_config(None, {**COMMON, **overrides, "model_name": model, "data_path": train_path, "output_dir": str(out)})
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    dims = DIMS[1:] if cfg.use_mrl else None
    metrics = compare_models({"m": str(result.checkpoint_dir)}, data["eval"], data["corpus"], dims=dims)["m"]
    shutil.rmtree(out, ignore_errors=True)
    full = metrics["full"]
    per_dim = {str(d): metrics[str(d)]["ndcg@10"] for d in dims or []}
    return {"ndcg@10": full["ndcg@10"], "recall@10": full["recall@10"], "train_s": seconds, "per_dim": per_dim, **extra}


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
        mrl = [[n, r["ndcg@10"], *(r["per_dim"][str(d)] for d in DIMS[1:])] for n, r in runs.items() if r.get("per_dim")]
        mrl_md = ""
        if mrl:
            mrl_md = "\n\nnDCG@10 per truncated dim (share of full dim):\n\n" + md_table(
                ["run", *(str(d) for d in DIMS)],
                [[n, f"{f:.3f}", *(f"{v:.3f} ({100 * v / f:.1f}%)" for v in vs)] for n, f, *vs in mrl],
            )
        parts.append(
            f"**{ds}** (base nDCG@10 {base:.3f}; share = gain / best full fine-tune gain)\n\n"
            + md_table(["run", "nDCG@10", "gain vs base", "share of full-FT gain", "train s"], rows)
            + mrl_md
        )
    return "\n\n".join(parts)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="demo", choices=["demo", "manpages"])
    p.add_argument("--only", default="", help="run names separated by | (default: all)")
    p.add_argument("--name", default="recipe_sweep")
    # On a crowded machine one thread is faster: OpenMP threads wait for each other at every op.
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    env = {"OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    import torch

    torch.set_num_threads(a.threads)
    import logging

    logging.disable(logging.WARNING)
    data, model = dataset(a.dataset), minilm_path()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{a.name}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    runs = results.setdefault(a.dataset, {})
    if "base" not in runs:
        runs["base"] = {"ndcg@10": base_score(data, model), "train_s": 0.0}
    wanted = [n.strip() for n in a.only.split("|") if n.strip()] or list(RUNS)
    for name in wanted:
        if name in runs:
            continue
        print(f"{a.dataset}: {name} ...", flush=True)
        out = Path(tempfile.mkdtemp(prefix="vembed-sweep-"))
        runs[name] = train_and_eval(RUNS[name], data, model, out)
        print(f"  nDCG@10 {runs[name]['ndcg@10']:.4f} in {runs[name]['train_s']:.0f}s", flush=True)
        # Re-read before writing: another sweep process may have added runs meanwhile.
        latest = json.loads(path.read_text()) if path.is_file() else {}
        latest.setdefault(a.dataset, {}).update({k: v for k, v in runs.items() if k not in latest.get(a.dataset, {})})
        latest[a.dataset][name] = runs[name]
        results = latest
        path.write_text(json.dumps(results, indent=1))
        (RESULTS / f"{a.name}.md").write_text(write_table(results) + "\n")
    print(write_table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
