"""The pipeline's exit step (vembed.pipeline.steps.finalize) as a plain function: S3 cleanup on moto, the failure
record on a real `mlflow server`; and the on-exit component's wiring in the compiled pipeline is
checked in tests/pipeline/test_pipeline_compile.py."""

from __future__ import annotations

import pytest

from vembed.pipeline.steps.finalize import (
    TAG_FAILED_TASK,
    TAG_PIPELINE_RUN,
    TAG_REASON,
    TAG_STATUS,
    FinalStatus,
    cleanup_job_copies,
    finalize,
    run_prefix,
)

RUN = "3f2c1a9e-run"


def put(s3, bucket: str, *keys: str) -> None:
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")


def keys(s3, bucket: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_cleanup_deletes_only_this_runs_job_copies(s3_env) -> None:
    s3 = s3_env.client()
    s3.create_bucket(Bucket="mlpipeline")
    root = "v2/artifacts/lora-finetune"
    mine = [
        f"{root}/{RUN}/train/model-job/checkpoint-4/adapter_model.safetensors",
        f"{root}/{RUN}/train/model-job/.vembed-manifest.json",
        f"{root}/{RUN}/train/model-job-inputs/0/train.jsonl",
    ]
    kept = [
        f"{root}/{RUN}/train/model/adapter_model.safetensors",  # the step's real output
        f"{root}/{RUN}/prepare/dataset/train.jsonl",
        f"{root}/{RUN}/train/notes-job",  # a file, not a -job directory
        f"{root}/other-run/train/model-job/adapter_model.safetensors",  # another run's copy
    ]
    put(s3, "mlpipeline", *mine, *kept)
    # KFP's default root is minio://; it is the same bucket over the S3 API.
    deleted = cleanup_job_copies("minio://mlpipeline/v2/artifacts", "lora-finetune", RUN)
    assert deleted == sorted(f"s3://mlpipeline/{k}" for k in mine)
    assert keys(s3, "mlpipeline") == set(kept)
    assert cleanup_job_copies("minio://mlpipeline/v2/artifacts", "lora-finetune", RUN) == []  # nothing left


def test_cleanup_on_a_local_root_removes_the_emptied_directories(tmp_path) -> None:
    job = tmp_path / "lora-finetune" / RUN / "train" / "model-job" / "checkpoint-2"
    job.mkdir(parents=True)
    (job / "adapter_model.safetensors").write_bytes(b"x")
    model = tmp_path / "lora-finetune" / RUN / "train" / "model"
    model.mkdir(parents=True)
    (model / "adapter_model.safetensors").write_bytes(b"x")
    deleted = cleanup_job_copies(str(tmp_path), "lora-finetune", RUN)
    assert deleted == [str(job / "adapter_model.safetensors")]
    assert not (tmp_path / "lora-finetune" / RUN / "train" / "model-job").exists()
    assert (model / "adapter_model.safetensors").is_file()
    assert run_prefix(str(tmp_path), "lora-finetune", RUN) == str(tmp_path / "lora-finetune" / RUN)


def test_a_local_cleanup_that_fails_still_reports_the_failure(tmp_path, monkeypatch) -> None:
    """A PermissionError deleting a local job copy escaped finalize: the failure record never ran."""
    from vembed.artifacts import storage

    job = tmp_path / "lora-finetune" / RUN / "train" / "model-job"
    job.mkdir(parents=True)
    (job / "adapter_model.safetensors").write_bytes(b"x")

    def refuse(uri: str) -> None:  # root ignores file modes here, so the file system's refusal is injected
        raise PermissionError(13, "Permission denied", uri)

    monkeypatch.setattr(storage, "delete", refuse)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = finalize(FinalStatus("FAILED", "train", "boom"), pipeline_root=str(tmp_path), pipeline_name="lora-finetune",
                   pipeline_run_id=RUN)
    assert out["problems"] == [f"cleanup: {job / 'adapter_model.safetensors'}: Permission denied",
                               "no MLflow tracking URI: the failure is not recorded there"]


def test_failed_run_is_tagged_on_its_mlflow_run(mlflow_server, s3_env, monkeypatch) -> None:
    from mlflow import MlflowClient

    from vembed.artifacts.registry import Registry

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "finalize-test")
    registry = Registry(mlflow_server.uri)
    # A run that register already logged for this pipeline run gets the tags...
    existing = registry.client.create_run(registry.experiment_id(), tags={TAG_PIPELINE_RUN: "run-a"}).info.run_id
    status = FinalStatus("FAILED", "exit-handler-1", "task train failed: OOMKilled (exit code 137)")
    out = finalize(status, pipeline_root="", pipeline_name="lora-finetune", pipeline_run_id="run-a",
                   tracking_uri=mlflow_server.uri)  # fmt: skip
    assert out["mlflow_run_id"] == existing and out["problems"] == []
    run = MlflowClient(mlflow_server.uri).get_run(existing)
    assert run.data.tags[TAG_STATUS] == "FAILED"
    assert run.data.tags[TAG_FAILED_TASK] == "exit-handler-1"
    assert "OOMKilled" in run.data.tags[TAG_REASON]
    assert run.info.status == "FAILED"

    # ...and a run that failed before anything was logged gets a run of its own, found by the tag.
    secret = "postgresql://user:hunter2@db/mlflow"
    out = finalize(FinalStatus("CANCELLED", "", f"cancelled while connecting to {secret}"), pipeline_root="",
                   pipeline_name="lora-finetune", pipeline_run_id="run-b", run_name="nightly",
                   tracking_uri=mlflow_server.uri)  # fmt: skip
    created = MlflowClient(mlflow_server.uri).get_run(out["mlflow_run_id"])
    assert created.data.tags[TAG_PIPELINE_RUN] == "run-b" and created.info.status == "KILLED"
    assert "hunter2" not in created.data.tags[TAG_REASON], "credentials in the reason are redacted"


def test_succeeded_run_records_nothing_and_missing_mlflow_is_a_warning(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ok = finalize(FinalStatus("SUCCEEDED"), pipeline_root="", pipeline_name="p", pipeline_run_id="r")
    assert ok == {"state": "SUCCEEDED", "deleted": [], "mlflow_run_id": None, "problems": []}
    failed = finalize(FinalStatus("FAILED", "t", "boom"), pipeline_root="", pipeline_name="p", pipeline_run_id="r")
    assert failed["problems"] == ["no MLflow tracking URI: the failure is not recorded there"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"state": "failed", "pipeline_task_name": "exit-handler-1", "error_message": "x"}, FinalStatus("FAILED", "exit-handler-1", "x")),
        (None, FinalStatus("UNKNOWN")),
    ],
)
def test_final_status_from_kfp_fields(data, expected) -> None:
    assert FinalStatus.from_mapping(data) == expected


@pytest.mark.slow
def test_on_exit_component_runs_after_a_failed_step_on_kfp_local(mlflow_server, s3_env, tmp_path, monkeypatch) -> None:
    """The thin component in a kfp.local subprocess: prepare fails on a missing file, the exit handler
    still runs and tags a FAILED MLflow run for this pipeline run."""
    from kfp import dsl, local
    from mlflow import MlflowClient

    from components.on_exit.component import on_exit
    from components.prepare.component import prepare

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "on-exit-local")

    def failing(raw_uri: str, mlflow_tracking_uri: str):
        exit_task = on_exit(
            pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER, pipeline_name="lora-finetune",
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, mlflow_tracking_uri=mlflow_tracking_uri,
        )  # fmt: skip
        with dsl.ExitHandler(exit_task):
            prepare(raw_uri=raw_uri)

    failing.__annotations__ = {"raw_uri": str, "mlflow_tracking_uri": str}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=False)
    dsl.pipeline(failing)(raw_uri=str(tmp_path / "missing.jsonl"), mlflow_tracking_uri=mlflow_server.uri)

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("on-exit-local")
    assert experiment is not None, "the exit task did not record the failure"
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_STATUS}` = 'FAILED'")
    assert run.data.tags[TAG_PIPELINE_RUN] and run.info.status == "FAILED"
