"""KFP component: score tuned vs base (and the current champion) and decide promotion."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components.settings import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    base_model: str = "",
    registered_model_name: str = "",
    promotion_metric: str = "ndcg@10",
    min_delta: float = 0.0,
    mlflow_tracking_uri: str = "",
    s3_endpoint_url: str = "",
) -> NamedTuple("EvaluateOutputs", [("decision", str), ("passed", bool)]):
    """Retrieval metrics on the eval split for the tuned adapter, the base model and, when
    `registered_model_name` has a `champion` alias, the champion. `decision` is "promote" when tuned
    >= max(base, champion) + min_delta on `promotion_metric`, else "hold"."""
    from collections import namedtuple
    from pathlib import Path

    from vembed.artifacts.promotion import flat_metrics
    from vembed.pipeline.steps import use_endpoints
    from vembed.pipeline.steps.evaluate import champion_uri
    from vembed.pipeline.steps.evaluate import evaluate as run_evaluate
    from vembed.retry import run_step

    def attempt() -> dict:
        use_endpoints(mlflow_tracking_uri, s3_endpoint_url, "find the champion in" if registered_model_name else "")
        return run_evaluate(
            model.path,
            Path(dataset.path) / "eval.jsonl",
            base_model=base_model or model.metadata.get("base_model") or None,
            champion=champion_uri(registered_model_name) if registered_model_name else None,
            promotion_metric=promotion_metric,
            min_delta=min_delta,
        )

    result = run_step(attempt)  # transient MLflow failures retried; anything else: one line, at once
    for name, value in flat_metrics(result["results"]).items():
        metrics.log_metric(name, value)
    decision = result["decision"]
    metrics.log_metric("gate/passed", float(decision["passed"]))
    Path(report.path).write_text(result["report"], encoding="utf-8")
    print(result["report"])
    outputs = namedtuple("EvaluateOutputs", ["decision", "passed"])
    return outputs(decision["decision"], decision["passed"])
