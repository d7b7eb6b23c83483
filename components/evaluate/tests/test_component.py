import pytest
from kfp import dsl

from components.evaluate.component import evaluate


def test_a_champion_to_compare_with_needs_mlflow(artifact, no_services) -> None:
    with pytest.raises(SystemExit, match="^error: no MLflow to find the champion in: set the mlflow_tracking_uri"):
        evaluate.python_func(
            dataset=artifact(dsl.Dataset, "dataset"), model=artifact(dsl.Model, "model"),
            metrics=artifact(dsl.Metrics, "metrics"), report=artifact(dsl.Markdown, "report"),
            registered_model_name="docs-search",
        )  # fmt: skip


def test_outputs_feed_the_gate() -> None:
    outputs = evaluate.component_spec.outputs
    assert outputs["decision"].type == "String" and outputs["passed"].type == "Boolean"
    assert outputs["metrics"].type == "system.Metrics@0.0.1"
