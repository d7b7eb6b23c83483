"""Pipeline step: evaluate the tuned adapter against the base model and the current champion.

The gate passes when the tuned model's promotion metric is at least the best baseline's plus `min_delta`.
Every model is scored here, on the same eval split, so the comparison never mixes eval sets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vembed.artifacts.integrity import sha256_file
from vembed.artifacts.promotion import METRIC_KEYS, check_metric, decide
from vembed.artifacts.promotion import ROLES as ROLE_ORDER
from vembed.errors import ConfigError


def resolved_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The resolved training config an adapter checkpoint carries (vembed_config.yaml), None without one.
    A damaged file is a one-line ConfigError naming it (`path:line: invalid YAML: ...`)."""
    from vembed.config import _read_yaml

    path = Path(adapter_dir) / "vembed_config.yaml"
    return _read_yaml(path) if path.is_file() else None


def mrl_dims_of(adapter_dir: str | os.PathLike[str]) -> list[int] | None:
    """The MRL dims an adapter was trained with (from its resolved config), to report each one."""
    cfg = resolved_config(adapter_dir) or {}
    return [int(d) for d in cfg["mrl_dims"]] if cfg.get("use_mrl") and cfg.get("mrl_dims") else None


def champion_uri(model_name: str, tracking_uri: str | None = None) -> str | None:
    """`models:/NAME/VERSION` of the current champion (pinned, so a promotion mid-run changes nothing)."""
    from vembed.artifacts.registry import CHAMPION, Registry

    mv = Registry(tracking_uri).alias_version(model_name, CHAMPION) if model_name else None
    return f"models:/{model_name}/{mv.version}" if mv is not None else None


def eval_set_sha256(dataset_dir: str | os.PathLike[str]) -> str:
    """sha256 of the eval split's bytes: the registry compares scores only on the same eval set."""
    return sha256_file(Path(dataset_dir) / "eval.jsonl")


def gate(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    promotion_metric: str = "ndcg@10",
    min_delta: float = 0.0,
) -> dict[str, Any]:
    """Decide promotion from {"tuned": {"full": {...}}, "base": ..., "champion": ...} results."""
    check_metric(promotion_metric)
    tuned = results["tuned"]["full"][promotion_metric]
    baselines = {role: r["full"][promotion_metric] for role, r in results.items() if role != "tuned"}
    return decide(tuned, baselines, promotion_metric, min_delta).to_dict()


def render_markdown(results: Mapping[str, Mapping[str, Mapping[str, float]]], decision: Mapping[str, Any]) -> str:
    """Metrics table (one column per model, one table per MRL dim) and the gate decision."""
    roles = [r for r in ROLE_ORDER if r in results] + [r for r in results if r not in ROLE_ORDER]
    lines = ["## Retrieval metrics", ""]
    dims = list(results[roles[0]])
    for dim in dims:
        if len(dims) > 1:
            lines += [f"### {'full dimension' if dim == 'full' else f'dim {dim}'}", ""]
        lines += ["| metric | " + " | ".join(roles) + " |", "|---|" + "---:|" * len(roles)]
        for metric in METRIC_KEYS:
            cells = [f"{results[r][dim][metric]:.4f}" if metric in results[r].get(dim, {}) else "-" for r in roles]
            mark = " **(gate)**" if metric == decision["promotion_metric"] else ""
            lines.append(f"| {metric}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
    verdict = "PROMOTE" if decision["passed"] else "HOLD"
    lines.append(f"**Gate: {verdict}** - {decision['reason']}")
    return "\n".join(lines) + "\n"


def evaluate(
    adapter_dir: str | os.PathLike[str],
    eval_path: str | os.PathLike[str],
    base_model: str | None = None,
    champion: str | None = None,
    promotion_metric: str = "ndcg@10",
    min_delta: float = 0.0,
    corpus_path: str | os.PathLike[str] | None = None,
    dims: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Score tuned vs base (and champion, a model URI such as `models:/name@champion`, when given).

    Returns {"results": {role: {dim: {metric: value}}}, "decision": {...}, "report": markdown}.
    """
    from vembed.inference.evaluation import base_model_of, compare_models

    check_metric(promotion_metric)  # fail before spending minutes on encoding
    models = {"tuned": str(adapter_dir), "base": base_model or base_model_of(str(adapter_dir))}
    if not models["base"]:
        raise ConfigError(f"{adapter_dir}: not an adapter checkpoint with a known base model; pass base_model")
    if champion:
        models["champion"] = champion
    dims = list(dims) if dims else mrl_dims_of(adapter_dir)
    results = compare_models(models, str(eval_path), corpus_path=str(corpus_path) if corpus_path else None, dims=dims)
    decision = gate(results, promotion_metric, min_delta)
    return {"results": results, "decision": decision, "report": render_markdown(results, decision)}
