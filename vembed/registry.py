"""MLflow model registry: one run per training run, model versions, aliases and the promotion gate.

- Tracking: `MLFLOW_TRACKING_URI`, else an embedded sqlite store under the output dir
  (`<output_dir>/mlflow.db`, artifacts in `<output_dir>/mlartifacts`).
- A model version is one MLflow model (vembed.mlflow_model): text models in the native
  `sentence_transformers` flavor, CLIP/Qwen3-VL as a pyfunc with bundled code; the LoRA adapter
  travels in the same directory. `download_model`, `mlflow.pyfunc` and standard servers read it.
- Every new version gets the alias `challenger`; `champion` moves only through the gate (or by hand
  with `promote`/`rollback`, which keep a champion history on the registered model).
- Retrying is safe: versions carry a `vembed.source_key` tag and are looked up before anything is
  created; a retry after a crash between "create version" and "set alias" finishes the alias step.
- Nothing secret reaches MLflow: params and tags pass through `scrub`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from vembed.errors import RegistryError
from vembed.mlflow_store import (  # noqa: F401 - download_model, quiet_mlflow...: re-exported, the public API
    ADAPTER_ARTIFACT,
    MERGED_ARTIFACT,
    alias_version,
    connect,
    download_model,
    local_artifact_root,
    quiet_mlflow,
    require_existing_store,
    resolve_tracking_uri,
    resolve_version,
)
from vembed.mlflow_store import registry_errors as _registry_errors
from vembed.promotion import DEFAULT_METRIC, decide
from vembed.redaction import redact, scrub
from vembed.registry_files import check_model_dir, content_key, stage_adapter, stage_merged
from vembed.registry_plots import plot_loss_curve, plot_mrl_dims

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_EXPERIMENT = "vembed"
MODEL_ARTIFACT_NAME = "embedding_model"

# Tags on model versions / logged models / runs / registered models.
TAG_SOURCE_KEY = "vembed.source_key"
TAG_METRIC_NAME = "vembed.metric_name"
TAG_METRIC_VALUE = "vembed.metric_value"
TAG_EVAL_SET = "vembed.eval_set_sha256"
TAG_EVAL_METRICS = "vembed.eval_metrics"
TAG_RUN_KEY = "vembed.training_run_key"
TAG_RUN_COMPLETE = "vembed.run_logged"
TAG_CHAMPION_HISTORY = "vembed.champion_history"
TAG_CHALLENGER_SET = "vembed.challenger_set"

_MAX_PARAM_LEN = 6000  # MLflow's limit for a param value
_MAX_TAG_LEN = 5000


# --- names and metrics -----------------------------------------------------------------


def mlflow_key(name: str) -> str:
    """A metric/param name MLflow accepts (`ndcg@10` -> `ndcg_at_10`)."""
    return re.sub(r"[^\w./\- :]", "_", name.replace("@", "_at_"))


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"tuned": {"full": {"ndcg@10": x}}} -> {"tuned/full/ndcg_at_10": x}; non-numbers are skipped."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            flat[mlflow_key(name)] = float(value)
    return flat


def pick_metric(metrics: Mapping[str, Any], name: str) -> float:
    """The candidate's score: `name` at top level, or under results -> tuned -> full."""
    node: Any = metrics
    for hop in ("results", "tuned", "full"):
        if isinstance(node, Mapping) and name not in node and hop in node:
            node = node[hop]
    if isinstance(node, Mapping) and name not in node and f"tuned/{name}" in node:
        name = f"tuned/{name}"
    value = node.get(name) if isinstance(node, Mapping) else None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise RegistryError(
            f"metrics: no numeric {name!r} for the candidate model (keys: {sorted(node)[:12]})"
        )
    return float(value)


def safe_key(key: str) -> str:
    """Keys go into MLflow filter strings; anything beyond a plain id is replaced by its sha256."""
    key = str(key)
    return key if re.fullmatch(r"[\w.:/@-]{1,200}", key) else hashlib.sha256(key.encode()).hexdigest()


# --- results ---------------------------------------------------------------------------


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VersionInfo:
    version: str
    aliases: list[str]
    metric: str | None
    score: float | None
    eval_set_sha256: str | None
    source_key: str | None
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


def _version_info(mv: ModelVersion) -> VersionInfo:
    tags = dict(mv.tags or {})
    value = tags.get(TAG_METRIC_VALUE)
    return VersionInfo(
        version=str(mv.version),
        aliases=sorted(mv.aliases or []),
        metric=tags.get(TAG_METRIC_NAME),
        score=float(value) if value not in (None, "") else None,
        eval_set_sha256=tags.get(TAG_EVAL_SET),
        source_key=tags.get(TAG_SOURCE_KEY),
        run_id=mv.run_id,
        tags=tags,
    )


# --- the registry ----------------------------------------------------------------------


class Registry:
    """Runs, versions and aliases in one MLflow tracking server / store."""

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None) -> None:
        self.tracking_uri, self.client = connect(tracking_uri)
        self.experiment_name = (
            experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        )
        self._experiment_id: str | None = None

    @property
    def where(self) -> str:
        return redact(self.tracking_uri)

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            with _registry_errors(f"{self.where}: experiment {self.experiment_name!r}"):
                exp = self.client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    try:
                        root = local_artifact_root(self.tracking_uri)
                        self._experiment_id = self.client.create_experiment(
                            self.experiment_name, artifact_location=root
                        )
                    except MlflowException as e:  # created concurrently by another step
                        if e.error_code != "RESOURCE_ALREADY_EXISTS":
                            raise
                        exp = self.client.get_experiment_by_name(self.experiment_name)
                self._experiment_id = self._experiment_id or exp.experiment_id
        return self._experiment_id

    # --- runs ---------------------------------------------------------------------------

    def find_run(self, run_key: str) -> str | None:
        with _registry_errors(f"{self.where}: search runs"):
            runs = self.client.search_runs(
                [self.experiment_id()], filter_string=f"tags.`{TAG_RUN_KEY}` = '{run_key}'", max_results=1
            )
        return runs[0].info.run_id if runs else None

    def log_training_run(
        self,
        *,
        run_key: str,
        config: Mapping[str, Any] | Any | None = None,
        history: Sequence[Mapping[str, Any]] = (),
        eval_metrics: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        dataset_sha256: str | None = None,
        git_commit: str | None = None,
        pipeline_run_id: str | None = None,
        promotion_metric: str = DEFAULT_METRIC,
        run_name: str | None = None,
    ) -> str:
        """The MLflow run of one training run (found by `run_key`, else created); returns its run id.

        A retry of a run that was fully logged changes nothing; a half-logged run is completed.
        """
        if config is not None and hasattr(config, "model_dump"):
            config = config.model_dump()
        base_model = base_model or (config or {}).get("model_name")
        run_key = safe_key(run_key)
        run_id = self.find_run(run_key)
        with _registry_errors(f"{self.where}: log training run {run_key[:12]}"):
            if run_id is None:
                tags = {TAG_RUN_KEY: run_key}
                optional = {
                    "vembed.base_model": base_model,
                    "vembed.dataset_sha256": dataset_sha256,
                    "vembed.git_commit": git_commit,
                    "vembed.pipeline_run_id": pipeline_run_id,
                }
                tags.update({k: v for k, v in optional.items() if v})
                run = self.client.create_run(self.experiment_id(), tags=scrub(tags), run_name=run_name)
                run_id = run.info.run_id
            run = self.client.get_run(run_id)
            if run.data.tags.get(TAG_RUN_COMPLETE) == "true":
                return run_id
            self._log_params(run_id, config or {}, run.data.params)
            self._log_metrics(run_id, history, eval_metrics or {}, set(run.data.metrics))
            self._log_plots(run_id, history, eval_metrics or {}, promotion_metric)
            self.client.set_tag(run_id, TAG_RUN_COMPLETE, "true")
            self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def _log_params(self, run_id: str, config: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        params = {mlflow_key(k): v[:_MAX_PARAM_LEN] for k, v in scrub(config).items()}
        # MlflowClient.log_batch splits into MLflow's per-request limits itself.
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items() if k not in existing])

    def _log_metrics(
        self,
        run_id: str,
        history: Sequence[Mapping[str, Any]],
        eval_metrics: Mapping[str, Any],
        existing: set[str],
    ) -> None:
        now = int(time.time() * 1000)
        # Validation during training (val_loss, val_ndcg@10, ...) goes to val/...; the rest to train/...
        metrics = [
            Metric(
                f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}", v, now, int(entry.get("step", 0))
            )
            for entry in history
            for k, v in flatten_metrics({k: v for k, v in entry.items() if k != "step"}).items()
        ]
        evals = flatten_metrics(eval_metrics.get("results", eval_metrics), "eval")
        metrics += [Metric(k, v, now, 0) for k, v in evals.items()]
        self.client.log_batch(run_id, metrics=[m for m in metrics if m.key not in existing])

    def _log_plots(
        self, run_id: str, history: Sequence[Mapping[str, Any]], eval_metrics: Mapping[str, Any], metric: str
    ) -> None:
        figures = {
            "plots/training_loss.png": plot_loss_curve(history),
            f"plots/mrl_dims_{mlflow_key(metric)}.png": plot_mrl_dims(eval_metrics, metric),
        }
        for name, fig in figures.items():
            if fig is not None:
                self.client.log_figure(run_id, fig, name)

    # --- versions -----------------------------------------------------------------------

    def ensure_registered_model(self, name: str) -> None:
        with _registry_errors(f"{self.where}: registered model {name!r}"):
            try:
                self.client.create_registered_model(name)
            except MlflowException as e:  # get-or-create: it exists already (or was created concurrently)
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

    def versions(self, name: str) -> list[ModelVersion]:
        with _registry_errors(f"{self.where}: model {name!r}"):
            found = list(self.client.search_model_versions(f"name = '{name}'"))
        return sorted(found, key=lambda mv: int(mv.version))

    def find_version(self, name: str, source_key: str) -> ModelVersion | None:
        matches = [mv for mv in self.versions(name) if (mv.tags or {}).get(TAG_SOURCE_KEY) == source_key]
        return matches[0] if matches else None

    def alias_version(self, name: str, alias: str) -> ModelVersion | None:
        return alias_version(self.client, name, alias)

    def _find_logged_model(self, source_key: str) -> LoggedModel | None:
        with _registry_errors(f"{self.where}: search logged models"):
            found = self.client.search_logged_models(
                [self.experiment_id()], filter_string=f"tags.`{TAG_SOURCE_KEY}` = '{source_key}'"
            )
        ready = [m for m in found if m.status == LoggedModelStatus.READY]
        return ready[0] if ready else None

    def log_embedding_model(
        self,
        *,
        source_key: str,
        adapter_dir: Path | None,
        merged_dir: Path | None,
        run_id: str | None,
        example_texts: Sequence[str] = ("an example sentence to embed",),
    ) -> LoggedModel:
        """Log the embedding model (see vembed.mlflow_model) as a LoggedModel.

        Text models: the sentence_transformers flavor from the merged model (an adapter-only
        registration is merged here first). CLIP / Qwen3-VL: a pyfunc with its code bundled.
        The adapter is stored in the same model directory (`adapter/`).
        Built with the client API only (save locally, create, upload, finalize) so that mlflow's
        process-wide tracking URI is never touched.
        """
        from mlflow.models import Model
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        from vembed.mlflow_model import save_embedding_model  # the torch side: merge, encode, save

        with tempfile.TemporaryDirectory(prefix="vembed-register-") as tmp:
            # Staged first (pickle refused, resume state left behind), before anything exists in MLflow.
            artifacts = {}
            if merged_dir is not None:
                artifacts[MERGED_ARTIFACT] = str(stage_merged(merged_dir, Path(tmp) / MERGED_ARTIFACT))
            if adapter_dir is not None:
                artifacts[ADAPTER_ARTIFACT] = str(stage_adapter(adapter_dir, Path(tmp) / ADAPTER_ARTIFACT))
            with _registry_errors(f"{self.where}: log embedding model"):
                logged = self.client.create_logged_model(
                    self.experiment_id(),
                    name=MODEL_ARTIFACT_NAME,
                    source_run_id=run_id,
                    tags={TAG_SOURCE_KEY: source_key},
                )
            meta = Model(
                artifact_path=logged.artifact_location,
                run_id=run_id,
                model_uuid=logged.model_id,
                model_id=logged.model_id,
            )
            local = save_embedding_model(Path(tmp), artifacts, meta, list(example_texts))
            with _registry_errors(f"{self.where}: log embedding model"):
                repo = get_artifact_repository(
                    logged.artifact_location, tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
                )
                repo.log_artifacts(str(local))
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
        adapter = check_model_dir(adapter_dir, "adapter")
        merged = check_model_dir(merged_dir, "merged")
        key = safe_key(source_key or content_key(adapter, merged))
        score = pick_metric(eval_metrics, promotion_metric)
        self.ensure_registered_model(model_name)
        mv = self.find_version(model_name, key)
        created = mv is None
        if mv is None:
            run_id = run_id or self.find_run(key)
            logged = self._find_logged_model(key) or self.log_embedding_model(
                source_key=key, adapter_dir=adapter, merged_dir=merged, run_id=run_id
            )
            tags = {
                TAG_SOURCE_KEY: key,
                TAG_METRIC_NAME: promotion_metric,
                TAG_METRIC_VALUE: repr(score),
                TAG_EVAL_SET: eval_set_sha256,
                TAG_EVAL_METRICS: json.dumps(flatten_metrics(eval_metrics.get("results", eval_metrics)))[
                    :_MAX_TAG_LEN
                ],
            }
            with _registry_errors(f"{self.where}: create version of {model_name!r}"):
                source_run = logged.source_run_id or run_id
                # A server resolves `models:/<id>` itself. A direct (sqlite) store would resolve it through
                # mlflow's *global* tracking URI (an MLflow TODO), so give it the artifact location instead.
                remote = self.tracking_uri.split(":", 1)[0] in ("http", "https", "databricks")
                mv = self.client.create_model_version(
                    model_name,
                    source=f"models:/{logged.model_id}" if remote else logged.artifact_location,
                    run_id=source_run,
                    tags=scrub(tags),
                    model_id=logged.model_id if remote or source_run else None,
                )
            log.info("registered %s version %s", model_name, mv.version)
        return self._apply_gate(mv, min_delta, champion_score, eval_gate_passed, created)

    def _apply_gate(
        self,
        mv: ModelVersion,
        min_delta: float,
        champion_score: float | None,
        eval_gate_passed: bool | None,
        created: bool,
    ) -> PromotionDecision:
        name, version = mv.name, str(mv.version)
        cand = _version_info(mv)
        # Once per version: the tag marks "challenger was set", so retrying an older registration
        # never pulls the alias back from a newer version.
        if cand.tags.get(TAG_CHALLENGER_SET) != "true":
            with _registry_errors(f"{self.where}: alias {name}@{CHALLENGER}"):
                self.client.set_registered_model_alias(name, CHALLENGER, version)
                self.client.set_model_version_tag(name, version, TAG_CHALLENGER_SET, "true")
        champion = self.alias_version(name, CHAMPION)
        champ = _version_info(champion) if champion else None
        promoted, reason = self._gate(cand, champ, min_delta, champion_score, eval_gate_passed)
        if promoted and (champ is None or champ.version != version):
            self.set_champion(name, version)
        return self._decision(name, version, promoted, reason, champ.version if champ else None, created)

    def _decision(
        self, name: str, version: str, promoted: bool, reason: str, before: str | None, created: bool = False
    ) -> PromotionDecision:
        with _registry_errors(f"{self.where}: model {name!r}"):
            info = _version_info(self.client.get_model_version(name, version))
        return PromotionDecision(
            promoted=promoted,
            reason=reason,
            version=version,
            aliases=info.aliases,
            model_name=name,
            metric=info.metric or DEFAULT_METRIC,
            score=info.score,
            champion_before=before,
            created=created,
        )

    @staticmethod
    def _gate(
        cand: VersionInfo,
        champ: VersionInfo | None,
        min_delta: float,
        champion_score: float | None,
        eval_gate_passed: bool | None,
    ) -> tuple[bool, str]:
        metric = cand.metric or DEFAULT_METRIC
        if champ is not None and champ.version == cand.version:
            return True, f"version {cand.version} is already {CHAMPION}"
        if eval_gate_passed is False:
            return False, "evaluation gate did not pass (see the evaluate step); champion unchanged"
        if cand.score is None:
            return False, f"version {cand.version} has no {metric} score; champion unchanged"
        if champ is None:
            return (
                True,
                f"no {CHAMPION} yet; version {cand.version} ({metric} {cand.score:.4f}) becomes {CHAMPION}",
            )
        if champion_score is not None:
            baseline, basis = float(champion_score), "measured on this eval set"
        elif (
            champ.metric == metric
            and champ.eval_set_sha256 == cand.eval_set_sha256
            and champ.score is not None
        ):
            baseline, basis = champ.score, "same eval set"
        else:
            return False, (
                f"cannot compare with {CHAMPION} v{champ.version}: it was scored with {champ.metric} on eval set "
                f"{(champ.eval_set_sha256 or '?')[:12]}, this version with {metric} on "
                f"{(cand.eval_set_sha256 or '?')[:12]}; pass the champion's score on the same eval set"
            )
        champ_name = f"{CHAMPION} v{champ.version}"
        gate = decide(
            cand.score, {champ_name: baseline}, metric, min_delta, candidate=f"version {cand.version}"
        )
        reason = f"{gate.reason} ({basis})"
        if gate.passed:
            return True, reason
        return False, f"{reason}; {CHAMPION} stays v{champ.version}"

    # --- champion history ---------------------------------------------------------------

    def champion_history(self, name: str) -> list[str]:
        """Versions that were champion, oldest first, trimmed to end at the current champion.

        Trimming repairs the history after a crash between writing it and moving the alias.
        """
        with _registry_errors(f"{self.where}: model {name!r}"):
            tags = self.client.get_registered_model(name).tags or {}
        try:
            history = [str(v) for v in json.loads(tags.get(TAG_CHAMPION_HISTORY, "[]"))]
        except json.JSONDecodeError:
            history = []
        current = self.alias_version(name, CHAMPION)
        if current is None:
            return []
        cur = str(current.version)
        if cur in history:
            return history[: len(history) - history[::-1].index(cur)]
        return [*history, cur]

    def _write_history(self, name: str, history: list[str]) -> None:
        with _registry_errors(f"{self.where}: model {name!r}"):
            self.client.set_registered_model_tag(name, TAG_CHAMPION_HISTORY, json.dumps(history[-50:]))

    def set_champion(self, name: str, version: str) -> None:
        """Move `champion` to `version` and record it (history first, so a crash leaves it trimmable)."""
        history = self.champion_history(name)
        if not history or history[-1] != str(version):
            self._write_history(name, [*history, str(version)])
        with _registry_errors(f"{self.where}: alias {name}@{CHAMPION}"):
            self.client.set_registered_model_alias(name, CHAMPION, str(version))

    def promote(self, name: str, version: str | int) -> PromotionDecision:
        """Make `version` champion by hand (no gate)."""
        with _registry_errors(f"{self.where}: {name} version {version}"):
            mv = self.client.get_model_version(name, str(version))
        before = self.alias_version(name, CHAMPION)
        self.set_champion(name, str(mv.version))
        reason = (
            f"promoted by hand (was v{before.version})" if before else "promoted by hand (no champion before)"
        )
        return self._decision(name, str(mv.version), True, reason, str(before.version) if before else None)

    def rollback(self, name: str) -> PromotionDecision:
        """Move `champion` back to the previous champion in the history."""
        history = self.champion_history(name)
        if len(history) < 2:
            raise RegistryError(
                f"{name}: no previous {CHAMPION} to roll back to (history: {history or 'empty'})"
            )
        current, previous = history[-1], history[-2]
        # Alias first, then history: a crash in between is repaired by the trimming in champion_history.
        with _registry_errors(f"{self.where}: alias {name}@{CHAMPION}"):
            self.client.set_registered_model_alias(name, CHAMPION, previous)
        self._write_history(name, history[:-1])
        reason = f"rolled back {CHAMPION} from v{current} to v{previous}"
        return self._decision(name, previous, True, reason, current)

    def show(self, name: str) -> dict[str, Any]:
        with _registry_errors(f"{self.where}: model {name!r}"):
            aliases = self.client.get_registered_model(name).aliases or {}
        versions = []
        for mv in self.versions(name):  # search results carry no aliases; the registered model does
            info = _version_info(mv)
            info.aliases = sorted(a for a, v in aliases.items() if str(v) == info.version)
            versions.append(asdict(info))
        return {
            "name": name,
            "versions": versions,
            "champion_history": self.champion_history(name),
        }

    # --- download -----------------------------------------------------------------------

    def resolve(self, models_uri: str) -> ModelVersion:
        return resolve_version(self.client, models_uri)

    def storage_uri(self, models_uri: str) -> str:
        """Where the version's MLflow model directory lives in storage (e.g. `s3://bucket/.../artifacts`)."""
        mv = self.resolve(models_uri)
        with _registry_errors(f"{models_uri}: storage location at {self.where}"):
            uri = self.client.get_model_version_download_uri(mv.name, mv.version)
            if uri.startswith("models:/"):  # a LoggedModel reference: its artifact location
                uri = self.client.get_logged_model(uri.removeprefix("models:/").strip("/")).artifact_location
        return uri
