"""KFP component: the pipeline's exit task (`dsl.ExitHandler`): clean up cluster-job copies, record failures."""

from kfp import dsl

from components.settings import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def on_exit(
    status: dsl.PipelineTaskFinalStatus,
    pipeline_root: str = "",
    pipeline_name: str = "",
    pipeline_run_id: str = "",
    pipeline_run_name: str = "",
    mlflow_tracking_uri: str = "",
    s3_endpoint_url: str = "",
) -> str:
    """Delete this run's `<artifact>-job` / `-job-inputs` S3 copies; when the run did not succeed, tag
    its MLflow run (vembed.pipeline_status, vembed.failed_task, vembed.failure_reason). Never fails the
    run itself: problems are printed. Returns JSON: state, deleted, mlflow_run_id, problems."""
    import dataclasses
    import json

    from vembed.pipeline.steps import use_endpoints
    from vembed.pipeline.steps.finalize import FinalStatus, finalize

    use_endpoints(mlflow_tracking_uri, s3_endpoint_url)
    result = finalize(
        FinalStatus.from_mapping(dataclasses.asdict(status)),
        pipeline_root=pipeline_root,
        pipeline_name=pipeline_name,
        pipeline_run_id=pipeline_run_id,
        run_name=pipeline_run_name or None,
    )
    for problem in result["problems"]:
        print(f"warning: {problem}")
    print(json.dumps(result, indent=2))
    return json.dumps(result)
