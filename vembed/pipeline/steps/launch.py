"""Train where `cfg.trainer` says, from a pipeline step: this pod or a Kubeflow job (docs/multinode.md).

- backend local: `accelerate launch`, one process per GPU of this pod, writing to a local output_dir.
- backend trainjob / pytorchjob: a cluster job whose nodes read the inputs from and publish the final
  checkpoint to `output_uri` (s3://, or a path on a PVC that this pod and the job both mount); this step
  then downloads it. Local input files are first copied next to `output_uri` so the job can read them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vembed.artifacts import storage
from vembed.config import TrainConfig
from vembed.errors import ConfigError
from vembed.pipeline.launchers.jobspec import TaskSettings
from vembed.pipeline.launchers.stage import DATA_KEYS, final_checkpoint
from vembed.pipeline.launchers.wait import LogFn, print_line, wait_for_job

LAUNCH_CONFIG = "launch-config.yaml"
JOB_DONE = "job-done.json"  # in the step's output_dir: its cluster job succeeded, writing to this output_uri


def needs_launcher(cfg: TrainConfig) -> bool:
    """True when training cannot simply run inside this process (more GPUs, or a cluster job)."""
    return cfg.trainer.backend != "local" or cfg.trainer.gpus_per_node > 1


def job_output_uri(artifact_uri: str) -> str:
    """Where a cluster job writes for a step whose output artifact lives at `artifact_uri`: a sibling
    `<artifact_uri>-job`. KFP's default pipeline root `minio://bucket/...` is the same object over the
    S3 API, so it becomes `s3://bucket/...` (the endpoint comes from AWS_ENDPOINT_URL). Other schemes
    pass through unchanged; the launcher refuses what is neither s3:// nor an absolute path."""
    uri = str(artifact_uri).rstrip("/")
    if uri.startswith("minio://"):
        uri = "s3://" + uri.removeprefix("minio://")
    return f"{uri}-job"


def inputs_uri(output_uri: str) -> str:
    """Where local input files are copied for a job: a sibling of the output, never inside it."""
    return f"{str(output_uri).rstrip('/')}-inputs"


def publish_inputs(cfg: TrainConfig, output_uri: str) -> TrainConfig:
    """Copy the directories of local data files to `inputs_uri(output_uri)` and point the config there."""
    updates: dict[str, str] = {}
    published: dict[Path, str] = {}
    for key in DATA_KEYS:
        if not (value := getattr(cfg, key)) or storage.is_s3(value):
            continue
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{key}: {value} not found")
        parent = path.parent.resolve()
        if parent not in published:
            published[parent] = storage.join(inputs_uri(output_uri), str(len(published)))
            storage.upload_dir(parent, published[parent])
        updates[key] = storage.join(published[parent], path.name)
    return cfg.model_copy(update=updates)


def train_via_launcher(
    cfg: TrainConfig,
    output_dir: str | os.PathLike[str],
    output_uri: str | None = None,
    task_config: Mapping[str, Any] | None = None,
    *,
    client_configuration: Any = None,
    poll_interval: float = 10.0,
    log: LogFn = print_line,
) -> dict[str, Any]:
    """The train step's path when `needs_launcher(cfg)`: run the training `cfg.trainer` describes, with the
    checkpoint, training_log.txt and the launch's config in `output_dir`, and return the step's summary.
    A job writes to `output_uri` (s3:// or a shared-PVC path) and gets `task_config`, the KFP task's
    settings (`dataclasses.asdict(dsl.TaskConfig)`); `client_configuration` defaults to in-cluster or kubeconfig.
    """
    t = cfg.trainer
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / LAUNCH_CONFIG
    if t.backend == "local":
        from vembed.pipeline.launchers.local import run_local

        local_cfg = cfg.model_copy(update={"output_dir": str(out)})
        local_cfg.save(config_path)
        run_local(local_cfg, config_path)
        final = final_checkpoint(out)
    else:
        if not (output_uri and (storage.is_s3(output_uri) or Path(output_uri).is_absolute())):
            raise ConfigError(
                f"trainer.backend {t.backend}: the output {output_uri!r} must be an s3:// URI or an absolute path "
                "on a volume the job also mounts (in the pipeline: the train component's job_output_uri)"
            )
        done = out / JOB_DONE
        # A retried step (vembed.retry.run_step, e.g. after a transient failure of the download below)
        # fetches the finished job's output again instead of training all over in a second job.
        if not (done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("output_uri") == str(output_uri)):
            job_cfg = publish_inputs(cfg, output_uri).model_copy(update={"output_dir": str(output_uri)})
            job_cfg.save(config_path)
            if t.backend == "trainjob":
                from vembed.pipeline.launchers.trainjob import submit_trainjob as submit
            else:
                from vembed.pipeline.launchers.pytorchjob import submit_pytorchjob as submit
            run = submit(
                job_cfg,
                config_yaml=config_path.read_text(encoding="utf-8"),
                output_uri=str(output_uri),
                task=TaskSettings.from_mapping(task_config),
                client_configuration=client_configuration,
            )
            wait_for_job(run, timeout=t.timeout, keep_job=t.keep_job, poll_interval=poll_interval, log=log)
            done.write_text(json.dumps({"output_uri": str(output_uri), "job": run.description}), encoding="utf-8")
        # A job's s3:// output is downloaded into a fresh subdirectory: storage only replaces complete directories.
        local = storage.download_dir(output_uri, out / "job-output") if storage.is_s3(output_uri) else output_uri
        final = final_checkpoint(local)
    state = json.loads((final / "trainer_state.json").read_text(encoding="utf-8"))
    history = list(state.get("history") or [])
    losses = [h["loss"] for h in history if h.get("loss") is not None]
    return {
        "checkpoint_dir": str(final),
        "final_loss": float(losses[-1]) if losses else math.nan,
        "global_step": int(state.get("global_step", 0)),
        "history": history,
        "config": cfg.model_dump(),
        "log_path": str(final.parent / "training_log.txt"),
    }
