"""LoRA recipe sweep: one factor at a time from a baseline, on the demo data and the man-page set.

    .venv/bin/python -m bench.recipe_sweep --threads 2 [--dataset all|demo|manpages] [--only "NAME|NAME"]

all-MiniLM-L6-v2, one epoch, batch 32, fp32, --threads torch threads. Each run trains in this process and
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
BASE = {
    "use_lora": True,
    "lora_target_modules": ALL_LINEAR,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,  # the defaults before the three-seed round (now r32, alpha 48, dropout 0)
    "learning_rate": 1e-3,
}
# One factor at a time from BASE; the name says what changed. Names starting with "full FT" are
# full fine-tunes ("share" divides by the best of them).
RUNS: dict[str, dict[str, Any]] = {
    "baseline (all linear, r16 a32, lr 1e-3)": BASE,
    "full FT lr 2e-5": {"use_lora": False, "learning_rate": 2e-5},
    "full FT lr 5e-5": {"use_lora": False, "learning_rate": 5e-5},
    "full FT lr 1e-4": {"use_lora": False, "learning_rate": 1e-4},
    "full FT lr 2e-4": {"use_lora": False, "learning_rate": 2e-4},
    "full FT lr 1e-4, seed 7": {"use_lora": False, "learning_rate": 1e-4, "seed": 7},
    "targets query/value": {**BASE, "lora_target_modules": ["query", "value"]},
    "targets query/key/value": {**BASE, "lora_target_modules": ["query", "key", "value"]},
    "lr 5e-4": {**BASE, "learning_rate": 5e-4},
    "lr 2e-3": {**BASE, "learning_rate": 2e-3},
    "warmup 0": {**BASE, "warmup_ratio": 0.0},
    "warmup 0.3": {**BASE, "warmup_ratio": 0.3},
    "r8 a16": {**BASE, "lora_r": 8, "lora_alpha": 16},
    "r32 a64": {**BASE, "lora_r": 32, "lora_alpha": 64},
    "r64 a128": {**BASE, "lora_r": 64, "lora_alpha": 128},
    "r16 a16": {**BASE, "lora_alpha": 16},
    "rsLoRA r16 a32": {**BASE, "use_rslora": True},
    "DoRA": {**BASE, "use_dora": True},
    "temperature 0.02": {**BASE, "temperature": 0.02},
    "temperature 0.1": {**BASE, "temperature": 0.1},
    "baseline, seed 7": {**BASE, "seed": 7},
    "PiSSA": {**BASE, "lora_init": "pissa"},
    "OLoRA": {**BASE, "lora_init": "olora"},
    "LoRA + mined negatives": {**BASE, "_mine": True},
    "LoRA + MRL (weights 1,1,2,2)": {**BASE, "use_mrl": True, "mrl_dims": DIMS, "mrl_weights": [1, 1, 2, 2]},
    "LoRA + MRL (weights 2,1,1,1)": {**BASE, "use_mrl": True, "mrl_dims": DIMS, "mrl_weights": [2, 1, 1, 1]},
    "LoRA + MRL (weights 1,1,1,1)": {**BASE, "use_mrl": True, "mrl_dims": DIMS, "mrl_weights": [1, 1, 1, 1]},
    "LoRA + MRL (dims 384,192,96)": {**BASE, "use_mrl": True, "mrl_dims": DIMS[:3]},
    "LoRA + MRL (dims 384,96)": {**BASE, "use_mrl": True, "mrl_dims": [384, 96]},
    "LoRA + MRL (dims 384,192,96, weights 1,1,2)": {
        **BASE,
        "use_mrl": True,
        "mrl_dims": DIMS[:3],
        "mrl_weights": [1, 1, 2],
    },
    "LoRA + MRL (dims 384,96, weights 1,2)": {**BASE, "use_mrl": True, "mrl_dims": [384, 96], "mrl_weights": [1, 2]},
    "LoRA + MRL (dims 384,96, weights 1,2), seed 7": {
        **BASE,
        "use_mrl": True,
        "mrl_dims": [384, 96],
        "mrl_weights": [1, 2],
        "seed": 7,
    },
    "LoRA + MRL (dims 384,96), seed 7": {**BASE, "use_mrl": True, "mrl_dims": [384, 96], "seed": 7},
    "LoRA + MRL (dims 384,192,96, weights 2,1,1)": {
        **BASE,
        "use_mrl": True,
        "mrl_dims": DIMS[:3],
        "mrl_weights": [2, 1, 1],
    },
}


SEEDS = [42, 7, 123]
D0 = {**BASE, "lora_dropout": 0.0}


def _seeded(first: str, extra: dict[str, Any] | None = None, prefix: str | None = None) -> tuple[str, str]:
    """(the seed-42 run's name, the other seeds' name prefix); with `extra` (keys changed from D0) the
    run is added to RUNS at every seed of SEEDS, without it the runs are in RUNS already."""
    prefix = prefix or first
    if extra is not None:
        RUNS[first] = {**D0, **extra}
        RUNS.update({f"{prefix}, seed {s}": {**D0, **extra, "seed": s} for s in SEEDS[1:]})
    return first, prefix


R32A48 = {"lora_r": 32, "lora_alpha": 48}
# One-seed runs of the three-seed round, and the third seed of runs that had two.
RUNS.update(
    {
        "baseline, seed 123": {**BASE, "seed": 123},
        "full FT lr 1e-4, seed 123": {"use_lora": False, "learning_rate": 1e-4, "seed": 123},
        "dropout 0, warmup 0": {**D0, "warmup_ratio": 0.0},
        "dropout 0, LoRA+ 4": {**D0, "loraplus_lr_ratio": 4},
        "dropout 0, LoRA+ 8, lr 5e-4": {**D0, "loraplus_lr_ratio": 8, "learning_rate": 5e-4},
        "dropout 0, LoRA+ 16, lr 5e-4": {**D0, "loraplus_lr_ratio": 16, "learning_rate": 5e-4},
        "dropout 0, r32 a64, + LayerNorm": {**D0, "lora_r": 32, "lora_alpha": 64, "modules_to_save": ["LayerNorm"]},
        "dropout 0, r32 a48, + mined negatives": {**D0, **R32A48, "_mine": True},
    }
)
# Runs repeated at every seed of SEEDS, by label. The differences between one-seed runs are of the
# size of the seed noise; these means decide the defaults.
SEEDED: dict[str, tuple[str, str]] = {
    "full FT lr 1e-4": _seeded("full FT lr 1e-4"),
    "LoRA r16 a32, dropout 0.05 (the old defaults)": _seeded(
        "baseline (all linear, r16 a32, lr 1e-3)", prefix="baseline"
    ),
    "LoRA r16 a32, dropout 0": _seeded("lora_dropout 0", {}, prefix="dropout 0"),
    "LoRA r16 a32, dropout 0, + LayerNorm": _seeded("dropout 0, + LayerNorm", {"modules_to_save": ["LayerNorm"]}),
    "LoRA r24 a48, dropout 0": _seeded("dropout 0, r24 a48", {"lora_r": 24, "lora_alpha": 48}),
    "LoRA r32 a48, dropout 0": _seeded("dropout 0, r32 a48", R32A48),
    "LoRA r32 a64, dropout 0": _seeded("dropout 0, r32 a64", {"lora_r": 32, "lora_alpha": 64}),
    "LoRA r32 a48, dropout 0, + MRL": _seeded("dropout 0, r32 a48, + MRL", {**R32A48, "use_mrl": True}),
    "LoRA r32 a48, dropout 0, + MRL (weights 1,2)": _seeded(
        "dropout 0, r32 a48, + MRL (weights 1,2)",
        {**R32A48, "use_mrl": True, "mrl_dims": [384, 96], "mrl_weights": [1, 2]},
    ),
    "LoRA r32 a48, dropout 0, + MRL (dims 384,192,96)": _seeded(
        "dropout 0, r32 a48, + MRL (dims 384,192,96)", {**R32A48, "use_mrl": True, "mrl_dims": [384, 192, 96]}
    ),
    "LoRA r32 a48, dropout 0, + MRL (dims 384,192,96, weights 1,1,2)": _seeded(
        "dropout 0, r32 a48, + MRL (dims 384,192,96, weights 1,1,2)",
        {**R32A48, "use_mrl": True, "mrl_dims": [384, 192, 96], "mrl_weights": [1, 1, 2]},
    ),
}
# Every MRL run above predates mrl_rotation (default true since): they ran without it.
for _run in RUNS.values():
    if _run.get("use_mrl"):
        _run.setdefault("mrl_rotation", False)
MRL_ROTATED = {**R32A48, "use_mrl": True, "mrl_rotation": True}
SEEDED |= {
    # mrl_dims [384] trains exactly as plain LoRA does; only the rotation is added.
    "LoRA r32 a48, dropout 0, + rotation only": _seeded(
        "dropout 0, r32 a48, + rotation only", {**MRL_ROTATED, "mrl_dims": [384]}
    ),
    "LoRA r32 a48, dropout 0, + MRL + rotation": _seeded("dropout 0, r32 a48, + MRL + rotation", MRL_ROTATED),
}


def seed_table(results: dict[str, Any]) -> str:
    """One row per SEEDED label with every seed run: each seed's nDCG@10, the mean, and the mean's
    share of the mean full fine-tune gain."""

    def series(ds: str, label: str) -> list[float] | None:
        first, prefix = SEEDED[label]
        names = [first, *(f"{prefix}, seed {s}" for s in SEEDS[1:])]
        runs = results.get(ds, {})
        return [runs[n]["ndcg@10"] for n in names] if all(n in runs for n in names) else None

    sets = list(results)
    full = {ds: series(ds, "full FT lr 1e-4") for ds in sets}
    rows = []
    for label in SEEDED:
        values = {ds: series(ds, label) for ds in sets}
        if not all(values.values()):
            continue
        row: list[Any] = [label]
        for ds in sets:
            mean, base = sum(values[ds]) / len(SEEDS), results[ds]["base"]["ndcg@10"]
            share = "-"
            if full[ds]:
                share = f"{100 * (mean - base) / (sum(full[ds]) / len(SEEDS) - base):.0f}%"
            row += [" / ".join(f"{v:.3f}" for v in values[ds]), f"{mean:.3f}", share]
        rows.append(row)
    if not rows:
        return ""
    seeds = " / ".join(map(str, SEEDS))
    header = ["run"] + [h for ds in sets for h in (f"{ds} seeds {seeds}", f"{ds} mean", f"{ds} share (means)")]
    return f"\n\nSeeds {seeds}: nDCG@10 per seed, mean, and the mean's share of the mean full fine-tune gain:\n\n" + (
        md_table(header, rows)
    )


def dataset(name: str) -> dict[str, Any]:
    if name == "demo":
        return demo_data()
    from vembed.data.manpage_data import build_manpage_dataset

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
    from vembed.inference.evaluation import compare_models
    from vembed.training import train

    overrides = dict(overrides)
    extra: dict[str, Any] = {}
    train_path = data["train"]
    if overrides.pop("_mine", False):
        train_path, extra["mining"] = mined_train(data, model)
    cfg = load_config(
        None, {**COMMON, **overrides, "model_name": model, "data_path": train_path, "output_dir": str(out)}
    )
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    dims = DIMS[1:]  # every run: how plain LoRA holds up when truncated is the MRL runs' reference
    metrics = compare_models({"m": str(result.checkpoint_dir)}, data["eval"], data["corpus"], dims=dims)["m"]
    shutil.rmtree(out, ignore_errors=True)
    full = metrics["full"]
    per_dim = {str(d): metrics[str(d)]["ndcg@10"] for d in dims or []}
    load = [round(x, 2) for x in os.getloadavg()]
    return {
        "ndcg@10": full["ndcg@10"],
        "recall@10": full["recall@10"],
        "train_s": seconds,
        "per_dim": per_dim,
        "load_avg_end": load,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **extra,
    }


def base_score(data: dict[str, Any], model: str) -> float:
    from vembed.inference.evaluation import compare_models

    return compare_models({"base": model}, data["eval"], data["corpus"])["base"]["full"]["ndcg@10"]


def write_table(results: dict[str, Any]) -> str:
    """Both data sets side by side: one row per run, nDCG@10 and share of the best full fine-tune gain."""
    sets = list(results)
    names = list(dict.fromkeys(n for runs in results.values() for n in runs if n != "base"))
    names = [n for n in RUNS if n in names] + [n for n in names if n not in RUNS]
    base = {ds: results[ds].get("base", {}).get("ndcg@10") for ds in sets}
    full = {
        ds: max((r["ndcg@10"] for n, r in results[ds].items() if n.startswith("full FT")), default=None)
        for ds in sets
    }
    rows = [
        ["base all-MiniLM-L6-v2", *(f"{base[ds]:.3f}" if base[ds] else "-" for ds in sets for _ in (0, 1))]
    ]
    for name in names:
        row: list[Any] = [name]
        for ds in sets:
            r = results[ds].get(name)
            if r is None:
                row += ["-", "-"]
                continue
            gain = r["ndcg@10"] - base[ds]
            share = f"{100 * gain / (full[ds] - base[ds]):.0f}%" if full[ds] and full[ds] > base[ds] else "-"
            row += [f"{r['ndcg@10']:.3f} ({gain:+.3f})", share]
        rows.append(row)
    rows[0] = ["base all-MiniLM-L6-v2", *(x for ds in sets for x in (f"{base[ds]:.3f}", "-"))]
    header = ["run"] + [h for ds in sets for h in (f"{ds} nDCG@10 (gain)", f"{ds} share of full-FT gain")]
    out = "nDCG@10, one epoch; share = gain over base / best full fine-tune's gain.\n\n" + md_table(
        header, rows
    )
    mrl = [n for n in names if "MRL" in n or n.startswith("baseline")]
    if mrl:
        mrows = []
        for name in mrl:
            for ds in sets:
                r = results[ds].get(name)
                if r and r.get("per_dim"):
                    f = r["ndcg@10"]
                    mrows.append(
                        [
                            ds,
                            name,
                            f"{f:.3f}",
                            *(
                                f"{r['per_dim'][str(d)]:.3f} ({100 * r['per_dim'][str(d)] / f:.1f}%)"
                                for d in DIMS[1:]
                            ),
                        ]
                    )
        out += "\n\nnDCG@10 per truncated dim (share of the run's own full dim):\n\n"
        out += md_table(["data set", "run", *(str(d) for d in DIMS)], mrows)
    return out + seed_table(results)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="all", choices=["all", "demo", "manpages"])
    p.add_argument("--only", default="", help="run names separated by | (default: all)")
    p.add_argument("--queue", default="", help="file of run names, one a line, re-read before each run")
    p.add_argument("--name", default="recipe_sweep")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    env = {"OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    import torch

    torch.set_num_threads(a.threads)
    import logging

    logging.disable(logging.WARNING)
    model = minilm_path()
    sets = ["demo", "manpages"] if a.dataset == "all" else [a.dataset]
    data = {ds: dataset(ds) for ds in sets}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{a.name}.json"

    def save(ds: str, name: str, result: dict[str, Any]) -> dict[str, Any]:
        # Re-read before writing: another sweep process may have added runs meanwhile.
        latest = json.loads(path.read_text()) if path.is_file() else {}
        latest.setdefault(ds, {})[name] = result
        path.write_text(json.dumps(latest, indent=1))
        (RESULTS / f"{a.name}.md").write_text(write_table(latest) + "\n")
        return latest

    results = json.loads(path.read_text()) if path.is_file() else {}
    for ds in sets:
        if "base" not in results.get(ds, {}):
            results = save(ds, "base", {"ndcg@10": base_score(data[ds], model), "train_s": 0.0})
    def todo() -> list[tuple[str, str]]:
        # A queue file is re-read before every run, so a long sweep can be reordered while it runs.
        text = Path(a.queue).read_text() if a.queue else a.only.replace("|", "\n")
        wanted = []
        for line in text.splitlines():
            # "NAME" (a run of RUNS) or "NAME = {json}": a new run, these keys changed from BASE
            name, _, extra = (x.strip() for x in line.partition(" = "))
            if name and extra:
                RUNS.setdefault(name, {**BASE, **json.loads(extra)})
            if name:
                wanted.append(name)
        wanted = wanted or list(RUNS)
        # name-major: each factor gets both data sets before the next one starts
        unknown = [n for n in wanted if n not in RUNS]
        if unknown:
            print(f"unknown runs skipped: {unknown}", flush=True)
        return [(n, ds) for n in wanted if n in RUNS for ds in sets if n not in results.get(ds, {})]

    failed: set[tuple[str, str]] = set()
    while pending := [t for t in todo() if t not in failed]:
        name, ds = pending[0]
        print(f"{ds}: {name} ...", flush=True)
        out = Path(tempfile.mkdtemp(prefix="vembed-sweep-"))
        try:
            r = train_and_eval(RUNS[name], data[ds], model, out)
        except Exception as e:  # one broken run must not stop the sweep; it is reported and skipped
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
            failed.add((name, ds))
            continue
        print(f"  nDCG@10 {r['ndcg@10']:.4f} in {r['train_s']:.0f}s", flush=True)
        results = save(ds, name, r)
    print(write_table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
