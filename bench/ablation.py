"""Before/after figures for each of vembed's training optimisations, added one at a time.

    .venv/bin/python -m bench.ablation [--repeats 2] [--steps 31]

The LoRA run of bench.train_throughput (vembed only), with optimisations turned off in the child
process: none on (the loop as it was), then length-grouped batches, lean dropout, lean attention
and fused AdamW added cumulatively. Variants alternate within each repeat. The default 31 steps is
one epoch of the demo data, so every length-grouped batch is timed once.
Writes bench/results/ablation.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys

from bench.common import (
    alternate,
    best_samples_per_s,
    demo_data,
    machine,
    machine_line,
    md_table,
    median,
    minilm_path,
    save_report,
)
from bench.trainers import OPTIMISATIONS

LABELS = {
    "length_grouping": "+ length-grouped batches",
    "lean_dropout": "+ lean dropout (bool masks)",
    "lean_attention": "+ lean attention (CPU, with dropout)",
    "fused_adamw": "+ fused AdamW",
}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=31)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--last", type=int, default=0, help="run only the last N variants (0: all)")
    p.add_argument("--name", default="ablation")
    a = p.parse_args(argv)
    info = machine()
    data = demo_data()
    common = ["vembed", "--data", data["train"], "--model", minilm_path(), "--steps", str(a.steps)]
    common += ["--warmup", str(a.warmup)] + (["--full"] if a.full else [])
    variants = {"none (before)": [*common, "--disable", ",".join(OPTIMISATIONS)]}
    for i, name in enumerate(OPTIMISATIONS):
        off = OPTIMISATIONS[i + 1 :]
        variants[LABELS[name]] = [*common, "--disable", ",".join(off)] if off else common
    if a.last:
        variants = dict(list(variants.items())[-a.last :])
    print(f"ablation, {a.repeats} x {len(variants)} variants, {a.steps} steps each")
    runs = alternate("bench.train_throughput", variants, a.repeats)
    rows, prev = [], None
    for label, r in runs.items():
        sps, cpu, rss = best_samples_per_s(r), median(r, "cpu_ms_per_sample"), median(r, "peak_rss_mib")
        step = "-" if prev is None else f"{sps / prev[0]:.2f}x, {prev[1] / cpu:.2f}x, {rss - prev[2]:+.0f} MiB"
        rows.append([label, sps, median(r, "samples_per_s"), cpu, rss, step])
        prev = (sps, cpu, rss)
    first, last = runs[list(runs)[0]], runs[list(runs)[-1]]
    total = median(first, "cpu_ms_per_sample") / median(last, "cpu_ms_per_sample")
    wall = best_samples_per_s(last) / best_samples_per_s(first)
    md = "\n\n".join(
        [
            f"vembed alone, {'full fine-tuning' if a.full else 'LoRA r=16'}, batch 32, max_seq_length 128, fp32, "
            f"2 threads; medians of {a.repeats} "
            f"alternating runs of {a.steps} steps (timing from the end of step {a.warmup}). Each row adds one "
            "optimisation to the row above; the last row is vembed as shipped.",
            md_table(
                [
                    "variant",
                    "samples/s (each step's best run)",
                    "samples/s (median run)",
                    "CPU ms / sample",
                    "peak RSS MiB",
                    "vs row above (samples/s, CPU time, RSS)",
                ],
                rows,
            ),
            f"**First row to last: {wall:.2f}x samples/s (each step's best run), {total:.2f}x less CPU time per sample, "
            f"{median(last, 'peak_rss_mib') - median(first, 'peak_rss_mib'):+.0f} MiB peak RSS.**",
            machine_line(info, os.getloadavg()),
        ]
    )
    print(md)
    save_report(a.name, md, {"machine": info, "runs": runs})


if __name__ == "__main__":
    main(sys.argv[1:])
