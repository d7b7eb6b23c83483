"""Checkpoints: atomic, checksummed, pickle-free, rotated.

Layout of `output_dir/checkpoint-N/`:
  adapter_config.json, adapter_model.safetensors   (or a full model for use_lora: false)
  vembed_config.yaml        resolved TrainConfig
  embedder.json             pooling/family spec needed to rebuild the embedder
  trainer_state.json        step, epoch, position in the epoch, log history
  optimizer.safetensors + optimizer.json, scheduler.json, rng.safetensors + rng.json
  checksums.json            sha256 of every file above; written last
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vembed.atomic_dir import staged_dir
from vembed.errors import CheckpointError
from vembed.integrity import verify_checkpoint as verify_checkpoint  # re-exported: resume checks it here
from vembed.integrity import write_checksums

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


@contextlib.contextmanager
def staged_checkpoint(
    output_dir: Path, step: int, save_total_limit: int | None, protect: Sequence[Path] = ()
) -> Iterator[Path]:
    """Yield a temporary directory to write checkpoint `step` into; on success its checksums are
    written last and it is renamed to `checkpoint-N`. On any failure (ENOSPC, Ctrl-C, an exception)
    the temporary directory is removed and the checkpoints already there are untouched. Rotation
    never deletes a `protect`ed checkpoint (the best one)."""
    final = output_dir / f"checkpoint-{step}"
    # An existing checkpoint-N is a retry of the same step (ours): it is replaced whole.
    with staged_dir(final, may_replace=lambda _: None, tmp_name=f".tmp-checkpoint-{step}-{os.getpid()}") as tmp:
        yield tmp
        write_checksums(tmp)
        _fsync_dir(tmp)
    _fsync_dir(output_dir)
    rotate_checkpoints(output_dir, save_total_limit, keep=final, protect=protect)
    for stale in output_dir.glob(".tmp-checkpoint-*"):  # leftovers of killed runs
        shutil.rmtree(stale, ignore_errors=True)


def rotate_checkpoints(output_dir: Path, limit: int | None, keep: Path, protect: Sequence[Path] = ()) -> None:
    """Keep at most `limit` checkpoints: `keep`, the `protect`ed ones (the best checkpoint) and the
    newest others; a protected checkpoint is never deleted, even when that leaves limit + 1."""
    if not limit:
        return
    kept = {keep, *protect}
    ckpts = [c for c in list_checkpoints(output_dir) if c not in kept]
    room = max(0, limit - len([c for c in kept if c.is_dir()]))
    for old in ckpts[: max(0, len(ckpts) - room)]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- optimizer / scheduler / RNG state without pickle ---------------------------------


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, state: dict[str, Any] | None = None) -> None:
    """`state` replaces optimizer.state_dict() (FSDP: the gathered full state, keyed by parameter name)."""
    sd = state if state is not None else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def read_optimizer_state(directory: Path) -> dict[str, Any]:
    """The state dict `save_optimizer` wrote: parameter ids (ints) or, under FSDP, parameter names."""
    meta = json.loads((directory / "optimizer.json").read_text())
    tensors = _load_tensors(directory / "optimizer.safetensors")
    state: dict[int | str, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, name = key.rsplit(".", 1)  # state names (exp_avg, step) have no dots; FSDP's parameter names do
        state.setdefault(_param_key(pid), {})[name] = t
    for pid, kv in meta["scalars"].items():
        state.setdefault(_param_key(pid), {}).update(kv)
    return {"state": state, "param_groups": meta["param_groups"]}


def _param_key(pid: str) -> int | str:
    return int(pid) if pid.isdigit() else pid


def save_rng(directory: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py_state = random.getstate()
    save_file(tensors, str(directory / "rng.safetensors"))
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    (directory / "rng.json").write_text(json.dumps(meta))


def load_rng(directory: Path) -> None:
    tensors = _load_tensors(directory / "rng.safetensors")
    meta = json.loads((directory / "rng.json").read_text())
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
