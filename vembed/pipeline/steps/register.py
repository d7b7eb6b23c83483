"""Pipeline step: log the training run to MLflow, register the model version and run the promotion gate.

The version gets the alias `challenger`; `champion` moves only when the gate passes (see
vembed.artifacts.registry). Safe to retry: the run and the version are found by a key of the training run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vembed.artifacts.promotion import results_of, score_of
from vembed.errors import RegistryError

PIPELINE_RUN_ENV = ("KFP_RUN_ID", "VEMBED_PIPELINE_RUN_ID")
GIT_COMMIT_ENV = ("GIT_COMMIT", "VEMBED_GIT_COMMIT")


def _local_dir(path: str | os.PathLike[str] | None) -> Path | None:
    """Model directories may be s3:// URIs (manifest-verified download) or local paths."""
    if path is None or str(path) == "":
        return None
    if str(path).startswith("s3://"):
        from vembed.artifacts.storage import materialize

        return Path(materialize(str(path)))
    return Path(path)


def _first_env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent, check=True
        )
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout (CalledProcessError), a hang
        return None
    return out.stdout.strip() or None


def _from_checkpoint(adapter_dir: Path | None) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The resolved config and the logged training steps a checkpoint carries, if any."""
    if adapter_dir is None:
        return None, []
    from vembed.pipeline.steps.evaluate import resolved_config

    config = resolved_config(adapter_dir)
    history: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, AttributeError):  # none, or damaged: no history
        state = json.loads((adapter_dir / "trainer_state.json").read_text())
        # Training steps, then the validation during training (val_* keys; MLflow's val/...).
        history = list(state.get("history") or []) + list(state.get("eval_history") or [])
    return config, history


def register(
    adapter_dir: str | os.PathLike[str] | None,
    merged_dir: str | os.PathLike[str] | None,
    metrics: Mapping[str, Any],
    model_name: str,
    eval_set_sha256: str,
    promotion_metric: str = "ndcg@10",
    min_delta: float = 0.0,
    output_dir: str | os.PathLike[str] = "output",
    training_run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Log the run, register adapter + merged model as one version and apply the gate.

    metrics: the evaluate step's output ({"results": {"tuned": {...}, "base": ..., "champion": ...},
      "decision": {...}}), its "results", or a flat {"ndcg@10": ...}.
    training_run_info: optional {run_key, config, history, base_model, dataset_sha256, git_commit,
      pipeline_run_id, run_name}; config and history default to what the adapter checkpoint holds.
    Returns the decision ({promoted, reason, version, aliases, ...}) plus run_id and tracking_uri.
    """
    from vembed.artifacts.mlflow_store import resolve_tracking_uri
    from vembed.artifacts.registry import Registry, pick_metric
    from vembed.artifacts.registry_files import check_model_dir, content_key
    from vembed.redaction import redact

    if not model_name:
        raise RegistryError("register: model_name is empty")
    info = dict(training_run_info or {})
    # Bad directories, metrics or checkpoint config fail here, before the store and the run are created.
    adapter = check_model_dir(_local_dir(adapter_dir), "adapter")
    merged = check_model_dir(_local_dir(merged_dir), "merged")
    if adapter is None and merged is None:  # content_key says so too, but a run_key skips it
        raise RegistryError("register: give an adapter directory, a merged model directory, or both")
    key = str(info.get("run_key") or content_key(adapter, merged))
    pick_metric(metrics, promotion_metric)
    ckpt_config, ckpt_history = _from_checkpoint(adapter)
    registry = Registry(resolve_tracking_uri(output_dir))
    pipeline_run_id = info.get("pipeline_run_id") or _first_env(PIPELINE_RUN_ENV)
    run_id = registry.log_training_run(
        key,
        config=info.get("config") or ckpt_config,
        history=info.get("history") or ckpt_history,
        eval_metrics=metrics,
        run_name=info.get("run_name"),
        tags={
            "base_model": info.get("base_model"),
            "dataset_sha256": info.get("dataset_sha256"),
            "git_commit": info.get("git_commit") or _first_env(GIT_COMMIT_ENV) or _git_commit(),
            "pipeline_run_id": pipeline_run_id,
        },
    )
    decision_in = metrics.get("decision") if isinstance(metrics.get("decision"), Mapping) else {}
    decision = registry.register(
        model_name=model_name,
        eval_metrics=metrics,
        eval_set_sha256=eval_set_sha256,
        adapter_dir=adapter,
        merged_dir=merged,
        source_key=key,
        run_id=run_id,
        promotion_metric=promotion_metric,
        min_delta=min_delta,
        # The champion's score on this eval set, when the evaluate step measured it.
        champion_score=score_of(results_of(metrics), promotion_metric, "champion"),
        eval_gate_passed=decision_in.get("passed"),
    )
    return {**dataclasses.asdict(decision), "run_id": run_id, "tracking_uri": redact(registry.tracking_uri)}
