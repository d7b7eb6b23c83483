"""One optimisation step's forward/backward. GradCache provides an alternative."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from vembed.config import TrainConfig
from vembed.models.base import Embedder
from vembed.training.distributed import forwards_in_lockstep, max_over_ranks
from vembed.training.grad_cache import StepFn, grad_cache_step, splitter_for
from vembed.training.negatives import FalseNegativeMasker, batch_loss


def plain_step(
    accelerator: Accelerator, embedder: Embedder, loss_fn: torch.nn.Module, cross_device: bool,
    masker: FalseNegativeMasker | None = None,
) -> StepFn:  # fmt: skip
    lockstep = forwards_in_lockstep(accelerator)

    def step(batch: dict[str, Any]) -> torch.Tensor:
        stand_in = lockstep and bool(max_over_ranks(accelerator, "negatives" in batch))
        q = embedder(**batch["query"])
        p = embedder(**batch["positive"])
        n = embedder(**batch["negatives"]) if "negatives" in batch else None
        # FSDP: every rank runs as many forwards as the others (checked before this step's forwards)
        if stand_in and n is None:
            one_row = splitter_for(accelerator.unwrap_model(embedder))(batch["positive"], 1)[0]
            n = embedder(**one_row)[:0]
        loss = batch_loss(accelerator, loss_fn, masker, batch, q, p, n, cross_device)
        accelerator.backward(loss)
        return loss

    return step


def make_step(
    cfg: TrainConfig, accelerator: Accelerator, embedder: Embedder, loss_fn: torch.nn.Module,
    masker: FalseNegativeMasker | None = None,
) -> StepFn:  # fmt: skip
    if cfg.use_gradient_cache:
        return grad_cache_step(cfg, accelerator, embedder, loss_fn, masker=masker)
    return plain_step(accelerator, embedder, loss_fn, cfg.cross_device_negatives, masker)
