"""Where a training step's time goes: torch.profiler over a few steps of vembed or sentence-transformers.

    .venv/bin/python -m bench.profile_step vembed [--disable length_grouping,lean_dropout,...]
    .venv/bin/python -m bench.profile_step st

Same run as bench.train_throughput (LoRA r=16 on query/value, batch 32, max_seq_length 128, fp32,
2 threads); profiles steps 2-3 (after one warm-up step) and prints the operators by self CPU time,
grouped into what they do. Writes bench/results/profile_<tool>[_<name>].md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

from bench.common import CHILD_ENV, child_setup, demo_data, md_table, minilm_path, save_report

# Operator -> what it is doing in a BERT training step.
GROUPS = {
    "matmul (linear layers, attention)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
    "dropout (random masks and their products)": ("aten::bernoulli_", "aten::uniform_", "aten::div_", "aten::ge"),
    "elementwise mul": ("aten::mul", "aten::mul_"),
    "copies (contiguous, transposes)": ("aten::copy_", "aten::clone"),
    "attention masking / safe softmax": ("aten::where", "aten::all", "aten::isneginf", "aten::masked_fill_"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "layer norm, GELU": (
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
        "aten::gelu",
        "aten::gelu_backward",
    ),
    "add": ("aten::add", "aten::add_"),
    "optimizer": ("aten::_fused_adamw_", "aten::_foreach_mul_", "aten::_foreach_add_", "aten::_foreach_addcmul_"),
}


def profile_vembed(data: str, model: str, off: list[str], steps: int):
    import torch

    import vembed.training.loop as loop
    from bench.trainers import disable
    from vembed.config import load_config
    from vembed.losses import build_loss
    from vembed.training.data import EpochBatchSampler, PairCollator, PairDataset, load_records

    extra: dict = {}
    disable(off, extra)
    cfg = load_config(
        None,
        {
            "model_name": model,
            "data_path": data,
            "batch_size": 32,
            "max_seq_length": 128,
            "torch_dtype": "float32",
            "lora_target_modules": ["query", "value"],
            **extra,
        },
    )
    embedder = loop.build_embedder(cfg, torch.float32)
    records, _ = load_records(cfg.data_path, "error")
    dataset = PairDataset(records, embedder)
    lengths = dataset.lengths() if cfg.group_by_length else None
    sampler = EpochBatchSampler(len(dataset), 32, cfg.seed, lengths)
    collate = PairCollator(embedder)
    loss_fn = build_loss(cfg, embedder.dim)
    params = [p for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    embedder.train()
    batches = iter(sampler)

    def step():
        batch = collate([dataset[i] for i in next(batches)])
        loss = loss_fn(embedder(**batch["query"]), embedder(**batch["positive"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def profile_st(data: str, model: str, steps: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer, losses

    from bench.trainers import read_pairs

    st = SentenceTransformer(model, device="cpu")
    st.max_seq_length = 128
    st[0].model = get_peft_model(
        st[0].model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["query", "value"])
    )
    queries, positives = read_pairs(data)
    loss_fn = losses.MultipleNegativesRankingLoss(st, scale=20.0)
    params = [p for p in st.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    st.train()
    order = torch.randperm(len(queries), generator=torch.Generator().manual_seed(42)).tolist()
    starts = iter(range(0, len(order), 32))

    def step():
        idx = order[next(starts) :][:32]
        features = [st.preprocess([queries[i] for i in idx]), st.preprocess([positives[i] for i in idx])]
        loss = loss_fn(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tool", choices=["vembed", "st"])
    p.add_argument("--disable", default="", help="vembed only: optimisations to turn off (see bench.trainers)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--name", default="")
    a = p.parse_args(argv)
    os.environ.update(CHILD_ENV)
    child_setup()
    from torch.profiler import ProfilerActivity, profile

    data, model = demo_data()["train"], minilm_path()
    off = [x for x in a.disable.split(",") if x]
    step = profile_vembed(data, model, off, a.steps) if a.tool == "vembed" else profile_st(data, model, a.steps)
    step()  # warm-up
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    grouped: dict[str, float] = defaultdict(float)
    for e in events:
        group = next((g for g, ops in GROUPS.items() if e.key in ops), "other")
        grouped[group] += e.self_cpu_time_total
    rows = [[g, t / 1e6 / a.steps, f"{100 * t / total:.1f}%"] for g, t in sorted(grouped.items(), key=lambda x: -x[1])]
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    label = a.tool + (f" ({a.disable} off)" if a.disable else "")
    md = "\n\n".join(
        [
            f"{label}: {a.steps} profiled steps, {wall / a.steps:.2f} s wall per step under the profiler, "
            f"{total / 1e6 / a.steps:.2f} s of operator time per step.",
            md_table(["what", "s / step", "share"], rows),
            md_table(
                ["operator", "s / step", "calls / step"],
                [[e.key, e.self_cpu_time_total / 1e6 / a.steps, e.count // a.steps] for e in top],
            ),
        ]
    )
    print(md)
    name = "profile_" + a.tool + (f"_{a.name}" if a.name else "")
    save_report(name, md, {"groups": dict(grouped), "steps": a.steps, "wall_s": wall})


if __name__ == "__main__":
    main(sys.argv[1:])
