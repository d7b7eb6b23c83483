import json

from kfp import dsl

from components.on_exit.component import on_exit


def status(state: str) -> dsl.PipelineTaskFinalStatus:
    return dsl.PipelineTaskFinalStatus(
        state=state, pipeline_job_resource_name="runs/r1", pipeline_task_name="exit-handler-1",
        error_code=None, error_message="",
    )  # fmt: skip


def test_removes_this_runs_job_copies_and_keeps_the_rest(no_services, tmp_path) -> None:
    run = tmp_path / "lora-finetune" / "r1" / "train"
    (run / "model-job").mkdir(parents=True)
    (run / "model-job" / "adapter_model.safetensors").write_bytes(b"x")
    (run / "model").mkdir()
    (run / "model" / "adapter_model.safetensors").write_bytes(b"x")
    out = json.loads(on_exit.python_func(status=status("SUCCEEDED"), pipeline_root=str(tmp_path),
                                         pipeline_name="lora-finetune", pipeline_run_id="r1"))  # fmt: skip
    assert out["state"] == "SUCCEEDED" and out["problems"] == []
    assert out["deleted"] == [str(run / "model-job" / "adapter_model.safetensors")]
    assert (run / "model" / "adapter_model.safetensors").is_file()


def test_a_failure_without_mlflow_is_a_warning_not_a_failed_exit_task(no_services, capsys) -> None:
    out = json.loads(on_exit.python_func(status=status("FAILED"), pipeline_root="", pipeline_name="p", pipeline_run_id="r"))
    assert out["problems"] and "warning: no MLflow" in capsys.readouterr().out
