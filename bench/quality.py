"""Retrieval quality on both data sets, one table: base, LoRA with the config defaults, full
fine-tuning, LoRA + mined negatives, LoRA + MRL per dim; and LoRA vs full fine-tuning speed/memory.

    .venv/bin/python -m bench.quality [--threads 2]          # the table (trains what is missing)
    .venv/bin/python -m bench.quality --speed [--repeats 2]  # samples/s and peak RSS, LoRA vs full

all-MiniLM-L6-v2, one epoch, batch 32, max_seq_length 128, fp32, on the demo data (docstrings) and
the man-page set (`apt-get install manpages manpages-dev`). The runs are bench.recipe_sweep's and
share its results file (bench/results/recipe_sweep.json): "LoRA (defaults)" sets nothing but the
data, so it is whatever vembed/config.py says; the full fine-tune row is the best of the sweep's
full fine-tune learning rates. Writes bench/results/quality.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from bench import recipe_sweep
from bench.common import (
    RESULTS,
    alternate,
    best_samples_per_s,
    demo_data,
    entry,
    machine,
    md_table,
    median,
    minilm_path,
    report,
)

SETS = ["demo", "manpages"]
DIMS = [384, 192, 96, 48]
# Only the data and the bench settings: everything else is the config's default.
ROWS: dict[str, dict[str, Any]] = {
    "LoRA (defaults)": {},
    "LoRA (defaults) + mined negatives": {"_mine": True},
    "LoRA (defaults) + MRL": {"use_mrl": True},
}
FULL = ["full FT lr 2e-5", "full FT lr 5e-5", "full FT lr 1e-4", "full FT lr 2e-4"]
# The sweep's other seeds for the rows that carry a target (the full fine-tune: its best lr, see more_seeds).
SEEDS = recipe_sweep.SEEDS[1:]
for _seed in SEEDS:
    ROWS[f"LoRA (defaults), seed {_seed}"] = {"seed": _seed}
    ROWS[f"LoRA (defaults) + MRL, seed {_seed}"] = {"use_mrl": True, "seed": _seed}


# The best full fine-tune lr on both data sets (FULL, seed 42) at the other seeds.
FULL_SEEDS = [f"full FT lr 1e-4, seed {s}" for s in SEEDS]


def resolved(overrides: dict[str, Any]) -> dict[str, Any]:
    """What a run trains with; target names as the set they select on MiniLM (BERT)."""
    from vembed.config import load_config

    o = {k: v for k, v in overrides.items() if not k.startswith("_")}
    cfg = load_config(None, {**recipe_sweep.COMMON, **o}).model_dump()
    cfg["lora_target_modules"] = sorted(set(cfg["lora_target_modules"]) & set(recipe_sweep.ALL_LINEAR))
    if cfg["use_mrl"]:  # the dims and weights the loss resolves them to (MiniLM: 384-dim)
        from vembed.training.losses import resolve_mrl_dims

        cfg["mrl_dims"] = resolve_mrl_dims(cfg["mrl_dims"], DIMS[0])
        cfg["mrl_weights"] = [float(w) for w in cfg["mrl_weights"] or [1] * len(cfg["mrl_dims"])]
    cfg["_mine"] = bool(overrides.get("_mine"))
    return cfg


def ensure_runs(threads: int) -> dict[str, Any]:
    """Train and evaluate whatever the table needs that the results file lacks. A row whose config
    is the same as a sweep run's (training is deterministic: same config, same figures) takes that
    run's result and names it."""
    twins = {
        row: next((n for n, o in recipe_sweep.RUNS.items() if resolved(o) == resolved(ow)), None)
        for row, ow in ROWS.items()
    }
    # Rows without a twin in the sweep are trained (and saved) under their own names.
    missing = [row for row, twin in twins.items() if twin is None]
    recipe_sweep.RUNS.update({row: ROWS[row] for row in missing})
    recipe_sweep.main(["--threads", str(threads), "--only", "|".join([*FULL, *FULL_SEEDS, *missing])])
    results = json.loads((RESULTS / "recipe_sweep.json").read_text())
    for row, twin in twins.items():
        for ds in SETS:
            if twin in results.get(ds, {}):
                results[ds][row] = {**results[ds][twin], "same_config_as": twin}
    return results


def table(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    picked: dict[str, Any] = {}
    for ds in SETS:
        runs = results[ds]
        full_name = max(FULL, key=lambda n: runs[n]["ndcg@10"])
        picked[ds] = {"base": runs["base"], "full": {"name": full_name, **runs[full_name]}}
        picked[ds].update({name: runs[name] for name in ROWS})

    def row(label: str, key: str | None, dim: int | None = None) -> list[Any]:
        out: list[Any] = [label]
        for ds in SETS:
            base, full = picked[ds]["base"]["ndcg@10"], picked[ds]["full"]["ndcg@10"]
            r = picked[ds][key] if key else None
            if r is None:
                out += [f"{base:.3f}", "-", "-"]
            elif dim in (None, DIMS[0]):
                score = r["ndcg@10"]
                out += [f"{score:.3f}", f"{score - base:+.3f}", f"{100 * (score - base) / (full - base):.0f}%"]
            else:
                score = r["per_dim"][str(dim)]
                out += [f"{score:.3f}", "-", f"{100 * score / r['ndcg@10']:.1f}% of its dim {DIMS[0]}"]
        return out

    full_lrs = ", ".join(f"{ds} {picked[ds]['full']['name'].removeprefix('full FT ')}" for ds in SETS)
    rows = [
        row("base all-MiniLM-L6-v2", None),
        row("LoRA (defaults)", "LoRA (defaults)"),
        row(f"full fine-tune (best lr: {full_lrs})", "full"),
        row("LoRA (defaults) + 1 mined negative per query", "LoRA (defaults) + mined negatives"),
        *(row(f"LoRA (defaults) + MRL, dim {d}", "LoRA (defaults) + MRL", d) for d in DIMS),
    ]
    header = ["model"] + [
        h for ds in SETS for h in (f"{ds} nDCG@10", f"{ds} gain", f"{ds} share of full-FT gain")
    ]
    note = (
        "nDCG@10 of held-out queries against held-out plus training positives; one epoch, batch 32, fp32. "
        "Share: gain over base / the full fine-tune's gain. MRL rows: the MRL run's embeddings truncated "
        "to the first d dims and renormalised (the last column: share of its own full-dim nDCG@10)."
    )
    return note + "\n\n" + md_table(header, rows) + more_seeds(results, picked), picked


def more_seeds(results: dict[str, Any], picked: dict[str, Any]) -> str:
    """Every seed of the sweep for LoRA, the best full fine-tune and MRL; the targets on the means."""
    rows = []
    for ds in SETS:
        runs, base = results[ds], picked[ds]["base"]["ndcg@10"]
        names = {"LoRA": "LoRA (defaults)", "full": picked[ds]["full"]["name"], "MRL": "LoRA (defaults) + MRL"}
        per_seed = {k: [runs[n], *(runs.get(f"{n}, seed {s}") for s in SEEDS)] for k, n in names.items()}
        if not all(all(v) for v in per_seed.values()):
            continue
        series = {k: [r["ndcg@10"] for r in v] for k, v in per_seed.items()}
        series["MRL@96"] = [r["per_dim"]["96"] for r in per_seed["MRL"]]
        mean = {k: sum(v) / len(v) for k, v in series.items()}
        rows.append(
            [
                ds,
                *(" / ".join(f"{x:.3f}" for x in v) for v in series.values()),
                f"{100 * (mean['LoRA'] - base) / (mean['full'] - base):.0f}%",
                f"{mean['MRL'] - mean['LoRA']:+.3f}",
                f"{100 * mean['MRL@96'] / mean['MRL']:.1f}%",
            ]
        )
    if not rows:
        return ""
    header = ["data set", "LoRA (defaults)", "full fine-tune", "LoRA + MRL, dim 384", "LoRA + MRL, dim 96",
              "LoRA share of full-FT gain (mean)", "MRL full dim vs LoRA (mean)", "MRL dim 96 / its dim 384 (mean)"]  # fmt: skip
    seeds = " / ".join(map(str, recipe_sweep.SEEDS))
    return (
        f"\n\nSeeds {seeds} (the full fine-tune at its best lr), and the targets on the means:\n\n"
        + md_table(header, rows)
    )


def speed_child(mode: str, data: str, model: str, steps: int, warmup: int = 2) -> dict[str, Any]:
    """One fresh-process training run: LoRA with the config's defaults, or full fine-tuning at lr 1e-4."""
    from bench.trainers import train_vembed
    from vembed.config import TrainConfig

    d = TrainConfig()
    keys = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_init", "learning_rate")
    extra = {k: getattr(d, k) for k in keys} if mode == "lora" else {"learning_rate": 1e-4}
    return train_vembed(data, model, steps, warmup, lora=mode == "lora", extra=extra)


def speed(repeats: int, steps: int) -> None:
    info = machine()
    common = {"data": demo_data()["train"], "model": minilm_path(), "steps": steps}
    runs = alternate("bench.quality", {"lora": {"mode": "lora", **common}, "full": {"mode": "full", **common}}, repeats)
    lo, fu = runs["lora"], runs["full"]
    rows = [[label, r[0]["trainable_params"], best_samples_per_s(r), median(r, "samples_per_s"), median(r, "peak_rss_mib")]
            for label, r in (("LoRA (defaults)", lo), ("full fine-tuning", fu))]  # fmt: skip
    ratio = best_samples_per_s(lo) / best_samples_per_s(fu)
    saved = 1 - median(lo, "peak_rss_mib") / median(fu, "peak_rss_mib")
    header = ["mode", "trainable params", "samples/s (each step's best run)", "samples/s (median run)", "peak RSS MiB"]
    parts = [
        f"{repeats} alternating fresh processes per mode, {steps} steps each (timing from the end of step 2), "
        "demo data, batch 32, max_seq_length 128, fp32.",
        md_table(header, rows),
        f"**LoRA / full: {ratio:.2f}x samples/s; LoRA's peak RSS is {100 * abs(saved):.0f}% "
        f"{'lower' if saved >= 0 else 'higher'}.**",
    ]
    report("quality_speed", parts, {"runs": runs, "speed_ratio": ratio}, info)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--speed", action="store_true", help="LoRA (defaults) vs full fine-tuning: samples/s, peak RSS"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    if a.speed:
        speed(a.repeats, a.steps)
        return
    info = machine()
    md, picked = table(ensure_runs(a.threads))
    report("quality", [md], {"results": picked}, info)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    entry(main, speed_child)
