"""The training recipe on top of accelerate: setup, the loop, checkpoints through the Checkpointer."""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from vembed.config import TrainConfig
from vembed.data import Record
from vembed.data.images import RecordImages
from vembed.data.items import record_items
from vembed.errors import ConfigError, DataError
from vembed.inference.evaluation import read_corpus
from vembed.models import Embedder, load_embedder, resolve_dtype
from vembed.models.attention import use_training_attention
from vembed.models.dropout import use_lean_dropout
from vembed.models.lora import apply_lora, count_parameters, enable_gradient_checkpointing
from vembed.models.rotation import fit_rotation
from vembed.training.checkpoint import Checkpointer, TrainState, list_checkpoints, refuse_other_runs
from vembed.training.compat import reset_accelerate_state
from vembed.training.data import EpochBatchSampler, PairCollator, PairDataset, load_records
from vembed.training.log import TrainingLog
from vembed.training.losses import build_loss
from vembed.training.negatives import FalseNegativeMasker
from vembed.training.step import make_step
from vembed.training.validation import LOGGED, BestTracker, Validator, embed_sharded

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
        from vembed.training.fsdp import activate_fsdp, fsdp_plugin

        kwargs["fsdp_plugin"] = fsdp_plugin(cfg)
    elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError("use_fsdp is false but accelerate was launched with an FSDP config; set use_fsdp: true")
    reset_accelerate_state()  # a second run in this process must not inherit the first's settings
    accelerator = Accelerator(**kwargs)
    if cfg.use_fsdp:
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
        log.info("full fine-tuning: %d trainable parameters", count_parameters(embedder)[0])
    # Leaner dropout masks (and attention, on CPU) for training; after LoRA, so that the adapters'
    # own dropout layers are included. docs/benchmarks.md has the before/after figures.
    use_lean_dropout(embedder.backbone)
    use_training_attention(embedder.backbone)
    return embedder


def build_optimizer(cfg: TrainConfig, embedder: Embedder) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with loraplus_lr_ratio, peft's LoRA+ groups (B matrices
    at ratio x learning_rate)."""
    # The fused kernel does one pass over all parameters (CPU and CUDA); FSDP keeps the default.
    fused = None if cfg.use_fsdp else True
    if cfg.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            embedder, torch.optim.AdamW, lr=cfg.learning_rate, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
            loraplus_weight_decay=cfg.weight_decay, weight_decay=cfg.weight_decay, fused=fused,
        )  # fmt: skip
    params = [p for p in embedder.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)


RUN_CONFIG_HEADER = "# vembed: the resolved config of this training run\n"


def refuse_foreign_run_files(out: Path) -> None:
    """Training writes `config.yaml` and `training_log.txt` into `output_dir`; refuse to replace such
    files that a vembed run did not write (e.g. `output_dir: .` beside the user's own config.yaml).
    Ours: a config.yaml with RUN_CONFIG_HEADER or in a run directory (a vembed log or checkpoints)."""
    cfg_file, log_file = out / "config.yaml", out / "training_log.txt"
    first_line = log_file.read_text(errors="replace").split("\n", 1)[0] if log_file.is_file() else ""
    if first_line and " start model=" not in first_line:
        foreign = log_file
    elif cfg_file.is_file() and not cfg_file.read_text(errors="replace").startswith(RUN_CONFIG_HEADER):
        if log_file.is_file() or any(list_checkpoints(out)):
            return  # a run directory: ours
        foreign = cfg_file
    else:
        return
    raise ConfigError(
        f"output_dir: {foreign} exists and was not written by a vembed run; "
        "training would overwrite it: choose another output_dir"
    )


class Recipe:
    """One training run, after torchtune's recipes: `setup` builds the model, data, optimizer and
    state (resumed by the Checkpointer when asked), `train` runs the loop, `save_checkpoint` hands
    the state to the Checkpointer, `cleanup` ends the run. All state lives on the recipe."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.out = cfg, Path(cfg.output_dir)

    def setup(self) -> None:
        cfg, out = self.cfg, self.out
        accelerator, dtype = build_accelerator(cfg)
        self.accelerator = accelerator
        set_seed(cfg.seed)
        self.checkpointer = Checkpointer(cfg, accelerator)
        resume_dir = self.checkpointer.resume_dir()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir: {out} exists and is not a directory")
        # Resuming a checkpoint of another directory: output_dir's own checkpoints are not that run's.
        if resume_dir is None or resume_dir.resolve().parent != out.resolve():
            refuse_other_runs(cfg)
        if accelerator.is_main_process:
            refuse_foreign_run_files(out)

        embedder = build_embedder(cfg, dtype)
        self.loss_fn = build_loss(cfg, embedder.dim)  # checks mrl_dims against the model, before any write
        records = read_data(cfg, cfg.data_path)
        # The validation loss is taken over as many records as a training step's loss sees.
        loss_block = cfg.batch_size * (accelerator.num_processes if cfg.cross_device_negatives else 1)
        self.records, self.validator = build_validator(cfg, embedder, records, loss_block)
        if accelerator.is_main_process:  # only now: a bad model or data file leaves no output_dir behind
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(RUN_CONFIG_HEADER + cfg.to_yaml())
        dataset = PairDataset(self.records, embedder)  # image paths were resolved when the records were read
        lengths = dataset.lengths() if cfg.group_by_length else None
        self.sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed, lengths)
        # A private generator: creating a DataLoader iterator draws a seed from it, and drawing
        # from the global RNG would shift dropout masks after a resume.
        loader = DataLoader(
            dataset, batch_sampler=self.sampler, collate_fn=PairCollator(embedder), num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed),
        )  # fmt: skip

        optimizer = build_optimizer(cfg, embedder)
        self.steps_per_epoch = math.ceil(len(self.sampler) / accelerator.num_processes)
        self.total_steps = min(cfg.epochs * self.steps_per_epoch, cfg.max_steps or math.inf)
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )  # fmt: skip
        prepared = accelerator.prepare(embedder, optimizer, loader, scheduler)
        self.embedder, self.optimizer, self.loader, self.scheduler = prepared
        self.masker = FalseNegativeMasker(accelerator, cfg.cross_device_negatives, enabled=cfg.mask_false_negatives)
        self.step_fn = make_step(cfg, accelerator, self.embedder, self.loss_fn, self.masker)

        self.train_log = TrainingLog(out / "training_log.txt", accelerator.is_main_process, append=resume_dir is not None)
        if resume_dir is None:
            self.state = TrainState()
            self.train_log.header(cfg, count_parameters(self.embedder), len(dataset), self.total_steps, accelerator)
        else:
            self.state = self.checkpointer.load(resume_dir, self.embedder, self.optimizer, self.scheduler)
            log.info("resumed from %s at step %d", resume_dir, self.state.global_step)
            self.train_log.resumed(resume_dir, self.state.global_step)
        self.tracker = BestTracker(cfg.metric_for_best_model, cfg.greater_is_better, cfg.early_stopping_patience)
        self.tracker.load(self.state.best)
        # The step of the last evaluation and the last save; a resumed run did both at its checkpoint.
        self.last_eval = self.last_saved = self.state.global_step if resume_dir is not None else -1
        self.stopped_early = self.tracker.should_stop  # a checkpoint saved at an early stop stays stopped

    def train(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        self.progress = tqdm(
            total=self.total_steps, initial=state.global_step, disable=not self.accelerator.is_local_main_process,
            desc="training",
        )  # fmt: skip
        self.embedder.train()
        self.window_loss, self.window_samples, self.window_start = 0.0, 0, time.perf_counter()
        self.loss_value = float("nan")
        while state.global_step < self.total_steps and state.epoch < cfg.epochs and not self.stopped_early:
            self.sampler.epoch = state.epoch
            skip = state.batch_in_epoch  # non-zero only in the epoch a resumed run continues
            for batch in self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader:
                self.train_step(batch)
                if self.stopped_early or state.global_step >= self.total_steps:
                    break
            else:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        self.progress.close()
        if self.masker.duplicate_batches:
            log.warning("%d batches had one positive for every row (duplicated data)", self.masker.duplicate_batches)
        if self.validator is not None and self.last_eval != state.global_step:
            self.evaluate()
            self.save_checkpoint()  # again if saved already: the checkpoint's state must hold this evaluation
        elif self.last_saved != state.global_step:
            self.save_checkpoint()
        final = self.out / f"checkpoint-{state.global_step}"
        best = self.out / self.tracker.best_checkpoint if self.tracker.best_checkpoint else None
        self.train_log.finish(final, best)
        return TrainResult(
            final, state.global_step, self.loss_value, self.out / "training_log.txt", state.history,
            state.eval_history, best, self.tracker.best_value, self.stopped_early,
        )  # fmt: skip

    def train_step(self, batch: dict[str, Any]) -> None:
        """One optimizer step, then logging, validation and saving as they fall due."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        loss = self.step_fn(batch)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(self.embedder.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.batch_in_epoch += 1
        self.progress.update(1)
        self.loss_value = accelerator.reduce(loss.detach().float(), "mean").item()
        self.window_loss += self.loss_value
        self.window_samples += next(iter(batch["query"].values())).shape[0] * accelerator.num_processes
        if state.global_step % cfg.logging_steps == 0 or state.global_step == self.total_steps:
            self.log_window()
        # Validate before saving, so that the checkpoint's state includes this evaluation.
        improved = False
        if self.validator is not None and (
            state.global_step % (cfg.eval_steps or cfg.save_steps) == 0 or state.global_step >= self.total_steps
        ):
            improved = self.evaluate()
            self.stopped_early = self.tracker.should_stop
        if state.global_step % cfg.save_steps == 0 or improved:
            self.save_checkpoint()
        if self.stopped_early:
            self.train_log.early_stop(state.global_step, cfg.metric_for_best_model, cfg.early_stopping_patience)

    def log_window(self) -> None:
        """The mean loss and throughput since the last logging step: history, training_log.txt, progress bar."""
        state, n = self.state, self.state.global_step % self.cfg.logging_steps or self.cfg.logging_steps
        entry = {
            "step": state.global_step,
            "epoch": round(state.epoch + state.batch_in_epoch / self.steps_per_epoch, 4),
            "loss": self.window_loss / n,
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": self.window_samples / max(time.perf_counter() - self.window_start, 1e-9),
            "masked_negatives": self.masker.take_window(),
        }
        state.history.append(entry)
        self.train_log.step(entry)
        self.progress.set_postfix(loss=f"{entry['loss']:.4f}")
        self.window_loss, self.window_samples, self.window_start = 0.0, 0, time.perf_counter()

    def evaluate(self) -> bool:
        """Validate at this step; True when it improved metric_for_best_model (so it is saved)."""
        assert self.validator is not None
        step = self.state.global_step
        metrics = self.validator.evaluate(self.accelerator, self.embedder, self.loss_fn)
        metrics = broadcast_object_list([metrics])[0]  # every rank decides from rank 0's figures (no-op for one)
        improved = self.tracker.update(step, metrics)
        self.state.eval_history.append({"step": step, **{f"val_{k}": metrics[k] for k in LOGGED}})
        self.train_log.eval(step, {k: metrics[k] for k in LOGGED}, self.tracker.to_dict())
        self.last_eval = step
        return improved

    @functools.cached_property
    def rotation_features(self) -> list[dict[str, Any]]:
        """The featurized queries and positives of up to 2,048 training records (a seeded sample): what
        every save's rotation is fit on, so they are featurized once."""
        records = self.records
        if len(records) > 2048:
            records = random.Random(self.cfg.seed).sample(records, 2048)
        unwrapped: Embedder = self.accelerator.unwrap_model(self.embedder)
        return [unwrapped.featurize(it, is_query=not i) for r in records for i, it in enumerate(record_items(r)[:2])]

    def fit_rotation(self) -> None:
        """The embedding rotation (vembed.models.rotation) of the current weights. Collective."""
        unwrapped: Embedder = self.accelerator.unwrap_model(self.embedder)
        emb = embed_sharded(self.accelerator, self.embedder, unwrapped.collate, self.rotation_features, self.cfg.batch_size)
        unwrapped.rotation = fit_rotation(emb)

    def save_checkpoint(self) -> Path:
        """Collective: every rank calls it. With use_mrl, each checkpoint carries its own rotation."""
        if self.cfg.use_mrl and self.cfg.mrl_rotation:
            self.fit_rotation()
        self.state.best = self.tracker.to_dict()
        path = self.checkpointer.save(
            self.embedder, self.optimizer, self.scheduler, self.state, protect=self.tracker.best_checkpoint
        )
        self.last_saved = self.state.global_step
        return path

    def cleanup(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def train(cfg: TrainConfig) -> TrainResult:
    recipe = Recipe(cfg)
    recipe.setup()
    result = recipe.train()
    recipe.cleanup()
    return result


def read_data(cfg: TrainConfig, path: str) -> list[Record]:
    """The records of a data file. Applies retrieval_mode, resolves image paths against the file's
    directory and checks each image, so a bad one is reported as path:line."""
    images = RecordImages(Path(path).parent, cfg.retrieval_mode, cfg.allow_images_outside_data_root)
    records, stats = load_records(path, cfg.on_bad_record, transform=images)
    if stats.skipped:
        log.warning("%s: %s", path, stats.summary())
    return records


def build_validator(
    cfg: TrainConfig, embedder: Embedder, records: list[Record], loss_block: int | None = None
) -> tuple[list[Record], Validator | None]:
    """(training records, validator): eval records from eval_data_path, or eval_split held out of the data."""
    if cfg.eval_split is not None:
        from vembed.data.split import is_eval

        root = Path(cfg.data_path).parent  # image paths hashed relative to it: the split survives a move
        held = [is_eval(r, cfg.eval_split, cfg.seed, root) for r in records]
        eval_records = [r for r, h in zip(records, held, strict=True) if h]
        records = [r for r, h in zip(records, held, strict=True) if not h]
        if not eval_records or not records:
            raise DataError(
                f"{cfg.data_path}: eval_split {cfg.eval_split} leaves {len(records)} training and "
                f"{len(eval_records)} eval records; both must be non-empty"
            )
    elif cfg.eval_data_path:
        eval_records = read_data(cfg, cfg.eval_data_path)
    else:
        return records, None
    corpus = read_corpus(cfg.corpus_path) if cfg.corpus_path else ()
    return records, Validator(eval_records, embedder, cfg.batch_size, loss_block, corpus)
