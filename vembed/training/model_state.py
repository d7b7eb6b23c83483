"""Whole-model state for checkpoints: the seam where FSDP gathers shards."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft import PeftModel, set_peft_model_state_dict

from vembed.models.base import Embedder


def gather_model_state(accelerator: Accelerator, embedder: Embedder) -> dict[str, torch.Tensor] | None:
    """The backbone's full state dict when it is sharded (collective: every rank calls it);
    None when the unwrapped model already holds everything."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    from vembed.training.fsdp import gather_full_backbone_state

    return gather_full_backbone_state(accelerator, embedder)


def gather_optimizer_state(
    accelerator: Accelerator, embedder: Embedder, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """The optimizer state with unsharded tensors under FSDP (collective); None otherwise."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    from vembed.training.fsdp import gather_full_optimizer_state

    return gather_full_optimizer_state(accelerator, embedder, optimizer)


def load_optimizer_state(
    accelerator: Accelerator, embedder: Embedder, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    if accelerator.distributed_type == DistributedType.FSDP:
        from vembed.training.fsdp import load_full_optimizer_state

        load_full_optimizer_state(accelerator, embedder, optimizer, state)
        return
    optimizer.load_state_dict(state)


def load_model_state(accelerator: Accelerator, embedder: Embedder, state: dict[str, torch.Tensor]) -> None:
    if accelerator.distributed_type == DistributedType.FSDP:
        from vembed.training.fsdp import load_full_backbone_state

        load_full_backbone_state(accelerator, embedder, state)
        return
    backbone = accelerator.unwrap_model(embedder).backbone
    if isinstance(backbone, PeftModel):
        result = set_peft_model_state_dict(backbone, state)
        if result.unexpected_keys:
            raise RuntimeError(f"adapter weights do not fit the model: {result.unexpected_keys[:5]}")
        return
    backbone.load_state_dict(state)

