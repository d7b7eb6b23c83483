"""Training throughput of the LoRA run in bench.trainers, three ways:

    .venv/bin/python -m bench.train_throughput [--repeats 3] [--steps 31]     # vembed vs sentence-transformers
    .venv/bin/python -m bench.train_throughput ablation [--full] [--last N]   # vembed's optimisations, one at a time
    .venv/bin/python -m bench.train_throughput lora_vs_full                    # LoRA vs every weight trained

Each run is a fresh process (`--child`); the contenders alternate A B A B. The default 31 steps is one
epoch of the demo data, so every length-grouped batch is timed once. `ablation` turns the optimisations
off in the child: none on (the loop as it was), then length-grouped batches, lean dropout, lean
attention and fused AdamW added cumulatively. `lora_vs_full` also prints what weights, gradients and
AdamW state take in each mode, which is the memory LoRA can save.
Writes bench/results/NAME.{md,json} (NAME: train_throughput, ablation or lora_vs_full unless --name).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from bench.common import (
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
from bench.trainers import LORA, OPTIMISATIONS

MIB = 2**20
BEST, MEDIAN = "samples/s (each step's best run)", "samples/s (median run)"
ABLATION_LABELS = {
    "length_grouping": "+ length-grouped batches",
    "lean_dropout": "+ lean dropout (bool masks)",
    "lean_attention": "+ lean attention (CPU, with dropout)",
    "fused_adamw": "+ fused AdamW",
}


def child(tool: str, full: bool = False, off: Sequence[str] = (), **run: Any) -> dict[str, Any]:
    """One training run (`run`: data, model, steps, warmup); `off`: vembed's optimisations to turn off."""
    from bench.trainers import train_st, train_vembed

    if tool == "vembed":
        return train_vembed(**run, lora=not full, off=off)
    return train_st(**run, lora=not full)


def table(a: argparse.Namespace, runs: dict[str, list[dict]], first: str, labels: dict[str, str],
          extra: dict[str, list] | None = None) -> str:  # fmt: skip
    """One row per contender: samples/s from each step's best run, then the median run's figures;
    `extra` adds columns (header: one value per contender)."""
    extra = extra or {}
    header = [first, "trainable params", BEST, MEDIAN, "CPU ms / sample", "s/step", "peak RSS MiB",
              f"setup + first {a.warmup} steps s", "loss step 1", "mean loss last 5 steps", *extra]  # fmt: skip
    keys = ("samples_per_s", "cpu_ms_per_sample", "s_per_step", "peak_rss_mib", "setup_s", "loss_first", "loss_last5")
    rows = [[labels.get(name, name), r[0]["trainable_params"], best_samples_per_s(r), *(median(r, k) for k in keys),
             *(column[i] for column in extra.values())] for i, (name, r) in enumerate(runs.items())]  # fmt: skip
    return md_table(header, rows)


def ratios(x: list[dict], y: list[dict]) -> dict[str, float]:
    """Runs x against runs y: samples/s (each step's best run, and median runs), CPU time, peak RSS."""
    return {
        "speed_ratio": best_samples_per_s(x) / best_samples_per_s(y),
        "median_speed_ratio": median(x, "samples_per_s") / median(y, "samples_per_s"),
        "cpu_ratio": median(y, "cpu_ms_per_sample") / median(x, "cpu_ms_per_sample"),
        "rss_ratio": median(x, "peak_rss_mib") / median(y, "peak_rss_mib"),
        "rss_change_mib": median(x, "peak_rss_mib") - median(y, "peak_rss_mib"),
    }


def tools(a: argparse.Namespace, runs: dict[str, list[dict]]) -> tuple[list[str], dict[str, Any]]:
    v, s = runs["vembed"], runs["st"]
    q = ratios(v, s)
    each = [[i + 1, x["samples_per_s"], y["samples_per_s"], x["cpu_ms_per_sample"], y["cpu_ms_per_sample"],
             x["peak_rss_mib"], y["peak_rss_mib"], y["load_avg_1m"]] for i, (x, y) in enumerate(zip(v, s, strict=True))]  # fmt: skip
    return [
        f"Medians of {a.repeats} alternating runs, {a.steps} steps each, timing from the end of step {a.warmup}.",
        table(a, runs, "tool", {"st": "sentence-transformers"}),
        f"**vembed / sentence-transformers: {q['speed_ratio']:.2f}x samples/s (each step's best run; "
        f"{q['median_speed_ratio']:.2f}x between median runs), {q['cpu_ratio']:.2f}x by CPU time per "
        f"sample, {q['rss_ratio']:.2f}x peak RSS.**",
        "Each run:",
        md_table(["run", "vembed samples/s", "ST samples/s", "vembed CPU ms/sample", "ST CPU ms/sample",
                  "vembed RSS MiB", "ST RSS MiB", "load avg"], each),  # fmt: skip
    ], q


def ablation(a: argparse.Namespace, runs: dict[str, list[dict]]) -> tuple[list[str], dict[str, Any]]:
    steps = [ratios(cur, prev) for prev, cur in pairwise(runs.values())]
    column = ["-", *(f"{q['speed_ratio']:.2f}x, {q['cpu_ratio']:.2f}x, {q['rss_change_mib']:+.0f} MiB" for q in steps)]
    total = ratios(runs[list(runs)[-1]], runs[list(runs)[0]])
    return [
        f"vembed alone, {'full fine-tuning' if a.full else 'LoRA r=16'}, batch 32, max_seq_length 128, fp32, "
        f"2 threads; medians of {a.repeats} alternating runs of {a.steps} steps (timing from the end of step "
        f"{a.warmup}). Each row adds one optimisation to the row above; the last row is vembed as shipped.",
        table(a, runs, "variant", {}, {"vs row above (samples/s, CPU time, RSS)": column}),
        f"**First row to last: {total['speed_ratio']:.2f}x samples/s (each step's best run), {total['cpu_ratio']:.2f}x "
        f"less CPU time per sample, {total['rss_change_mib']:+.0f} MiB peak RSS.**",
    ], {}


def lora_vs_full(a: argparse.Namespace, runs: dict[str, list[dict]]) -> tuple[list[str], dict[str, Any]]:
    from bench.lora_memory import MODELS, lora_parameters

    # MiB of weights, and of gradients + AdamW moments for each mode (fp32 everywhere).
    lora, total = lora_parameters(MODELS["all-MiniLM-L6-v2"][0], LORA["lora_target_modules"], LORA["lora_r"])
    sizes = {
        "params_total": total,
        "params_lora": lora,
        "weights_mib": total * 4 / MIB,
        "full_grads_adam_mib": total * 4 * 3 / MIB,
        "lora_grads_adam_mib": lora * 4 * 3 / MIB,
    }
    q = ratios(runs["lora"], runs["full"])
    state_share = sizes["full_grads_adam_mib"] / median(runs["full"], "peak_rss_mib")
    memory = [
        ["model weights (both modes)", sizes["weights_mib"]],
        ["full fine-tuning: gradients + AdamW moments (3x weights)", sizes["full_grads_adam_mib"]],
        ["LoRA: gradients + AdamW moments of the adapters", sizes["lora_grads_adam_mib"]],
        ["full fine-tuning: that state as a share of its peak RSS", f"{100 * state_share:.0f}%"],
    ]
    return [
        f"Medians of {a.repeats} alternating runs, {a.steps} steps each (timing from the end of step "
        f"{a.warmup}); same data, batch 32, max_seq_length 128, fp32, 2 threads.",
        table(a, runs, "mode", {"lora": "LoRA r=16 (query, value)", "full": "full fine-tuning"}),
        f"**LoRA / full: {q['speed_ratio']:.2f}x samples/s (each step's best run), {q['cpu_ratio']:.2f}x by CPU time; "
        f"LoRA's peak RSS is {100 * (1 - q['rss_ratio']):.0f}% lower.**",
        md_table(["memory item (fp32)", "MiB"], memory),
    ], {"sizes": sizes, **q}


def contenders(a: argparse.Namespace, data: str, model: str) -> dict[str, dict[str, Any]]:
    common = {"tool": "vembed", "data": data, "model": model, "steps": a.steps, "warmup": a.warmup}
    if a.compare == "tools":
        return {"vembed": common, "st": {**common, "tool": "st"}}
    if a.compare == "lora_vs_full":
        return {"lora": common, "full": {**common, "full": True}}
    # Row i turns off all but the first i optimisations.
    labels = ["none (before)", *(ABLATION_LABELS[name] for name in OPTIMISATIONS)]
    variants = {label: {**common, "full": a.full, "off": OPTIMISATIONS[i:]} for i, label in enumerate(labels)}
    return dict(list(variants.items())[-a.last :]) if a.last else variants


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("compare", nargs="?", choices=["tools", "ablation", "lora_vs_full"], default="tools")
    p.add_argument("--repeats", type=int, help="runs per contender (default: 3 for tools, else 2)")
    p.add_argument("--steps", type=int, default=31, help="optimizer steps per run (one epoch of the demo data)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--full", action="store_true", help="ablation: full fine-tuning instead of LoRA")
    p.add_argument("--last", type=int, default=0, help="ablation: run only the last N variants (0: all)")
    p.add_argument("--name", help="report name (default: train_throughput, ablation or lora_vs_full)")
    a = p.parse_args(argv)
    a.repeats = a.repeats or (3 if a.compare == "tools" else 2)
    info = machine()
    variants = contenders(a, demo_data()["train"], minilm_path())
    print(f"{a.compare}: {a.repeats} x {list(variants)}, {a.steps} steps each")
    runs = alternate("bench.train_throughput", variants, a.repeats)
    parts, extra = {"tools": tools, "ablation": ablation, "lora_vs_full": lora_vs_full}[a.compare](a, runs)
    name = a.name or ("train_throughput" if a.compare == "tools" else a.compare)
    report(name, parts, {"runs": runs, **extra}, info)


if __name__ == "__main__":
    entry(main, child)
