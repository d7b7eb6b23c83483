"""The training loop: one readable recipe on top of accelerate."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast_object_list, set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from vembed.config import TrainConfig
from vembed.data.images import RecordImages
from vembed.errors import CheckpointError, ConfigError, DataError
from vembed.losses import build_loss
from vembed.models import Embedder, load_embedder, resolve_dtype
from vembed.models.attention import use_lean_attention
from vembed.models.dropout import use_lean_dropout
from vembed.models.lora import apply_lora, count_parameters, enable_gradient_checkpointing
from vembed.training import checkpoint as ckpt
from vembed.training.data import EpochBatchSampler, PairCollator, PairDataset, load_records
from vembed.training.log import TrainingLog
from vembed.training.negatives import FalseNegativeMasker
from vembed.training.step import make_step
from vembed.training.validation import LOGGED, BestTracker, Validator

log = logging.getLogger(__name__)

MIXED_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}


@dataclass
class TrainResult:
    checkpoint_dir: Path
    global_step: int
    final_loss: float
    log_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    # One entry per evaluation: {"step", "val_loss", "val_ndcg@10", ...}
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    # With metric_for_best_model: the checkpoint with the best validation metric (never rotated away).
    best_checkpoint: Path | None = None
    best_metric: float | None = None
    stopped_early: bool = False


def build_accelerator(cfg: TrainConfig) -> tuple[Accelerator, torch.dtype]:
    """An Accelerator whose mixed precision matches the requested dtype."""
    dtype = resolve_dtype(cfg.torch_dtype)
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise ConfigError("torch_dtype: float16 needs a CUDA device; use bfloat16 or float32 on CPU")
    kwargs: dict[str, Any] = {
        "mixed_precision": MIXED_PRECISION[dtype],
        # Without CUDA, processes started by `accelerate launch`/torchrun must join one gloo
        # group (MULTI_CPU) rather than each train alone on the same output_dir.
        "cpu": not torch.cuda.is_available(),
        # Transformer buffers are constants. Broadcasting them before every forward is a collective
        # per forward, and ranks may run different numbers of forwards (rows without negatives).
        "kwargs_handlers": [DistributedDataParallelKwargs(broadcast_buffers=False)],
        # total_steps already counts per-process steps; by default accelerate would step the
        # scheduler num_processes times per optimizer step.
        "step_scheduler_with_optimizer": False,
    }
    if cfg.use_fsdp:
        from vembed.training.fsdp import fsdp_plugin

        kwargs["fsdp_plugin"] = fsdp_plugin(cfg)
    elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError("use_fsdp is false but accelerate was launched with an FSDP config; set use_fsdp: true")
    # accelerate keeps its settings in a process-wide singleton; a second run in the
    # same process (tests, notebooks, the pipeline runner) must not inherit the first's precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(**kwargs)
    if cfg.use_fsdp:
        from vembed.training.fsdp import activate_fsdp

        activate_fsdp(accelerator, kwargs["fsdp_plugin"])
    return accelerator, dtype


def build_embedder(cfg: TrainConfig, dtype: torch.dtype) -> Embedder:
    # Frozen base weights may live in bf16; trainable LoRA weights stay fp32 under autocast.
    load_dtype = dtype if cfg.use_lora and not cfg.use_fsdp else torch.float32
    embedder = load_embedder(cfg.model_name, cfg.pooling, cfg.max_seq_length, cfg.query_instruction, load_dtype)
    if cfg.use_lora:
        apply_lora(embedder, cfg)
    else:
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(embedder.backbone)
        trainable, total = count_parameters(embedder)
        log.info("full fine-tuning: %d trainable parameters", trainable)
    # Leaner dropout masks (and attention, on CPU) for training; after LoRA, so that the adapters'
    # own dropout layers are included. docs/benchmarks.md has the before/after figures.
    use_lean_dropout(embedder.backbone)
    use_lean_attention(embedder.backbone)
    return embedder


RUN_CONFIG_HEADER = "# vembed: the resolved config of this training run\n"


def _is_vembed_log(path: Path) -> bool:
    first = path.read_text(errors="replace").split("\n", 1)[0]
    return not first or " start model=" in first


def refuse_foreign_run_files(out: Path) -> None:
    """Training writes `config.yaml` and `training_log.txt` into `output_dir`; refuse to replace such
    files that a vembed run did not write (e.g. `output_dir: .` beside the user's own config.yaml).
    Ours: a config.yaml with RUN_CONFIG_HEADER or in a run directory (a vembed log or checkpoints)."""
    cfg_file, log_file = out / "config.yaml", out / "training_log.txt"
    foreign = None
    if log_file.is_file() and not _is_vembed_log(log_file):
        foreign = log_file
    elif cfg_file.is_file() and not cfg_file.read_text(errors="replace").startswith(RUN_CONFIG_HEADER):
        run_dir = log_file.is_file() or any(ckpt.list_checkpoints(out))
        foreign = None if run_dir else cfg_file
    if foreign is not None:
        raise ConfigError(
            f"output_dir: {foreign} exists and was not written by a vembed run; "
            "training would overwrite it: choose another output_dir"
        )


def train(cfg: TrainConfig) -> TrainResult:
    accelerator, dtype = build_accelerator(cfg)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    resume_dir = _resolve_resume(cfg, out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a directory")
    if accelerator.is_main_process:
        refuse_foreign_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(RUN_CONFIG_HEADER + cfg.to_yaml())

    embedder = build_embedder(cfg, dtype)
    # Applies retrieval_mode, resolves image paths against the data file's directory and checks
    # each image, so a bad one is reported as path:line.
    images = RecordImages(Path(cfg.data_path).parent, cfg.retrieval_mode, cfg.allow_images_outside_data_root)
    records, stats = load_records(cfg.data_path, cfg.on_bad_record, transform=images)
    if stats.skipped:
        log.warning("%s: %s", cfg.data_path, stats.summary())
    # The validation loss is taken over as many records as a training step's loss sees.
    loss_block = cfg.batch_size * (accelerator.num_processes if cfg.cross_device_negatives else 1)
    records, validator = build_validator(cfg, embedder, records, loss_block)
    dataset = PairDataset(records, embedder)  # image paths were resolved when the records were read
    sampler = EpochBatchSampler(
        len(dataset), cfg.batch_size, cfg.seed, dataset.lengths() if cfg.group_by_length else None
    )
    # A private generator: creating a DataLoader iterator draws a seed from it, and drawing
    # from the global RNG would shift dropout masks after a resume.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=PairCollator(embedder),
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    loss_fn = build_loss(cfg, embedder.dim)
    params = [p for p in embedder.parameters() if p.requires_grad]
    # The fused kernel does one pass over all parameters (CPU and CUDA); FSDP keeps the default.
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=None if cfg.use_fsdp else True
    )
    steps_per_epoch = math.ceil(len(sampler) / accelerator.num_processes)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    embedder, optimizer, loader, scheduler = accelerator.prepare(embedder, optimizer, loader, scheduler)
    masker = FalseNegativeMasker(accelerator, cfg.cross_device_negatives, enabled=cfg.mask_false_negatives)
    step_fn = make_step(cfg, accelerator, embedder, loss_fn, masker)

    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "history": []}
    if resume_dir is not None:
        state = _load_resume_state(resume_dir, accelerator, embedder, optimizer, scheduler, cfg)
        log.info("resumed from %s at step %d", resume_dir, state["global_step"])
    tracker = BestTracker(cfg.metric_for_best_model, cfg.greater_is_better, cfg.early_stopping_patience)
    tracker.load(state.get("best"))

    train_log = TrainingLog(out / "training_log.txt", enabled=accelerator.is_main_process, append=resume_dir is not None)
    if resume_dir is None:
        train_log.header(cfg, count_parameters(embedder), len(dataset), total_steps, accelerator)
    else:
        train_log.resumed(resume_dir, state["global_step"])
    history: list[dict[str, Any]] = state["history"]
    eval_history: list[dict[str, Any]] = state.get("eval_history") or []
    global_step = state["global_step"]
    eval_every = cfg.eval_steps or cfg.save_steps
    last_eval = global_step if resume_dir is not None else -1

    def evaluate(position: dict[str, int]) -> bool:
        """Validate at this step; True when it improved metric_for_best_model (so it is saved)."""
        nonlocal last_eval
        assert validator is not None
        metrics = validator.evaluate(accelerator, embedder, loss_fn)
        if accelerator.num_processes > 1:  # every rank decides from rank 0's figures
            metrics = broadcast_object_list([metrics])[0]
        improved = tracker.update(position["global_step"], metrics)
        entry = {"step": position["global_step"], **{f"val_{k}": metrics[k] for k in LOGGED}}
        eval_history.append(entry)
        train_log.eval(position["global_step"], {k: metrics[k] for k in LOGGED}, tracker.to_dict())
        last_eval = position["global_step"]
        return improved

    def save(position: dict[str, int]) -> None:
        nonlocal last_saved
        save_checkpoint(
            accelerator, embedder, optimizer, scheduler, cfg, position, history, tracker.to_dict(),
            tracker.best_checkpoint, eval_history,
        )  # fmt: skip
        last_saved = position["global_step"]
    progress = tqdm(
        total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="training"
    )
    embedder.train()
    window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
    last_saved = global_step if resume_dir is not None else -1
    stopped_early = False
    loss_value = float("nan")
    epoch = state["epoch"]
    batch_in_epoch = state["batch_in_epoch"]
    while global_step < total_steps and epoch < cfg.epochs:
        sampler.epoch = epoch
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        batch_in_epoch = skip
        for batch in batches:
            loss = step_fn(batch)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(embedder.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            batch_in_epoch += 1
            progress.update(1)
            loss_value = accelerator.reduce(loss.detach().float(), "mean").item()
            window_loss += loss_value
            window_samples += _batch_size(batch) * accelerator.num_processes
            if global_step % cfg.logging_steps == 0 or global_step == total_steps:
                n = global_step % cfg.logging_steps or cfg.logging_steps
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                entry = {
                    "step": global_step,
                    "epoch": round(epoch + batch_in_epoch / steps_per_epoch, 4),
                    "loss": window_loss / n,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": window_samples / elapsed,
                    "masked_negatives": masker.take_window(),
                }
                history.append(entry)
                train_log.step(entry)
                progress.set_postfix(loss=f"{entry['loss']:.4f}")
                window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
            position = {"global_step": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
            # Validate before saving, so that the checkpoint's state includes this evaluation.
            improved = False
            if validator is not None and (global_step % eval_every == 0 or global_step >= total_steps):
                improved = evaluate(position)
                stopped_early = tracker.should_stop
            if global_step % cfg.save_steps == 0 or improved:
                save(position)
            if stopped_early:
                train_log.early_stop(global_step, cfg.metric_for_best_model, cfg.early_stopping_patience)
                break
            if global_step >= total_steps:
                break
        else:
            epoch += 1
            continue
        break
    progress.close()
    if masker.duplicate_batches:
        log.warning("%d batches had one positive for every row (duplicated data)", masker.duplicate_batches)
    position = {"global_step": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
    if validator is not None and last_eval != global_step:
        evaluate(position)
        save(position)  # again if saved already: the checkpoint's state must hold this evaluation
    elif last_saved != global_step:
        save(position)
    final = out / f"checkpoint-{global_step}"
    best = out / tracker.best_checkpoint if tracker.best_checkpoint else None
    train_log.finish(final, best)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        final, global_step, loss_value, out / "training_log.txt", history, eval_history, best, tracker.best_value,
        stopped_early,
    )  # fmt: skip


def build_validator(
    cfg: TrainConfig, embedder: Embedder, records: list, loss_block: int | None = None
) -> tuple[list, Validator | None]:
    """(training records, validator): eval records from eval_data_path, or eval_split held out of the data."""
    if cfg.eval_split is not None:
        from vembed.data.split import is_eval

        held = [r for r in records if is_eval(r, cfg.eval_split, cfg.seed)]
        records = [r for r in records if not is_eval(r, cfg.eval_split, cfg.seed)]
        if not held or not records:
            raise DataError(
                f"{cfg.data_path}: eval_split {cfg.eval_split} leaves {len(records)} training and "
                f"{len(held)} eval records; both must be non-empty"
            )
        eval_records = held
    elif cfg.eval_data_path:
        images = RecordImages(Path(cfg.eval_data_path).parent, cfg.retrieval_mode, cfg.allow_images_outside_data_root)
        eval_records, stats = load_records(cfg.eval_data_path, cfg.on_bad_record, transform=images)
        if stats.skipped:
            log.warning("%s: %s", cfg.eval_data_path, stats.summary())
    else:
        return records, None
    return records, Validator(eval_records, embedder, cfg.batch_size, loss_block)


def _batch_size(batch: dict[str, Any]) -> int:
    first = next(iter(batch["query"].values()))
    return int(first.shape[0])


def save_checkpoint(
    accelerator: Accelerator,
    embedder: Embedder,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    position: dict[str, int],
    history: list[dict[str, Any]],
    best: dict[str, Any] | None = None,
    protect: str | None = None,
    eval_history: list[dict[str, Any]] | None = None,
) -> Path:
    """Every rank calls this (FSDP gathers are collective); rank 0 writes.

    `best`: the best-metric/patience state, saved so that a resume continues it; `protect`: the
    name of the best checkpoint, which rotation keeps; `eval_history`: the validation results so far."""
    from vembed.training.model_state import gather_model_state, gather_optimizer_state

    out = Path(cfg.output_dir)
    step = position["global_step"]
    model_state = gather_model_state(accelerator, embedder)
    optimizer_state = gather_optimizer_state(accelerator, embedder, optimizer)
    final = out / f"checkpoint-{step}"
    if accelerator.is_main_process:
        # Written into a temporary sibling, renamed when complete, removed on any failure (ENOSPC too).
        keep = [out / protect] if protect else []
        with ckpt.staged_checkpoint(out, step, cfg.save_total_limit, protect=keep) as tmp:
            unwrapped: Embedder = accelerator.unwrap_model(embedder)
            with _peft_names(accelerator, unwrapped):
                _save_weights(unwrapped, tmp, model_state, cfg.use_lora)
            if not cfg.use_lora:
                _save_processor(unwrapped, tmp)
            cfg.save(tmp / "vembed_config.yaml")
            (tmp / "embedder.json").write_text(json.dumps(unwrapped.spec.to_dict(), indent=1))
            ckpt.save_optimizer(optimizer, tmp, optimizer_state)
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
            ckpt.save_rng(tmp)
            trainer_state: dict[str, Any] = {**position, "history": history}
            if eval_history:
                trainer_state["eval_history"] = eval_history
            if best and best.get("metric"):
                trainer_state["best"] = best
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    accelerator.wait_for_everyone()
    return final


def _peft_names(accelerator: Accelerator, embedder: Embedder) -> contextlib.AbstractContextManager:
    """Under FSDP, peft must see module names without the FSDP wrappers to find the adapter."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return contextlib.nullcontext()
    from vembed.training.fsdp import names_without_fsdp_wrappers

    return names_without_fsdp_wrappers(embedder.backbone)


def _save_weights(embedder: Embedder, directory: Path, state: dict | None, lora: bool) -> None:
    kwargs: dict[str, Any] = {"state_dict": state} if state is not None else {}
    if lora:
        # "auto" would look the base model up on the hub to decide about embedding layers.
        kwargs["save_embedding_layers"] = False
    embedder.backbone.save_pretrained(directory, safe_serialization=True, **kwargs)


def _save_processor(embedder: Embedder, directory: Path) -> None:
    for attr in ("tokenizer", "processor"):
        obj = getattr(embedder, attr, None)
        if obj is not None:
            obj.save_pretrained(directory)


def _resolve_resume(cfg: TrainConfig, out: Path) -> Path | None:
    want = cfg.resume_from_checkpoint
    if not want:
        return None
    if want == "latest":
        found = ckpt.latest_checkpoint(out)
        if found is None:
            # A warning, so that it shows without any logging setup: the user asked to resume.
            log.warning("resume_from_checkpoint: latest, but %s has no checkpoint; starting fresh", out)
            return None
        return found
    path = Path(want)
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {want} is not a checkpoint directory")
    return path


def _load_resume_state(resume_dir, accelerator, embedder, optimizer, scheduler, cfg) -> dict[str, Any]:
    ckpt.verify_checkpoint(resume_dir)
    saved = yaml.safe_load((resume_dir / "vembed_config.yaml").read_text())
    for key in ("model_name", "use_lora", "lora_r", "lora_target_modules", "batch_size", "seed", "group_by_length"):
        if saved.get(key) != getattr(cfg, key):
            raise CheckpointError(
                f"{resume_dir}: cannot resume, {key} was {saved.get(key)!r} there but is {getattr(cfg, key)!r} now"
            )
    from vembed.training.model_state import load_model_state, load_optimizer_state

    weights = "adapter_model.safetensors" if cfg.use_lora else "model.safetensors"
    load_model_state(accelerator, embedder, load_file(str(resume_dir / weights)))
    load_optimizer_state(accelerator, embedder, optimizer, ckpt.read_optimizer_state(resume_dir))
    scheduler.load_state_dict(json.loads((resume_dir / "scheduler.json").read_text()))
    ckpt.load_rng(resume_dir)
    return json.loads((resume_dir / "trainer_state.json").read_text())
