"""Retrieval quality on the demo data: base vs LoRA vs full fine-tuning, and MRL per dim.

    .venv/bin/python -m bench.quality [--epochs 1] [--skip-random-batches]

Trains all-MiniLM-L6-v2 for one epoch on the demo training pairs (Python docstrings) in several ways,
then ranks the held-out queries against the held-out positives plus every training positive as
distractors. Also trains LoRA once on random (not length-grouped) batches, to show what grouping
costs in quality. Writes bench/results/quality.{md,json}, docs/quality_models.png and
docs/quality_mrl.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    REPO,
    child_setup,
    demo_data,
    machine,
    machine_line,
    md_table,
    minilm_path,
    save_report,
)

DIMS = [384, 192, 96, 48]
COMMON = {"batch_size": 32, "max_seq_length": 128, "torch_dtype": "float32", "logging_steps": 8, "save_steps": 10**9}
LORA = {"use_lora": True, "lora_target_modules": ["query", "value"], "learning_rate": 5e-4}
RUNS = {
    "LoRA": LORA,
    "LoRA, random batches": {**LORA, "group_by_length": False},
    "full fine-tune": {"use_lora": False, "learning_rate": 3e-5},
    "LoRA + MRL": {**LORA, "use_mrl": True, "mrl_dims": DIMS},
}


def train_one(name: str, overrides: dict, data: dict, model: str, epochs: int, out: Path) -> tuple[str, float, float]:
    from vembed.config import load_config
    from vembed.training import train

    cfg = load_config(
        None,
        {
            **COMMON,
            **overrides,
            "model_name": model,
            "data_path": data["train"],
            "epochs": epochs,
            "output_dir": str(out / name.replace(" ", "_").replace(",", "").replace("+", "plus")),
        },
    )
    start = time.perf_counter()
    result = train(cfg)
    return str(result.checkpoint_dir), time.perf_counter() - start, result.history[-1]["loss"]


def plot(results: dict, out_models: Path, out_mrl: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.38
    for k, metric in enumerate(("ndcg@10", "recall@10")):
        values = [results[n]["full"][metric] for n in names]
        bars = ax.bar([i + (k - 0.5) * width for i in range(len(names))], values, width, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("all-MiniLM-L6-v2 on the demo data (held-out queries)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_models, dpi=120)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names:
        ys = [results[n]["full" if d == DIMS[0] else str(d)]["ndcg@10"] for d in DIMS]
        ax.plot(DIMS, ys, marker="o", label=n)
    ax.set_xscale("log", base=2)
    ax.set_xticks(DIMS, [str(d) for d in DIMS])
    ax.set_xlabel("embedding dim (truncated, renormalised)")
    ax.set_ylabel("nDCG@10")
    ax.set_title("Matryoshka: quality per truncated dim")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_mrl, dpi=120)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--skip-random-batches", action="store_true")
    p.add_argument("--name", default="quality")
    a = p.parse_args(argv)
    for k, v in {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    child_setup()
    import logging

    logging.disable(logging.WARNING)
    from vembed.evaluation import compare_models

    info = machine()
    data = demo_data()
    model = minilm_path()
    out = Path(tempfile.mkdtemp(prefix="vembed-quality-"))
    runs = {k: v for k, v in RUNS.items() if not (a.skip_random_batches and "random" in k)}
    models = {"base": model}
    train_info = {}
    for name, overrides in runs.items():
        print(f"training {name} ...", flush=True)
        models[name], seconds, loss = train_one(name, overrides, data, model, a.epochs, out)
        train_info[name] = {"train_s": seconds, "final_loss": loss}
    print("evaluating ...", flush=True)
    results = compare_models(models, data["eval"], data["corpus"], dims=DIMS[1:])
    shutil.rmtree(out, ignore_errors=True)
    docs = REPO / "docs"
    plot(results, docs / "quality_models.png", docs / "quality_mrl.png")

    rows = []
    for name in models:
        m = results[name]["full"]
        t = train_info.get(name, {})
        rows.append(
            [
                name,
                m["ndcg@10"],
                m["recall@10"],
                m["mrr@10"],
                f"{t['train_s']:.0f}" if t else "-",
                f"{t['final_loss']:.3f}" if t else "-",
            ]
        )
    mrl_rows = [
        [name, *(results[name]["full" if d == DIMS[0] else str(d)]["ndcg@10"] for d in DIMS)]
        for name in models
    ]
    full_mrl = results["LoRA + MRL"]["full"]["ndcg@10"]
    share = [results["LoRA + MRL"][str(d)]["ndcg@10"] / full_mrl for d in DIMS[1:]]
    n_queries = sum(1 for _ in open(data["eval"], encoding="utf-8"))
    md = "\n\n".join(
        [
            f"{n_queries} held-out queries ranked against {n_queries} held-out positives plus "
            f"{data['n_train']} training positives as distractors; training: {data['n_train']} pairs, "
            f"{a.epochs} epoch(s), batch 32, max_seq_length 128, fp32 (LoRA r=16 on query/value at lr 5e-4; "
            f"full fine-tune at lr 3e-5). The base model is evaluated as published (max_seq_length 256).",
            md_table(["model", "nDCG@10", "Recall@10", "MRR@10", "train s", "final loss"], rows),
            "nDCG@10 per embedding dim (first d dims, renormalised):",
            md_table(["model", *(str(d) for d in DIMS)], mrl_rows),
            "**LoRA + MRL keeps "
            + ", ".join(f"{100 * s:.1f}% at {d}" for s, d in zip(share, DIMS[1:], strict=True))
            + " of its full-dim nDCG@10.**",
            "![base vs LoRA vs full](quality_models.png)",
            "![nDCG@10 per dim](quality_mrl.png)",
            machine_line(info, os.getloadavg()),
        ]
    )
    print(md)
    save_report(a.name, md, {"machine": info, "results": results, "train": train_info})


if __name__ == "__main__":
    main(sys.argv[1:])
