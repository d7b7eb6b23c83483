"""The two contenders' training runs, each meant to run in a fresh child process.

Both: all-MiniLM-L6-v2, demo data, batch 32, max_seq_length 128, fp32, AdamW lr 1e-4 with weight decay
0.01, linear schedule with 10% warmup, gradient clipping at 1.0, InfoNCE at temperature 0.05 (= scale 20),
LoRA r=16 alpha=32 dropout=0.05 on query/value (or full fine-tuning).

`on_step` is called at the end of every optimizer step (bench.profile_step drives a profiler with it).
Throughput is measured the same way for both: the time between the end of step `warmup` and the end of
the last step (each step includes fetching its batch), so one-off costs (model load, tokenising up
front, the first slow steps) are reported separately as `setup_s`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import peak_rss_mib

BATCH = 32
MAX_LEN = 128
LR = 1e-4
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": ["query", "value"]}


def timed(run: Callable[[], list[float]], warmup: int, on_step: Callable[[], None]) -> dict[str, Any]:
    """Call `run` (a whole training run; it returns every step's loss) with (wall clock, CPU time of this
    process over all its threads) marked at the end of every optimizer step, by torch's post-step hook
    common to all optimizers; the trainable parameters are those the optimizer updates.

    CPU seconds per sample do not grow when other processes take the cores, so they compare the
    work done even on a busy machine; wall-clock samples/s is what a user sees."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    step_ends: list[tuple[float, float]] = []
    optimizers: set[torch.optim.Optimizer] = set()

    def step_end(optimizer: torch.optim.Optimizer, *_: object) -> None:
        step_ends.append((time.perf_counter(), time.process_time()))
        optimizers.add(optimizer)
        on_step()

    hook = register_optimizer_step_post_hook(step_end)
    start = time.perf_counter()
    try:
        losses = run()
    finally:
        hook.remove()
    train_call_s = time.perf_counter() - start
    steps = len(step_ends)
    counted = steps - warmup
    elapsed = step_ends[-1][0] - step_ends[warmup - 1][0]
    cpu = step_ends[-1][1] - step_ends[warmup - 1][1]
    return {
        "steps": steps,
        "batch": BATCH,
        # Per-step wall times: repeats see the same batches, so bench.common.best_samples_per_s
        # can take each step's fastest repeat.
        "step_s": [step_ends[i][0] - step_ends[i - 1][0] for i in range(warmup, steps)],
        "samples_per_s": counted * BATCH / elapsed,
        "cpu_ms_per_sample": 1000 * cpu / (counted * BATCH),
        "s_per_step": elapsed / counted,
        "setup_s": step_ends[warmup - 1][0] - start,
        "loss_first": losses[0],
        "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "peak_rss_mib": peak_rss_mib(),
        "train_call_s": train_call_s,
        "trainable_params": sum(q.numel() for o in optimizers for group in o.param_groups for q in group["params"]),
        "torch_threads": torch.get_num_threads(),
    }


OPTIMISATIONS = ("length_grouping", "lean_dropout", "lean_attention", "fused_adamw")


def disable(names: Sequence[str]) -> dict[str, Any]:
    """Turn vembed's training optimisations off in this (child) process, for before/after figures;
    returns the config overrides that turn off those the config controls."""
    import torch

    import vembed.training.loop as loop

    unknown = set(names) - set(OPTIMISATIONS)
    if unknown:
        raise SystemExit(f"unknown optimisation(s) {sorted(unknown)}; choose from {OPTIMISATIONS}")
    if "lean_dropout" in names:
        loop.use_lean_dropout = lambda model: 0
    if "lean_attention" in names:
        loop.use_training_attention = lambda model: False
    if "fused_adamw" in names:
        adamw = torch.optim.AdamW

        class UnfusedAdamW(adamw):
            def __init__(self, params, **kwargs):
                super().__init__(params, **{**kwargs, "fused": None})

        torch.optim.AdamW = UnfusedAdamW
    return {"group_by_length": False} if "length_grouping" in names else {}


def train_vembed(
    data: str, model: str, steps: int, warmup: int, lora: bool, extra: dict | None = None, off: Sequence[str] = (),
    on_step: Callable[[], None] = lambda: None,
) -> dict:
    import vembed.training.loop as loop
    from vembed.config import load_config

    turned_off = disable(off)
    with tempfile.TemporaryDirectory(prefix="vembed-bench-", ignore_cleanup_errors=True) as out:
        cfg = load_config(
            None,
            {
                "model_name": model,
                "data_path": data,
                "output_dir": out,
                "batch_size": BATCH,
                "max_seq_length": MAX_LEN,
                "torch_dtype": "float32",
                "learning_rate": LR,
                "max_steps": steps,
                "logging_steps": 1,
                "save_steps": 10**9,
                "use_lora": lora,
                **LORA,
                **(extra or {}),
                **turned_off,
            },
        )
        return timed(lambda: [h["loss"] for h in loop.train(cfg).history], warmup, on_step)


def train_st(
    data: str, model: str, steps: int, warmup: int, lora: bool, on_step: Callable[[], None] = lambda: None
) -> dict:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    def run() -> list[float]:
        st = SentenceTransformer(model, device="cpu")
        st.max_seq_length = MAX_LEN
        if lora:
            from peft import LoraConfig, get_peft_model

            # st.add_adapter needs peft >= 0.22 (unpublished); wrap the transformer module's model directly.
            peft_names = {"lora_r": "r", "lora_target_modules": "target_modules"}
            config = LoraConfig(**{peft_names.get(k, k): v for k, v in LORA.items()})  # bias "none": the default
            st[0].model = get_peft_model(st[0].model, config)
        pairs = [json.loads(line) for line in Path(data).read_text().splitlines()]
        dataset = Dataset.from_dict({"anchor": [r["query"] for r in pairs], "positive": [r["positive"] for r in pairs]})
        loss = losses.MultipleNegativesRankingLoss(st, scale=20.0)
        trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=dataset, loss=loss)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    with tempfile.TemporaryDirectory(prefix="st-bench-", ignore_cleanup_errors=True) as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=LR,
            weight_decay=0.01,
            warmup_ratio=0.1,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=42,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        return {**timed(run, warmup, on_step), "optim": str(args.optim)}
