"""Every place training reaches into private or undocumented parts of accelerate, torch and peft.

Each entry names the version it was checked against (accelerate 1.15.0, torch 2.13.0, peft 0.21.2;
training uses no private transformers API as of 5.24.0). After an upgrade these break first:
tests/training/test_fsdp.py, tests/training/test_distributed.py and tests/training/test_grad_cache.py exercise every entry.
The attention kernel in vembed/models/attention.py has its own two (`torch._softmax_backward_data`,
`config._attn_implementation`); it stays there, since models must not import training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

# torch 2.13.0: undocumented helpers of torch.utils.checkpoint that record and restore the RNG state of
# the devices some tensors live on; GradCache replays each chunk's dropout with them.
from torch.utils.checkpoint import get_device_states, set_device_states  # noqa: F401 (re-exported)

# torch 2.13.0: the attribute under which FSDP1 keeps a wrapped unit's module, so it is part of every
# parameter and module name (torch.distributed.fsdp._common_utils.FSDP_WRAPPED_MODULE).
FSDP_WRAPPED = "_fsdp_wrapped_module."


def reset_accelerate_state() -> None:
    """accelerate 1.15.0 keeps its settings in process-wide singletons: a second run in one process
    (tests, notebooks, the pipeline runner) would inherit the first's precision. `_reset_state` is private."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def fsdp_on_cpu(state: AcceleratorState, plugin: FullyShardedDataParallelPlugin) -> None:
    """accelerate 1.15.0 turns its FSDP plugin on only for GPU-like devices and silently falls back to
    DDP on CPU processes. Its private `_shared_state` dicts are set by hand: both, because
    AcceleratorState copies PartialState's fields whenever it is constructed again. accelerate names
    the CPU "cpu:0", which FSDP refuses to match with "cpu" parameters."""
    state.fsdp_plugin = plugin
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
        shared["device"] = torch.device("cpu")


def allow_cpu_module_state_sync() -> None:
    """torch 2.13.0: FSDP1's `sync_module_states` refuses CPU tensors because NCCL cannot broadcast
    them; over gloo it can. The check is the private
    torch.distributed.fsdp._init_utils._check_module_states_for_sync_module_states."""
    import torch.distributed.fsdp._init_utils as fsdp_init

    fsdp_init._check_module_states_for_sync_module_states = lambda states: None


def fsdp_cpu_offload(device: torch.device) -> bool:
    """torch 2.13.0: with parameters already on the CPU, FSDP1's offload of full state dicts frees
    memory the state dict still points at (a segfault); CPU ranks each keep their own full copy."""
    return device.type != "cpu"


@contextlib.contextmanager
def names_without_fsdp_wrappers(module: nn.Module) -> Iterator[None]:
    """peft 0.21.2 finds adapter weights by module name and strips only a leading FSDP_WRAPPED;
    nested FSDP units (one per transformer block) put it mid-name, so peft would select nothing.
    This patches `module.named_modules` (on this rank, no collective) to show the unwrapped names."""
    original = module.named_modules

    def named_modules(*args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        for name, child in original(*args, **kwargs):
            yield name.replace(FSDP_WRAPPED, ""), child

    module.named_modules = named_modules  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.named_modules
