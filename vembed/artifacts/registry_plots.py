"""The two figures a training run logs (MlflowClient.log_figure): loss by step, and the metric by MRL dim.

A bare matplotlib Figure: no pyplot, so no display and no global figure state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _axes(title: str, xlabel: str, ylabel: str) -> Any:
    from matplotlib.figure import Figure

    ax = Figure(figsize=(6, 4), layout="tight").add_subplot()
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return ax


def plot_loss_curve(history: Sequence[Mapping[str, Any]]) -> Any:
    points = [(h["step"], h["loss"]) for h in history if "step" in h and "loss" in h]
    if not points:
        return None
    ax = _axes("Training loss", "step", "training loss")
    ax.plot(*zip(*points, strict=True), marker=".")
    return ax.figure


def plot_mrl_dims(results: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str) -> Any:
    """One line per model over its embedding dims (full first, then largest to smallest); None without dims."""
    per_model = {m: {d: s[metric] for d, s in dims.items() if metric in s} for m, dims in results.items()}
    labels = sorted({d for s in per_model.values() for d in s}, key=lambda d: (d != "full", -int(d) if d.isdigit() else 0))
    if not labels:
        return None
    ax = _axes(f"{metric} by embedding dim", "embedding dim (MRL truncation)", metric)
    ax.xaxis.update_units(labels)  # the dims as categories in this order, whichever model has which
    for model, scores in ((m, s) for m, s in per_model.items() if s):
        ax.plot(*zip(*((d, scores[d]) for d in labels if d in scores), strict=True), marker="o", label=model)
    ax.legend()
    return ax.figure
