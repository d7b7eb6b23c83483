"""FSDP with LoRA: the accelerate plugin, and whole-model state gathered from every rank's shards.

- FULL_SHARD with `use_orig_params=True`: frozen base weights and trainable LoRA weights share
  flat parameters, which FSDP1 only allows with the original parameters kept.
- One dtype: the loop loads the model in fp32 under FSDP (LoRA weights are fp32 too); bf16/fp16
  compute comes from the plugin's mixed-precision policy, which accelerate sets from the dtype.
- Transformer blocks (every transformers `GradientCheckpointingLayer`: BertLayer, Qwen3DecoderLayer,
  Qwen3-VL text and vision blocks, CLIPEncoderLayer) are the units of sharding.
- Saving is collective: every rank joins the gathers below; rank 0 writes.
- RAM-efficient loading: only local rank 0 of each node reads the checkpoint into host RAM; the
  other ranks build the model on the meta device (vembed.models.base, when accelerate's
  `cpu_ram_efficient_loading` is on). FSDP then materialises one shard unit at a time on those
  ranks (`param_init_fn`: `to_empty`) and `sync_module_states` broadcasts rank 0's weights into it
  before sharding, so a node needs about one full fp32 copy of the model in host RAM, not one
  per GPU (docs/fsdp-training.md has the figures).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from peft import PeftModel
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers.modeling_layers import GradientCheckpointingLayer

from vembed.config import TrainConfig
from vembed.models.base import Embedder
from vembed.training.compat import (
    FSDP_WRAPPED,
    allow_cpu_module_state_sync,
    fsdp_cpu_offload,
    fsdp_on_cpu,
    names_without_fsdp_wrappers,
)

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."


def fsdp_plugin(cfg: TrainConfig) -> FullyShardedDataParallelPlugin:
    on_gpu = torch.cuda.is_available()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1,
        sharding_strategy="FULL_SHARD",
        use_orig_params=True,
        auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={GradientCheckpointingLayer}),
        # Rank 0 of each node loads the weights, the others start on the meta device and receive
        # them. accelerate's plugin only accepts this with a GPU; on CPU process groups
        # activate_fsdp sets up the same thing.
        cpu_ram_efficient_loading=on_gpu,
        sync_module_states=on_gpu,
        state_dict_type="FULL_STATE_DICT",
        # GradCache's re-run chunks and gradient checkpointing both replay forwards; the loop's
        # own gradient checkpointing (non-reentrant) is used instead of FSDP's wrapper.
        activation_checkpointing=False,
    )
    if on_gpu:
        # The device is looked up when FSDP calls it: accelerate picks each rank's GPU after this.
        plugin.param_init_fn = materialize_in_place(lambda: torch.device("cuda", torch.cuda.current_device()))
    return plugin


def materialize_in_place(device: Callable[[], torch.device]) -> Callable[[nn.Module], None]:
    """FSDP's `param_init_fn` for modules on the meta device: empty storage on `device` (FSDP then
    broadcasts rank 0's values into it). `to_empty` alone would replace each nn.Parameter with a
    new object, leaving the optimizer (built before `prepare`) with the meta ones; swapping keeps
    the objects."""

    def init(module: nn.Module) -> None:
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            module.to_empty(device=device(), recurse=False)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)

    return init


def activate_fsdp(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Make sure the accelerator really shards, and say so when it cannot.

    accelerate 1.x turns its FSDP plugin on only for GPU-like devices; on CPU processes (gloo) it
    silently falls back to DDP. torch's FSDP1 itself runs on CPU with gloo, so there we switch
    the accelerator to it (that is what the CPU tests exercise). Rank-0 loading works there too:
    meta modules are materialised empty on the CPU, one FSDP unit at a time, then filled by FSDP's
    broadcast from rank 0.
    """
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        fsdp_on_cpu(state, plugin)
        plugin.sync_module_states = True
        plugin.param_init_fn = materialize_in_place(lambda: torch.device("cpu"))
        allow_cpu_module_state_sync()
        log.info("use_fsdp: FSDP (FULL_SHARD) on %d CPU processes over gloo", accelerator.num_processes)
    elif state.distributed_type == DistributedType.NO:
        log.warning("use_fsdp: a single process has nothing to shard with; training without FSDP")
    if accelerator.distributed_type == DistributedType.FSDP:
        # With both set, every rank but local rank 0 builds the model on the meta device
        # (vembed.models.base; accelerate's launcher sets the first only for FSDP configs).
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"


def gather_full_backbone_state(accelerator: Accelerator, embedder: Embedder) -> dict[str, torch.Tensor]:
    """The full backbone state dict, keyed as `embedder.backbone.state_dict()` keys it.

    Collective: every rank must call it. On GPUs the tensors land on the CPU of rank 0 only (other
    ranks get an empty dict); rank 0 writes the checkpoint. With LoRA only the
    trainable tensors (adapter weights and modules_to_save) are kept: PeftModel.save_pretrained
    picks the adapter's keys from this dict.
    """
    unwrapped = accelerator.unwrap_model(embedder)
    lora = any(not p.requires_grad for p in unwrapped.parameters())
    offload = fsdp_cpu_offload(accelerator.device)
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload, ignore_frozen_params=lora)
    state = get_model_state_dict(embedder, options=options)
    return {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}


def load_full_backbone_state(accelerator: Accelerator, embedder: Embedder, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) backbone state, e.g. an adapter checkpoint, into the sharded model.

    Collective: every rank calls it with the same full `state` (keys as in the backbone's state dict).
    """
    backbone = accelerator.unwrap_model(embedder).backbone
    names = adapter_key_names(backbone) if isinstance(backbone, PeftModel) else {k: k for k in state}
    if unknown := sorted(set(state) - set(names)):
        raise RuntimeError(f"weights do not fit the model: {unknown[:5]}")
    full = {BACKBONE_PREFIX + names[k]: v for k, v in state.items()}
    set_model_state_dict(embedder, full, options=StateDictOptions(full_state_dict=True, strict=False))


def adapter_key_names(backbone: PeftModel) -> dict[str, str]:
    """Saved adapter key -> the model's parameter name (peft drops the adapter name when saving).

    peft's own save function does the renaming: it is fed one distinct placeholder per trainable
    parameter, and the placeholders are recognised by identity on the way out.
    """
    from peft import get_peft_model_state_dict

    placeholders = {n.replace(FSDP_WRAPPED, ""): torch.empty(0) for n, p in backbone.named_parameters() if p.requires_grad}
    with names_without_fsdp_wrappers(backbone):
        saved = get_peft_model_state_dict(backbone, state_dict=placeholders, save_embedding_layers=False)
    by_id = {id(t): name for name, t in placeholders.items()}
    return {key: by_id[id(t)] for key, t in saved.items() if id(t) in by_id}


def gather_full_optimizer_state(accelerator: Accelerator, embedder: Embedder, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with every parameter's full (unsharded) tensors, keyed by parameter name.

    Collective; on GPUs the tensors land on rank 0's CPU.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=fsdp_cpu_offload(accelerator.device))
    return get_optimizer_state_dict(embedder, _inner(optimizer), options=options)


def load_full_optimizer_state(
    accelerator: Accelerator, embedder: Embedder, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Shard a full optimizer state (as gathered above) back onto every rank. Collective."""
    set_optimizer_state_dict(embedder, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # accelerate wraps the optimizer; the state-dict API needs the torch one.
    return getattr(optimizer, "optimizer", optimizer)
