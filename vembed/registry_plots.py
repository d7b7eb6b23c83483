"""The two figures a training run logs: training loss by step, and the metric by MRL embedding dim.

Drawn on matplotlib's Agg canvas directly (no pyplot), so no display and no global figure state;
the registry hands the figures to MlflowClient.log_figure (no temp files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)  # Agg, no display and no global pyplot state
    return fig


def plot_loss_curve(history: Sequence[Mapping[str, Any]]) -> Figure | None:
    points = [(h["step"], h["loss"]) for h in history if "step" in h and "loss" in h]
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _per_dim(results: Mapping[str, Any], metric: str) -> dict[str, dict[str, float]]:
    """{model: {dim label: score}} from evaluate results ({model: {dim: {metric: v}}} or {dim: {...}})."""
    node = results.get("results", results)
    if not isinstance(node, Mapping):
        return {}
    if "full" in node:
        node = {"model": node}
    out: dict[str, dict[str, float]] = {}
    for model, dims in node.items():
        if isinstance(dims, Mapping):
            scores = {
                str(d): float(m[metric]) for d, m in dims.items() if isinstance(m, Mapping) and metric in m
            }
            if scores:
                out[str(model)] = scores
    return out


def plot_mrl_dims(results: Mapping[str, Any], metric: str = "ndcg@10") -> Figure | None:
    per_model = _per_dim(results, metric)
    if not per_model:
        return None
    labels = sorted(
        {d for scores in per_model.values() for d in scores},
        key=lambda d: (d != "full", -int(d) if d.isdigit() else 0),
    )
    fig = _figure()
    ax = fig.add_subplot()
    for model, scores in per_model.items():
        xs = [i for i, d in enumerate(labels) if d in scores]
        ax.plot(xs, [scores[labels[i]] for i in xs], marker="o", label=model)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(xlabel="embedding dim (MRL truncation)", ylabel=metric, title=f"{metric} by embedding dim")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
