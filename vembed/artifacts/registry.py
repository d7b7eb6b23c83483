"""MLflow model registry: one run per training run, model versions, aliases and the promotion gate.

- Tracking: `MLFLOW_TRACKING_URI`, else an embedded sqlite store `<output_dir>/mlflow.db` (artifacts in
  `<output_dir>/mlartifacts`). Every call goes through one client for that URI (mlflow_store.Client, which
  makes failures one-line errors): MLflow's fluent `log_model` would pick the URI from process-wide state.
- A version is one MLflow model (vembed.artifacts.mlflow_model): text models in the native `sentence_transformers`
  flavor, CLIP/Qwen3-VL as a pyfunc with bundled code, the LoRA adapter alongside.
- Every new version gets the alias `challenger`; `champion` moves only through the gate (vembed.artifacts.promotion),
  or by hand with `promote`/`rollback`, which keep a champion history on the registered model.
- Retrying is safe: runs, logged models and versions carry a key tag and are looked up before anything
  is created. Nothing secret reaches MLflow: params and tags pass through `scrub`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, Param
from mlflow.entities.model_registry import ModelVersion

from vembed.artifacts.mlflow_store import Client, resolve_version
from vembed.artifacts.promotion import (
    DEFAULT_METRIC,
    decide_version,
    flat_metrics,
    is_score,
    results_of,
    score_of,
)
from vembed.artifacts.registry_files import check_model_dir, content_key, stage
from vembed.errors import RegistryError
from vembed.redaction import scrub

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT_NAME = "embedding_model"
TAG_SOURCE_KEY = "vembed.source_key"  # on logged models and versions: what was registered
TAG_RUN_COMPLETE = "vembed.run_logged"
TAG_CHAMPION_HISTORY = "vembed.champion_history"  # on the registered model
_EXISTS, _MISSING = ("RESOURCE_ALREADY_EXISTS",), ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def mlflow_key(name: str) -> str:
    """A metric/param name MLflow accepts (`ndcg@10` -> `ndcg_at_10`)."""
    return re.sub(r"[^\w./\- :]", "_", name.replace("@", "_at_"))


def pick_metric(metrics: Mapping[str, Any], name: str) -> float:
    """The candidate's full-dimension score, from any metrics shape `results_of` reads."""
    results = results_of(metrics)
    if (score := score_of(results, name)) is None:
        keys = sorted(results.get("tuned", {}).get("full", {})) or sorted(results)
        raise RegistryError(f"metrics: no numeric {name!r} for the candidate model (keys: {keys[:12]})")
    return score


def _unless(codes: tuple[str, ...], call: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
    """`call()`, else `fallback()` when MLflow answers with one of `codes` (e.g. created meanwhile by another step)."""
    try:
        return call()
    except RegistryError as e:
        if getattr(e, "error_code", "") not in codes:
            raise
        return fallback()


def safe_key(key: str) -> str:
    """Keys go into MLflow filter strings; anything beyond a plain id is replaced by its sha256."""
    key = str(key)
    return key if re.fullmatch(r"[\w.:/@-]{1,200}", key) else hashlib.sha256(key.encode()).hexdigest()


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    version: str
    aliases: list[str]
    model_name: str
    metric: str
    score: float | None
    champion_before: str | None = None
    created: bool = False  # False when a retry found the version already registered


@dataclass
class VersionInfo:
    """A model version as the gate and `show` see it (from its vembed.* tags)."""

    version: str
    aliases: list[str]
    metric: str | None
    score: float | None
    eval_set_sha256: str | None
    source_key: str | None
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, mv: ModelVersion) -> VersionInfo:
        tags, version = dict(mv.tags or {}), str(mv.version)
        score = float(tags["vembed.metric_value"]) if tags.get("vembed.metric_value") else None
        args = (tags.get("vembed.metric_name"), score, tags.get("vembed.eval_set_sha256"), tags.get(TAG_SOURCE_KEY))
        return cls(version, sorted(mv.aliases or []), *args, mv.run_id, tags)


class Registry:
    """Runs, versions and aliases in one MLflow tracking server / store."""

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None) -> None:
        self.client = Client(tracking_uri)
        self.tracking_uri = self.client.tracking_uri
        self.experiment_name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "vembed"
        self._experiment_id: str | None = None

    def experiment_id(self) -> str:
        """The experiment's id; created when missing (a sqlite store's artifacts next to its db file,
        instead of MLflow's `./mlruns` default)."""
        if self._experiment_id is None:
            name, db = self.experiment_name, Path(self.tracking_uri.removeprefix("sqlite:///"))
            root = (db.parent / "mlartifacts").resolve().as_uri() if self.tracking_uri.startswith("sqlite:") else None
            self._experiment_id = _unless(
                _EXISTS,
                lambda: self.client.create_experiment(name, artifact_location=root),
                lambda: self.client.get_experiment_by_name(name).experiment_id,
            )
        return self._experiment_id

    def find_run(self, value: str, tag: str = "vembed.training_run_key") -> str | None:
        found = self.client.search_runs([self.experiment_id()], f"tags.`{tag}` = '{value}'", max_results=1)
        return found[0].info.run_id if found else None

    def log_training_run(
        self,
        run_key: str,
        *,
        config: Mapping[str, Any] | Any | None = None,
        history: Sequence[Mapping[str, Any]] = (),
        eval_metrics: Mapping[str, Any] | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str | None] | None = None,
    ) -> str:
        """The MLflow run of one training run (found by `run_key`, else created); returns its run id.
        tags: base_model, dataset_sha256, git_commit, pipeline_run_id (stored as `vembed.<name>`).
        A retry of a fully logged run changes nothing; a half-logged run is completed."""
        config = dict(config.model_dump() if hasattr(config, "model_dump") else config or {})
        run_key, results = safe_key(run_key), results_of(eval_metrics or {})
        run_id = self.find_run(run_key)
        if run_id is None:
            tags = {**(tags or {}), "training_run_key": run_key}
            tags["base_model"] = tags.get("base_model") or config.get("model_name")
            tags = scrub({f"vembed.{k}": v for k, v in tags.items() if v})
            run_id = self.client.create_run(self.experiment_id(), tags=tags, run_name=run_name).info.run_id
        run = self.client.get_run(run_id)
        if run.data.tags.get(TAG_RUN_COMPLETE) == "true":
            return run_id
        now = int(time.time() * 1000)
        params = [Param(mlflow_key(k), v[:6000]) for k, v in scrub(config).items()]  # MLflow's length limit
        # Validation during training (val_loss, val_ndcg@10, ...) goes to val/...; the rest to train/...
        metrics = [
            Metric(mlflow_key(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"), v, now, int(e.get("step", 0)))
            for e in history
            for k, v in e.items()
            if k != "step" and is_score(v)
        ]
        metrics += [Metric(mlflow_key(f"eval/{k}"), v, now, 0) for k, v in flat_metrics(results).items()]
        # Each score by MRL dim once more as a series whose step is the dim: MLflow's chart of it is the
        # metric-by-dim figure (`eval/tuned/ndcg_at_10_by_dim` at steps 64, 128, ...).
        metrics += [
            Metric(mlflow_key(f"eval/{model}/{k}_by_dim"), v, now, int(dim))
            for model, dims in results.items()
            for dim, scores in dims.items()
            if dim.isdigit()
            for k, v in scores.items()
        ]
        # MlflowClient.log_batch splits into MLflow's per-request limits itself.
        self.client.log_batch(
            run_id,
            metrics=[m for m in metrics if m.key not in run.data.metrics],
            params=[p for p in params if p.key not in run.data.params],
        )
        self.client.set_tag(run_id, TAG_RUN_COMPLETE, "true")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def versions(self, name: str) -> list[ModelVersion]:
        return sorted(self.client.search_model_versions(f"name = '{name}'"), key=lambda mv: int(mv.version))

    def alias_version(self, name: str, alias: str) -> ModelVersion | None:
        """The version `name@alias` points at, None when there is no such alias or model."""
        return _unless(_MISSING, lambda: self.client.get_model_version_by_alias(name, alias), lambda: None)

    def log_embedding_model(
        self, *, source_key: str, adapter_dir: Path | None, merged_dir: Path | None, run_id: str | None
    ) -> LoggedModel:
        """The LoggedModel holding the model vembed.artifacts.mlflow_model builds (staged first: pickle refused,
        resume state left behind). The LoggedModel found by `source_key` when a retry gets here."""
        from mlflow.models import Model

        from vembed.artifacts.mlflow_model import build_model  # the torch side: merge, encode, save

        found = self.client.search_logged_models([self.experiment_id()], f"tags.`{TAG_SOURCE_KEY}` = '{source_key}'")
        if ready := [m for m in found if m.status == LoggedModelStatus.READY]:
            return ready[0]
        with tempfile.TemporaryDirectory(prefix="vembed-register-") as tmp:
            artifacts = stage(Path(tmp), adapter_dir, merged_dir)
            logged = self.client.create_logged_model(
                self.experiment_id(), name=MODEL_ARTIFACT_NAME, source_run_id=run_id, tags={TAG_SOURCE_KEY: source_key}
            )
            meta = Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id, model_id=logged.model_id)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input example was not provided.*")
                local = build_model(Path(tmp), artifacts, meta, ["an example sentence to embed"])
            self.client.log_model_artifacts(logged.model_id, str(local))
            if run_id:
                self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
            return self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)

    def register(
        self,
        *,
        model_name: str,
        eval_metrics: Mapping[str, Any],
        eval_set_sha256: str,
        adapter_dir: str | os.PathLike[str] | None = None,
        merged_dir: str | os.PathLike[str] | None = None,
        source_key: str | None = None,
        run_id: str | None = None,
        promotion_metric: str = DEFAULT_METRIC,
        min_delta: float = 0.0,
        champion_score: float | None = None,
        eval_gate_passed: bool | None = None,
    ) -> PromotionDecision:
        """Register (once per source) and run the gate. Safe to retry after any failure.

        champion_score: the current champion's metric measured on *this* eval set (the evaluate step
        scores it); needed when the champion's stored score comes from a different eval set.
        eval_gate_passed: False when evaluation already said "hold" (e.g. worse than the base model).
        """
        adapter, merged = check_model_dir(adapter_dir, "adapter"), check_model_dir(merged_dir, "merged")
        key = safe_key(source_key or content_key(adapter, merged))
        score = pick_metric(eval_metrics, promotion_metric)
        _unless(_EXISTS, lambda: self.client.create_registered_model(model_name), lambda: None)
        versions = self.versions(model_name)
        mv = next((v for v in versions if (v.tags or {}).get(TAG_SOURCE_KEY) == key), None)
        created = mv is None
        if mv is None:
            run_id = run_id or self.find_run(key)  # the training run logged under the same key, if any
            logged = self.log_embedding_model(source_key=key, adapter_dir=adapter, merged_dir=merged, run_id=run_id)
            flat = {mlflow_key(k): v for k, v in flat_metrics(results_of(eval_metrics)).items()}
            tags = {TAG_SOURCE_KEY: key, "vembed.metric_name": promotion_metric, "vembed.metric_value": repr(score)}
            tags |= {"vembed.eval_set_sha256": eval_set_sha256, "vembed.eval_metrics": json.dumps(flat)[:5000]}
            # A server resolves `models:/<id>` itself. A direct (sqlite) store would resolve it through
            # mlflow's *global* tracking URI (an MLflow TODO), so give it the artifact location instead.
            remote = self.tracking_uri.split(":", 1)[0] in ("http", "https", "databricks")
            mv = self.client.create_model_version(
                model_name,
                source=f"models:/{logged.model_id}" if remote else logged.artifact_location,
                run_id=logged.source_run_id,
                tags=scrub(tags),
                model_id=logged.model_id if remote or logged.source_run_id else None,
            )
        cand, version = VersionInfo.of(mv), str(mv.version)
        # The newest version is the challenger: retrying an older registration never pulls the alias back.
        if all(int(v.version) <= int(version) for v in versions):
            self.client.set_registered_model_alias(model_name, CHALLENGER, version)
        champion = self.alias_version(model_name, CHAMPION)
        champ = VersionInfo.of(champion) if champion else None
        promoted, reason = decide_version(cand, champ, min_delta, champion_score, eval_gate_passed)
        if promoted and (champ is None or champ.version != version):
            self.set_champion(model_name, version)
        return self._decision(model_name, version, promoted, reason, champ.version if champ else None, created)

    def _decision(
        self, name: str, version: str, promoted: bool, reason: str, before: str | None, created: bool = False
    ) -> PromotionDecision:
        info = VersionInfo.of(self.client.get_model_version(name, version))
        metric = info.metric or DEFAULT_METRIC
        return PromotionDecision(promoted, reason, version, info.aliases, name, metric, info.score, before, created)

    def champion_history(self, name: str) -> list[str]:
        """Versions that were champion, oldest first, trimmed to end at the current champion.
        Trimming repairs the history after a crash between writing it and moving the alias."""
        if (current := self.alias_version(name, CHAMPION)) is None:
            return []
        tags = self.client.get_registered_model(name).tags or {}
        try:
            history = [str(v) for v in json.loads(tags.get(TAG_CHAMPION_HISTORY, "[]"))]
        except (json.JSONDecodeError, TypeError):
            history = []
        cur = str(current.version)
        return history[: len(history) - history[::-1].index(cur)] if cur in history else [*history, cur]

    def _move_champion(self, name: str, history: list[str]) -> None:
        """Make the last of `history` champion. History first, then the alias: a crash in between
        leaves a history that reads as trimmed."""
        self.client.set_registered_model_tag(name, TAG_CHAMPION_HISTORY, json.dumps(history[-50:]))
        self.client.set_registered_model_alias(name, CHAMPION, history[-1])

    def set_champion(self, name: str, version: str) -> None:
        """Move `champion` to `version` and record it."""
        history = self.champion_history(name)
        self._move_champion(name, history if history[-1:] == [version] else [*history, version])

    def promote(self, name: str, version: str | int) -> PromotionDecision:
        """Make `version` champion by hand (no gate)."""
        version = str(self.client.get_model_version(name, str(version)).version)
        before = self.alias_version(name, CHAMPION)
        self.set_champion(name, version)
        reason = f"promoted by hand (was v{before.version})" if before else "promoted by hand (no champion before)"
        return self._decision(name, version, True, reason, str(before.version) if before else None)

    def rollback(self, name: str) -> PromotionDecision:
        """Move `champion` back to the previous champion in the history."""
        history = self.champion_history(name)
        if len(history) < 2:
            raise RegistryError(f"{name}: no previous {CHAMPION} to roll back to (history: {history or 'empty'})")
        self._move_champion(name, history[:-1])
        reason = f"rolled back {CHAMPION} from v{history[-1]} to v{history[-2]}"
        return self._decision(name, history[-2], True, reason, history[-1])

    def show(self, name: str) -> dict[str, Any]:
        aliases = self.client.get_registered_model(name).aliases or {}
        versions = [asdict(VersionInfo.of(mv)) for mv in self.versions(name)]
        for v in versions:  # search results carry no aliases; the registered model does
            v["aliases"] = sorted(a for a, ver in aliases.items() if str(ver) == v["version"])
        return {"name": name, "versions": versions, "champion_history": self.champion_history(name)}

    def storage_uri(self, models_uri: str) -> str:
        """Where the version's MLflow model directory lives in storage (e.g. `s3://bucket/.../artifacts`);
        for a version of a LoggedModel, MLflow records the LoggedModel's artifact location."""
        mv = resolve_version(self.client, models_uri)
        return self.client.get_model_version_download_uri(mv.name, mv.version)
