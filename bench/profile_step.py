"""Where a training step's time goes: torch.profiler over a few steps of vembed or sentence-transformers.

    .venv/bin/python -m bench.profile_step vembed [--disable length_grouping,lean_dropout,...]
    .venv/bin/python -m bench.profile_step st

The training run of bench.train_throughput (LoRA r=16 on query/value, batch 32, max_seq_length 128,
fp32, 2 threads); profiles steps 2-3 (after one warm-up step) and prints the operators by self CPU time,
grouped into what they do. Writes bench/results/profile_<tool>[_<name>].md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from bench.common import child_setup, demo_data, machine, md_table, minilm_path, report

# What the aten operators (names without "aten::") are doing in a BERT training step.
GROUPS = {
    "matmul (linear layers, attention)": "mm addmm bmm matmul",
    "dropout (random masks and their products)": "bernoulli_ uniform_ div_ ge",
    "elementwise mul": "mul mul_",
    "copies (contiguous, transposes)": "copy_ clone",
    "attention masking / safe softmax": "where all isneginf masked_fill_",
    "softmax": "_softmax _softmax_backward_data",
    "layer norm, GELU": "native_layer_norm native_layer_norm_backward gelu gelu_backward",
    "add": "add add_",
    "optimizer": "_fused_adamw_ _foreach_mul_ _foreach_add_ _foreach_addcmul_",
}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tool", choices=["vembed", "st"])
    p.add_argument("--disable", default="", help="vembed only: optimisations to turn off (see bench.trainers)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--name", default="")
    a = p.parse_args(argv)
    child_setup()
    from torch.profiler import ProfilerActivity, profile, schedule

    from bench.trainers import train_st, train_vembed

    info, data, model = machine(), demo_data()["train"], minilm_path()
    off = [x for x in a.disable.split(",") if x]
    train, kw = (train_vembed, {"off": off}) if a.tool == "vembed" else (train_st, {})
    # The real training run of bench.train_throughput; the profiler skips the first (warm-up) step.
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=0, active=a.steps, repeat=1)) as prof:
        result = train(data, model, 1 + a.steps, 1, lora=True, on_step=prof.step, **kw)
    wall = sum(result["step_s"])
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    grouped: Counter[str] = Counter()
    for e in events:
        group = next((g for g, ops in GROUPS.items() if e.key.removeprefix("aten::") in ops.split()), "other")
        grouped[group] += e.self_cpu_time_total
    rows = [[g, t / 1e6 / a.steps, f"{100 * t / total:.1f}%"] for g, t in grouped.most_common()]
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    label = a.tool + (f" ({a.disable} off)" if a.disable else "")
    name = "profile_" + a.tool + (f"_{a.name}" if a.name else "")
    report(name, [
        f"{label}: {a.steps} profiled steps, {wall / a.steps:.2f} s wall per step under the profiler, "
        f"{total / 1e6 / a.steps:.2f} s of operator time per step.",
        md_table(["what", "s / step", "share"], rows),
        md_table(["operator", "s / step", "calls / step"],
                 [[e.key, e.self_cpu_time_total / 1e6 / a.steps, e.count // a.steps] for e in top]),
    ], {"groups": dict(grouped), "steps": a.steps, "wall_s": wall}, info)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
