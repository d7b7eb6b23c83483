"""KFP component: register the adapter and merged model in MLflow; move `champion` only when told to."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model

from components.settings import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    adapter: Input[Model],
    merged_model: Input[Model],
    metrics: Input[Metrics],
    dataset: Input[Dataset],
    model_name: str,
    promote: bool,
    promotion_metric: str = "ndcg@10",
    min_delta: float = 0.0,
    mlflow_tracking_uri: str = "",
    s3_endpoint_url: str = "",
    pipeline_run_id: str = "",
    pipeline_run_name: str = "",
) -> str:
    """Log an MLflow run with the evaluation metrics and create a version of `model_name` holding the
    adapter and the merged model, with alias `challenger`. With `promote` (the evaluate gate passed) the
    registry may move `champion` to it; without, `champion` stays. Returns JSON: model_name, version,
    aliases, promoted, reason, run_id."""
    import json
    import tempfile

    from vembed.artifacts.promotion import results_of
    from vembed.pipeline.steps import use_endpoints
    from vembed.pipeline.steps.evaluate import eval_set_sha256
    from vembed.pipeline.steps.register import register as run_register
    from vembed.retry import run_step

    evaluation = {"results": results_of(metrics.metadata), "decision": {"passed": bool(promote)}}
    run_info = {
        "base_model": adapter.metadata.get("base_model"),
        "dataset_sha256": dataset.metadata.get("dataset_sha256"),
        "pipeline_run_id": pipeline_run_id or None,
        "run_name": pipeline_run_name or None,
    }

    def attempt() -> dict:
        use_endpoints(mlflow_tracking_uri, s3_endpoint_url, "register in")
        with tempfile.TemporaryDirectory() as scratch:
            return run_register(
                adapter.path,
                merged_model.path,
                evaluation,
                model_name,
                eval_set_sha256(dataset.path),
                promotion_metric=promotion_metric,
                min_delta=min_delta,
                output_dir=scratch,
                training_run_info=run_info,
            )

    # Safe to retry (versions are found again by content key): transient MLflow/S3 failures are
    # retried here; anything else fails at once with one line.
    result = run_step(attempt)
    print(json.dumps(result, indent=2, default=str))
    return json.dumps(result, default=str)
