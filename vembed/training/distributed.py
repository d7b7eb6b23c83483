"""Cross-device negatives: every query scores against the positives and hard negatives of all ranks.

The gather is differentiable (torch.distributed.nn.functional.all_gather): its backward sums,
over ranks, each rank's gradient for this rank's slice. Each rank's parameter gradient is then
d(sum_r loss_r)/d(theta through the local embeddings), and DDP's mean over ranks turns that into
d(mean_r loss_r)/d(theta): exactly the gradient of one process holding the whole batch, with no
extra loss scaling (tests/training/test_distributed.py proves it against a single process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from accelerate import Accelerator
from accelerate.utils import DistributedType


def forwards_in_lockstep(accelerator: Accelerator) -> bool:
    """FSDP all-gathers each unit's weights inside every forward, so all ranks must run the same
    number of forwards; a rank whose batch has fewer rows or no negatives runs stand-in forwards."""
    return accelerator.distributed_type == DistributedType.FSDP


def max_over_ranks(accelerator: Accelerator, value: int) -> int:
    t = torch.tensor([value], dtype=torch.long, device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_rows(x: torch.Tensor, differentiable: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's rows in rank order, keeping the autograd graph to the local rows
    (`differentiable`; content ids need none).

    Unequal row counts (last batches of an epoch) are padded to the largest for the collective and cut off again.
    """
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.size(0)], dtype=torch.long, device=x.device))
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    if x.size(0) < longest:
        # Padding built from x itself keeps this rank in the backward collective.
        x = torch.cat([x, x.new_zeros(longest - x.size(0), *x.shape[1:])])
    if differentiable:
        pieces = dist_fn.all_gather(x)
    else:
        pieces = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(pieces, x.contiguous())
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes, strict=True)]), sizes


def gather_candidates(
    accelerator: Accelerator,
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(local queries, all positives, all hard negatives, labels) for the loss.

    Query i of rank r is paired with its own positive: row offset(r) + i of the gathered positives.
    """
    p_all, sizes = all_gather_rows(p)
    offset = sum(sizes[: accelerator.process_index])
    labels = torch.arange(offset, offset + q.size(0), device=q.device)
    # Every rank joins the negatives gather, even one whose rows have none (a collective
    # that only some ranks enter hangs); an empty slice of p keeps it in the graph.
    local_negatives = n if n is not None else p[:0]
    n_all, _ = all_gather_rows(local_negatives)
    return q, p_all, (n_all if n_all.size(0) else None), labels
