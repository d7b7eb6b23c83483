"""Runs under `accelerate launch` (two CPU processes, gloo) for tests/training/test_distributed.py.

1. Sharding: which records each rank sees in one epoch of the prepared loader.
2. Gradients: loss and all-reduced parameter gradients of the first global batch, for the plain
   step and GradCache, with cross-device negatives on and off; and how many gradient buckets DDP
   all-reduced in each step.
3. A full `train()` run of the same config (last: it ends the process group).

Rank 0 writes everything to OUT/result.json and OUT/grads-*.safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from tests.support.scaleout_helpers import perturb_lora_b
from vembed.config import load_config
from vembed.training import train
from vembed.training.data import EpochBatchSampler, PairCollator, PairDataset, load_records
from vembed.training.loop import build_accelerator, build_embedder
from vembed.training.losses import build_loss
from vembed.training.step import make_step


def main(config_path: str, out_dir: str) -> None:
    out = Path(out_dir)
    cfg = load_config(config_path)
    accelerator, dtype = build_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    embedder = build_embedder(cfg, dtype)
    perturb_lora_b(embedder)
    records, _ = load_records(cfg.data_path, cfg.on_bad_record)
    dataset = PairDataset(records, embedder)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed), collate_fn=PairCollator(embedder)
    )
    optimizer = torch.optim.SGD([p for p in embedder.parameters() if p.requires_grad], lr=0.0)
    model, optimizer, loader = accelerator.prepare(embedder, optimizer, loader)
    tokenizer = embedder.tokenizer

    # 1. which queries this rank sees in one epoch
    seen = []
    for batch in loader:
        seen += tokenizer.batch_decode(batch["query"]["input_ids"], skip_special_tokens=True)
    all_seen = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(all_seen, seen)

    # 2. gradients of the first global batch, counting DDP's gradient all-reduces
    all_reduces: list[int] = []

    def counting_all_reduce(state, bucket):
        all_reduces.append(1)
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_all_reduce)
    first = next(iter(loader))
    result: dict = {"seen": all_seen, "num_processes": accelerator.num_processes, "losses": {}, "all_reduces": {}}
    loss_fn = build_loss(cfg, embedder.dim)
    for name, overrides in {
        "plain": {"use_gradient_cache": False},
        "grad_cache": {"use_gradient_cache": True},
        "plain_local_negatives": {"use_gradient_cache": False, "cross_device_negatives": False},
    }.items():
        variant = cfg.model_copy(update=overrides)
        step = make_step(variant, accelerator, model, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        before = len(all_reduces)
        loss = step(first)
        result["all_reduces"][name] = len(all_reduces) - before
        result["losses"][name] = accelerator.reduce(loss.detach().float(), "mean").item()
        grads = {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
        if accelerator.is_main_process:
            save_file(grads, str(out / f"grads-{name}.safetensors"))
    if accelerator.is_main_process:
        (out / "result.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()

    # 3. a whole training run (it ends the process group)
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
