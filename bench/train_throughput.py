"""Training throughput: vembed vs sentence-transformers on the same LoRA run.

    .venv/bin/python -m bench.train_throughput [--repeats 3] [--steps 30]

Each run is a fresh process; the two alternate A B A B. Prints medians, the ratio and the losses,
and writes bench/results/train_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys

from bench.common import (
    alternate,
    best_samples_per_s,
    child_setup,
    demo_data,
    emit,
    machine,
    machine_line,
    md_table,
    median,
    save_report,
)


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("tool", choices=["vembed", "st"])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--disable", default="", help="vembed only: comma-separated optimisations to turn off")
    a = p.parse_args(argv)
    child_setup()
    from bench.trainers import train_st, train_vembed

    if a.tool == "vembed":
        off = [x for x in a.disable.split(",") if x]
        emit(train_vembed(a.data, a.model, a.steps, a.warmup, lora=not a.full, off=off))
    else:
        emit(train_st(a.data, a.model, a.steps, a.warmup, lora=not a.full))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=31, help="optimizer steps per run (one epoch of the demo data)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--name", default="train_throughput")
    a = p.parse_args(argv)
    from bench.common import minilm_path

    info = machine()
    data = demo_data()
    model = minilm_path()
    common = ["--data", data["train"], "--model", model, "--steps", str(a.steps), "--warmup", str(a.warmup)]
    print(f"training throughput, {a.repeats} x (vembed, sentence-transformers), {a.steps} steps each")
    runs = alternate("bench.train_throughput", {"vembed": ["vembed", *common], "st": ["st", *common]}, a.repeats)
    v, s = runs["vembed"], runs["st"]
    rows = []
    for label, r in (("vembed", v), ("sentence-transformers", s)):
        rows.append(
            [
                label,
                best_samples_per_s(r),
                median(r, "samples_per_s"),
                median(r, "cpu_ms_per_sample"),
                median(r, "s_per_step"),
                median(r, "peak_rss_mib"),
                median(r, "setup_s"),
                median(r, "loss_first"),
                median(r, "loss_last5"),
                r[0]["trainable_params"],
            ]
        )
    speed = best_samples_per_s(v) / best_samples_per_s(s)
    median_speed = median(v, "samples_per_s") / median(s, "samples_per_s")
    cpu_speed = median(s, "cpu_ms_per_sample") / median(v, "cpu_ms_per_sample")
    mem = median(v, "peak_rss_mib") / median(s, "peak_rss_mib")
    table = md_table(
        [
            "tool",
            "samples/s (each step's best run)",
            "samples/s (median run)",
            "CPU ms / sample",
            "s/step",
            "peak RSS MiB",
            f"setup + first {a.warmup} steps s",
            "loss step 1",
            f"mean loss steps {a.steps - 4}-{a.steps}",
            "trainable params",
        ],
        rows,
    )
    each = md_table(
        ["run", "vembed samples/s", "ST samples/s", "vembed CPU ms/sample", "ST CPU ms/sample", "vembed RSS MiB",
         "ST RSS MiB", "load avg"],
        [
            [i + 1, x["samples_per_s"], y["samples_per_s"], x["cpu_ms_per_sample"], y["cpu_ms_per_sample"],
             x["peak_rss_mib"], y["peak_rss_mib"], y["load_avg_1m"]]
            for i, (x, y) in enumerate(zip(v, s, strict=True))
        ],
    )
    md = "\n\n".join(
        [
            f"Medians of {a.repeats} alternating runs, {a.steps} steps each, timing from the end of step {a.warmup}.",
            table,
            f"**vembed / sentence-transformers: {speed:.2f}x samples/s (each step's best run; {median_speed:.2f}x "
            f"between median runs), {cpu_speed:.2f}x by CPU time per sample, {mem:.2f}x peak RSS.**",
            "Each run:",
            each,
            machine_line(info, os.getloadavg()),
        ]
    )
    print(md)
    save_report(
        a.name, md, {"machine": info, "runs": runs, "speed_ratio": speed, "median_speed_ratio": median_speed, "cpu_ratio": cpu_speed,
         "rss_ratio": mem}
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main(sys.argv[1:])
