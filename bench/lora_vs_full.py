"""LoRA vs full fine-tuning in vembed: speed and peak memory on the same run.

    .venv/bin/python -m bench.lora_vs_full [--repeats 2] [--steps 10]

The training run of bench.train_throughput (all-MiniLM-L6-v2, demo data, batch 32, max_seq_length
128, fp32, 2 threads), once with LoRA r=16 on query/value and once with every weight trained,
alternating. Also prints what weights, gradients and AdamW state take in each mode, which is the
memory LoRA can save. Writes bench/results/lora_vs_full.{md,json}.
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

MIB = 2**20


def state_sizes(model: str) -> dict[str, float]:
    """MiB of weights, and of gradients + AdamW moments for each mode (fp32 everywhere)."""
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(model)
    total = sum(p.numel() for p in backbone.parameters())
    # LoRA r=16 on query and value: A [r, d_in] + B [d_out, r] per adapted Linear.
    lora = sum(
        16 * (m.in_features + m.out_features)
        for name, m in backbone.named_modules()
        if name.rsplit(".", 1)[-1] in ("query", "value")
    )
    return {
        "params_total": total,
        "params_lora": lora,
        "weights_mib": total * 4 / MIB,
        "full_grads_adam_mib": total * 4 * 3 / MIB,
        "lora_grads_adam_mib": lora * 4 * 3 / MIB,
    }


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=31)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--name", default="lora_vs_full")
    a = p.parse_args(argv)
    info = machine()
    data = demo_data()
    model = minilm_path()
    common = ["vembed", "--data", data["train"], "--model", model, "--steps", str(a.steps), "--warmup", str(a.warmup)]
    print(f"LoRA vs full fine-tuning, {a.repeats} x (lora, full), {a.steps} steps each")
    runs = alternate("bench.train_throughput", {"lora": common, "full": [*common, "--full"]}, a.repeats)
    sizes = state_sizes(model)
    lo, fu = runs["lora"], runs["full"]
    rows = [
        [
            label,
            r[0]["trainable_params"],
            best_samples_per_s(r),
            median(r, "samples_per_s"),
            median(r, "cpu_ms_per_sample"),
            median(r, "peak_rss_mib"),
            median(r, "loss_last5"),
        ]
        for label, r in (("LoRA r=16 (query, value)", lo), ("full fine-tuning", fu))
    ]
    speed = best_samples_per_s(lo) / best_samples_per_s(fu)
    cpu_speed = median(fu, "cpu_ms_per_sample") / median(lo, "cpu_ms_per_sample")
    saved = 1 - median(lo, "peak_rss_mib") / median(fu, "peak_rss_mib")
    state_share = sizes["full_grads_adam_mib"] / median(fu, "peak_rss_mib")
    md = "\n\n".join(
        [
            f"Medians of {a.repeats} alternating runs, {a.steps} steps each (timing from the end of step "
            f"{a.warmup}); same data, batch 32, max_seq_length 128, fp32, 2 threads.",
            md_table(
                [
                    "mode",
                    "trainable params",
                    "samples/s (each step's best run)",
                    "samples/s (median run)",
                    "CPU ms / sample",
                    "peak RSS MiB",
                    "mean loss last 5 steps",
                ],
                rows,
            ),
            f"**LoRA / full: {speed:.2f}x samples/s (each step's best run), {cpu_speed:.2f}x by CPU time; "
            f"LoRA's peak RSS is {100 * saved:.0f}% lower.**",
            md_table(
                ["memory item (fp32)", "MiB"],
                [
                    ["model weights (both modes)", sizes["weights_mib"]],
                    ["full fine-tuning: gradients + AdamW moments (3x weights)", sizes["full_grads_adam_mib"]],
                    ["LoRA: gradients + AdamW moments of the adapters", sizes["lora_grads_adam_mib"]],
                    ["full fine-tuning: that state as a share of its peak RSS", f"{100 * state_share:.0f}%"],
                ],
            ),
            machine_line(info, os.getloadavg()),
        ]
    )
    print(md)
    save_report(a.name, md, {"machine": info, "runs": runs, "sizes": sizes, "speed_ratio": speed})


if __name__ == "__main__":
    main(sys.argv[1:])
