"""`output_dir/training_log.txt`: one human-readable line per logging step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class TrainingLog:
    def __init__(self, path: Path, enabled: bool = True, append: bool = False) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                path.write_text("")

    def _write(self, line: str) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def header(self, cfg: Any, params: tuple[int, int], n_examples: int, total_steps: int, accelerator: Any) -> None:
        trainable, total = params
        self._write(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} start model={cfg.model_name} examples={n_examples} "
            f"steps={total_steps} batch_size={cfg.batch_size} processes={accelerator.num_processes} "
            f"precision={accelerator.mixed_precision} trainable_params={trainable} total_params={total}"
        )

    def step(self, e: dict[str, Any]) -> None:
        self._write(
            f"step={e['step']} epoch={e['epoch']:.2f} loss={e['loss']:.4f} lr={e['lr']:.3e} "
            f"samples/s={e['samples_per_s']:.1f} masked_negatives={e['masked_negatives']}"
        )

    def resumed(self, checkpoint: Path, step: int) -> None:
        """Marks a resume; tests check that the next logged step follows the checkpoint's."""
        self._write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} resumed from {checkpoint.name} at step={step}")

    def eval(self, step: int, metrics: dict[str, float], best: dict[str, Any] | None = None) -> None:
        values = " ".join(f"val_{k}={v:.4f}" for k, v in metrics.items())
        line = f"eval step={step} {values}"
        if best and best.get("metric"):
            line += (
                f" best_{best['metric']}={best['best_value']:.4f} best_checkpoint={best['best_checkpoint']}"
                f" evals_without_improvement={best['evals_without_improvement']}"
            )
        self._write(line)

    def early_stop(self, step: int, metric: str, patience: int) -> None:
        self._write(f"early stop at step={step}: {patience} evaluations without improving val_{metric}")

    def finish(self, checkpoint: Path, best: Path | None = None) -> None:
        extra = f" best_checkpoint={best}" if best is not None else ""
        self._write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} done checkpoint={checkpoint}{extra}")
