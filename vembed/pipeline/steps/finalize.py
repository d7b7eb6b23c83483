"""Pipeline exit step: remove the cluster job's S3 copies and record a failed run in MLflow.

The `on-exit` component (`components/on_exit/component.py`) runs this after every run of the pipeline,
whatever its outcome (`dsl.ExitHandler`):

- `cleanup_job_copies`: a train step that launched a TrainJob / PyTorchJob copied its inputs to
  `<model artifact>-job-inputs/` and had the job write to `<model artifact>-job/`
  (`vembed.pipeline.steps.launch.job_output_uri`). Once the step has downloaded the result, both are leftovers;
  if the step died mid-job they are leftovers too. Only objects of *this run* whose path has a
  `...-job/` or `...-job-inputs/` directory are deleted: nothing that vembed did not write.
- `record_failure`: when the run did not succeed, the MLflow run of this pipeline run (tag
  `vembed.pipeline_run_id`; created when training never got that far) gets the tags
  `vembed.pipeline_status`, `vembed.failed_task` and `vembed.failure_reason`, and ends FAILED.

Both are plain functions, testable without KFP.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vembed.artifacts import storage

# A directory written for a cluster job: `<artifact>-job/...` or `<artifact>-job-inputs/...`.
_JOB_DIR = re.compile(r"^[^/]+-job(-inputs)?$")
TAG_PIPELINE_RUN = "vembed.pipeline_run_id"
TAG_STATUS = "vembed.pipeline_status"
TAG_FAILED_TASK = "vembed.failed_task"
TAG_REASON = "vembed.failure_reason"
_MAX_REASON = 4000  # under MLflow's tag length limit


@dataclass(frozen=True)
class FinalStatus:
    """The fields of kfp's `dsl.PipelineTaskFinalStatus` that matter here."""

    state: str  # SUCCEEDED | FAILED | CANCELLED
    task_name: str = ""
    error_message: str = ""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> FinalStatus:
        data = dict(data or {})
        return cls(
            state=str(data.get("state") or "UNKNOWN").upper(),
            task_name=str(data.get("pipeline_task_name") or data.get("task_name") or ""),
            error_message=str(data.get("error_message") or ""),
        )

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


def run_prefix(pipeline_root: str, pipeline_name: str, run_id: str) -> str:
    """Where the KFP backend puts a run's artifacts: `<pipeline_root>/<pipeline name>/<run id>`.
    `minio://` roots are the same objects over the S3 API."""
    root = str(pipeline_root).rstrip("/")
    if root.startswith("minio://"):
        root = "s3://" + root.removeprefix("minio://")
    return storage.join(root, pipeline_name, run_id) if storage.is_s3(root) else str(Path(root, pipeline_name, run_id))


def _is_job_copy(uri: str, prefix: str) -> bool:
    parts = uri[len(prefix) :].strip("/").split("/")
    return any(_JOB_DIR.match(p) for p in parts[:-1])  # a directory on the way, never the file itself


def cleanup_job_copies(pipeline_root: str, pipeline_name: str, run_id: str) -> list[str]:
    """Delete this run's `-job` / `-job-inputs` copies; returns the deleted URIs (sorted)."""
    if not (pipeline_root and pipeline_name and run_id):
        return []
    prefix = run_prefix(pipeline_root, pipeline_name, run_id)
    doomed = [uri for uri in storage.list_uris(prefix) if _is_job_copy(uri, prefix)]
    for uri in doomed:
        storage.delete(uri)
    if not storage.is_s3(prefix):  # local roots: drop the emptied directories too
        for uri in doomed:
            for parent in Path(uri).parents:
                if parent == Path(prefix) or not str(parent).startswith(prefix):
                    break
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
    return sorted(doomed)


def record_failure(
    status: FinalStatus,
    pipeline_run_id: str,
    tracking_uri: str | None = None,
    run_name: str | None = None,
) -> str | None:
    """Tag the MLflow run of `pipeline_run_id` as failed; returns its run id (None when it succeeded)."""
    if status.succeeded:
        return None
    from vembed.artifacts.registry import Registry
    from vembed.redaction import redact

    registry = Registry(tracking_uri)
    client = registry.client
    run_id = registry.find_run(pipeline_run_id, TAG_PIPELINE_RUN)
    if run_id is None:  # the run failed before register logged anything
        tags = {TAG_PIPELINE_RUN: pipeline_run_id}
        run_id = client.create_run(registry.experiment_id(), tags=tags, run_name=run_name).info.run_id
    client.set_tag(run_id, TAG_STATUS, status.state)
    if status.task_name:
        client.set_tag(run_id, TAG_FAILED_TASK, status.task_name)
    reason = redact(status.error_message or "no reason given by the pipeline backend")
    client.set_tag(run_id, TAG_REASON, reason[:_MAX_REASON])
    client.set_terminated(run_id, "KILLED" if status.state == "CANCELLED" else "FAILED")
    return run_id


def finalize(
    status: FinalStatus,
    *,
    pipeline_root: str,
    pipeline_name: str,
    pipeline_run_id: str,
    run_name: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Both jobs of the exit step. A failure to clean up never hides the failure record, and vice versa."""
    from vembed.errors import VembedError, error_line

    out: dict[str, Any] = {"state": status.state, "deleted": [], "mlflow_run_id": None, "problems": []}
    try:
        out["deleted"] = cleanup_job_copies(pipeline_root, pipeline_name, pipeline_run_id)
    except (VembedError, OSError) as e:  # OSError: a local pipeline root (kfp.local) refused a delete
        out["problems"].append(f"cleanup: {error_line(e)}")
    if not status.succeeded:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            out["problems"].append("no MLflow tracking URI: the failure is not recorded there")
        else:
            try:
                out["mlflow_run_id"] = record_failure(status, pipeline_run_id, uri, run_name)
            except Exception as e:  # noqa: BLE001 - MLflow raises many types; report, never mask the run's state
                out["problems"].append(f"mlflow: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return out
