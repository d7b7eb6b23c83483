"""Checkpoints: the Checkpointer owns saving and resuming; each checkpoint is atomic, has a
manifest, holds no pickle, and old ones are rotated away.

Layout of `output_dir/checkpoint-N/`:
  adapter_config.json, adapter_model.safetensors   (or a full model for use_lora: false)
  vembed_config.yaml        resolved TrainConfig
  embedder.json             pooling/family spec needed to rebuild the embedder
  embedding_rotation.safetensors   with use_mrl: the rotation of these weights (vembed.models.rotation)
  trainer_state.json        TrainState: step, epoch, position in the epoch, log and eval history, best
  optimizer.safetensors + optimizer.json, scheduler.json, rng.safetensors + rng.json
  manifest.json             size and sha256 of every file above; written last (vembed.artifacts.integrity)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vembed.artifacts.atomic_dir import staged_dir
from vembed.artifacts.integrity import verify_checkpoint, write_manifest
from vembed.config import TrainConfig
from vembed.errors import CheckpointError, ConfigError
from vembed.models.base import Embedder
from vembed.models.rotation import save_rotation
from vembed.training.compat import names_without_fsdp_wrappers

log = logging.getLogger(__name__)
# A resume refuses a checkpoint whose run differs in these: the weights or the batches would not fit.
RESUME_KEYS = (
    "model_name", "use_lora", "lora_r", "lora_target_modules", "use_dora", "modules_to_save", "loraplus_lr_ratio",
    "batch_size", "seed", "group_by_length",
)  # fmt: skip


@dataclass
class TrainState:
    """Where a run is, as trainer_state.json records it; a resume continues from it exactly."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per logging step
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation
    best: dict[str, Any] | None = None  # BestTracker.to_dict(): best metric and patience so far

    def to_json(self) -> dict[str, Any]:
        """Without an empty eval_history or a best that tracks no metric."""
        present = {"eval_history": bool(self.eval_history), "best": bool(self.best and self.best.get("metric"))}
        return {k: v for k, v in asdict(self).items() if present.get(k, True)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        return cls(**{f.name: data[f.name] for f in fields(cls) if data.get(f.name) is not None})


class Checkpointer:
    """Saves and restores all a run needs to continue exactly: weights (gathered from every rank's
    shards under FSDP), optimizer, scheduler, RNG streams and the TrainState. Every rank calls
    `save` and `load` (FSDP's gathers are collective); rank 0 writes."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator) -> None:
        self.cfg, self.accelerator, self.out = cfg, accelerator, Path(cfg.output_dir)
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP  # shards to gather and scatter

    def resume_dir(self) -> Path | None:
        """The checkpoint `resume_from_checkpoint` names (`latest`: the newest in output_dir), checked
        before the run writes anything (its config.yaml must keep describing the checkpoints there)."""
        want = self.cfg.resume_from_checkpoint
        if not want:
            return None
        if want == "latest":
            found = latest_checkpoint(self.out)
            if found is None:  # a warning, so that it shows without any logging setup: the user asked to resume
                log.warning("resume_from_checkpoint: latest, but %s has no checkpoint; starting fresh", self.out)
                return None
        elif not Path(want).is_dir():
            raise CheckpointError(f"resume_from_checkpoint: {want} is not a checkpoint directory")
        elif (newest := latest_checkpoint(want)) is not None:  # a run directory, not one of its checkpoints
            raise CheckpointError(f"resume_from_checkpoint: {want} is a training run; give one of its checkpoints, e.g. {newest}")
        else:
            found = Path(want)
        self._check_resumable(found)
        return found

    def _check_resumable(self, directory: Path) -> None:
        """An intact checkpoint of the same run (RESUME_KEYS)."""
        verify_checkpoint(directory)
        saved = saved_config(directory)
        for key in RESUME_KEYS:
            # A key that a checkpoint of an earlier version lacks had its default there (use_dora: false).
            theirs = saved.get(key, TrainConfig.model_fields[key].get_default(call_default_factory=True))
            if theirs != getattr(self.cfg, key):
                raise CheckpointError(f"{directory}: cannot resume, {key} was {theirs!r} there but is {getattr(self.cfg, key)!r} now")

    def save(self, embedder: Embedder, optimizer: Any, scheduler: Any, state: TrainState, protect: str | None) -> Path:
        """Write checkpoint-N for `state`. It is written into a temporary sibling and renamed when
        complete (manifest last); on any failure (ENOSPC, Ctrl-C, an exception) the sibling is removed
        and the checkpoints already there are untouched. Rotation never deletes `protect` (the best)."""
        from vembed.training import fsdp

        cfg, acc, final = self.cfg, self.accelerator, self.out / f"checkpoint-{state.global_step}"
        model_state = fsdp.gather_full_backbone_state(acc, embedder) if self.fsdp else None
        optimizer_state = fsdp.gather_full_optimizer_state(acc, embedder, optimizer) if self.fsdp else None
        if acc.is_main_process:
            tmp_name = f".tmp-checkpoint-{state.global_step}-{os.getpid()}"
            # An existing checkpoint-N is a retry of the same step (ours): it is replaced whole.
            with staged_dir(final, may_replace=lambda _: None, tmp_name=tmp_name) as tmp:
                unwrapped: Embedder = acc.unwrap_model(embedder)
                # peft finds the adapter by module name, which FSDP's wrappers change.
                with names_without_fsdp_wrappers(unwrapped.backbone) if self.fsdp else contextlib.nullcontext():
                    _save_model(unwrapped, tmp, model_state, cfg.use_lora)
                cfg.save(tmp / "vembed_config.yaml")
                (tmp / "embedder.json").write_text(json.dumps(unwrapped.spec.to_dict(), indent=1))
                if unwrapped.rotation is not None:
                    save_rotation(tmp, unwrapped.rotation)
                save_optimizer(optimizer, tmp, optimizer_state)
                (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
                save_rng(tmp)
                (tmp / "trainer_state.json").write_text(json.dumps(state.to_json(), indent=1))
                write_manifest(tmp)
                _fsync_dir(tmp)
            _fsync_dir(self.out)
            self.rotate(keep={final, *([self.out / protect] if protect else [])})
            for stale in self.out.glob(".tmp-checkpoint-*"):  # leftovers of killed runs
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def rotate(self, keep: set[Path]) -> None:
        """Keep at most save_total_limit checkpoints: `keep` (this one and the best) and the newest
        others; `keep` is never deleted, even when that leaves limit + 1."""
        if not (limit := self.cfg.save_total_limit):
            return
        others = [c for c in list_checkpoints(self.out) if c not in keep]
        room = max(0, limit - len([c for c in keep if c.is_dir()]))
        for old in others[: max(0, len(others) - room)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, directory: Path, embedder: Embedder, optimizer: Any, scheduler: Any) -> TrainState:
        """Restore the checkpoint `resume_dir` returned (so: checked) into the prepared objects."""
        from vembed.training import fsdp

        weights = load_file(str(directory / ("adapter_model.safetensors" if self.cfg.use_lora else "model.safetensors")))
        optimizer_state = read_optimizer_state(directory)
        if self.fsdp:
            fsdp.load_full_backbone_state(self.accelerator, embedder, weights)
            fsdp.load_full_optimizer_state(self.accelerator, embedder, optimizer, optimizer_state)
        else:
            _load_weights(self.accelerator.unwrap_model(embedder), weights)
            optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))
        load_rng(directory)
        return TrainState.from_json(json.loads((directory / "trainer_state.json").read_text()))


def _save_model(embedder: Embedder, directory: Path, state: dict | None, lora: bool) -> None:
    """The adapter, or (full fine-tuning) the model with its tokenizer or processor."""
    kwargs: dict[str, Any] = {"state_dict": state} if state is not None else {}
    if lora:  # "auto" would look the base model up on the hub to decide about embedding layers
        kwargs["save_embedding_layers"] = False
    embedder.backbone.save_pretrained(directory, safe_serialization=True, **kwargs)
    if not lora and embedder.processor is not None:
        embedder.processor.save_pretrained(directory)


def _load_weights(embedder: Embedder, state: dict[str, torch.Tensor]) -> None:
    from peft import PeftModel, set_peft_model_state_dict

    if not isinstance(embedder.backbone, PeftModel):
        embedder.backbone.load_state_dict(state)
    elif unexpected := set_peft_model_state_dict(embedder.backbone, state).unexpected_keys:
        raise RuntimeError(f"adapter weights do not fit the model: {unexpected[:5]}")


_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    return next(reversed(list_checkpoints(output_dir)), None)


def saved_config(checkpoint: Path) -> dict[str, Any]:
    """The resolved config a checkpoint was saved with (vembed_config.yaml); {} when unreadable."""
    try:
        saved = yaml.safe_load((checkpoint / "vembed_config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def refuse_other_runs(cfg: TrainConfig) -> None:
    """A fresh run replaces the checkpoints in output_dir that share its step numbers and rotates the
    others away. Allowed only over checkpoints of this very config (a rerun, a restarted job pod);
    over another run's, a one-line ConfigError naming the first key that differs."""
    ours = yaml.safe_load(cfg.to_yaml())
    ours.pop("resume_from_checkpoint")  # a resumed run's checkpoints are that run's too
    for ckpt in list_checkpoints(cfg.output_dir):
        theirs = saved_config(ckpt)
        theirs.pop("resume_from_checkpoint", None)
        if theirs != ours:
            key = next((k for k in {**ours, **theirs} if theirs.get(k) != ours.get(k)), "vembed_config.yaml")
            raise ConfigError(
                f"output_dir: {ckpt} belongs to another run ({key} was {theirs.get(key)!r} there, is "
                f"{ours.get(key)!r} now) and a new run would replace or delete it: choose another output_dir, "
                "or continue that run with resume_from_checkpoint: latest"
            )


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
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    save_file(tensors, str(directory / "rng.safetensors"))
    meta = {
        "python": random.getstate(),  # (version, tuple of ints, gauss): JSON writes the tuples as lists
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    (directory / "rng.json").write_text(json.dumps(meta))


def load_rng(directory: Path) -> None:
    tensors = _load_tensors(directory / "rng.safetensors")
    meta = json.loads((directory / "rng.json").read_text())
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
