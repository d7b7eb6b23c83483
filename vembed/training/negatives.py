"""Cross-process negatives: the seam where embeddings are gathered for the loss."""

from __future__ import annotations

import torch
from accelerate import Accelerator


def gather_for_loss(
    accelerator: Accelerator,
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor | None,
    cross_device: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(query, positives, negatives, labels) for the loss. Single process: unchanged."""
    if accelerator.num_processes == 1 or not cross_device:
        return q, p, n, None
    from vembed.training.distributed import gather_candidates

    return gather_candidates(accelerator, q, p, n)
