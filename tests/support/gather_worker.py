"""One rank of tests/training/test_distributed.py's gather test (torch.multiprocessing, gloo); kept light to import.

Ranks hold unequal rows: rank 0 three queries and two hard negatives, rank 1 one query and none.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vembed.training.distributed import gather_candidates
from vembed.training.losses import info_nce

ROWS = {"query": [3, 1], "positive": [3, 1], "negatives": [2, 0]}


def global_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(sum(v), 8, generator=g) for k, v in ROWS.items()}


def gather_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    full = global_tensors()
    local = {}
    for key, counts in ROWS.items():
        start = sum(counts[:rank])
        local[key] = full[key][start : start + counts[rank]].clone().requires_grad_()
    negatives = local["negatives"] if local["negatives"].size(0) else None
    accelerator = SimpleNamespace(process_index=rank)
    q, p_all, n_all, labels = gather_candidates(accelerator, local["query"], local["positive"], negatives)
    # The sum of per-query losses: the ranks' sums add up to the single process's sum.
    loss = info_nce(q, p_all, n_all, labels=labels) * q.size(0)
    loss.backward()
    result = {"labels": labels, "loss": loss.detach().reshape(1)}
    result.update({f"grad.{k}": v.grad for k, v in local.items() if v.grad is not None and v.size(0)})
    save_file(result, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()
