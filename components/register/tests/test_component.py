import pytest
from kfp import dsl

from components.register.component import register


def test_without_mlflow_nothing_is_registered_in_a_throwaway_store(artifact, no_services, tmp_path) -> None:
    with pytest.raises(SystemExit, match="^error: no MLflow to register in: set the mlflow_tracking_uri parameter$"):
        register.python_func(
            adapter=artifact(dsl.Model, "adapter"), merged_model=artifact(dsl.Model, "merged"),
            metrics=artifact(dsl.Metrics, "metrics"), dataset=artifact(dsl.Dataset, "dataset"),
            model_name="docs-search", promote=True,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no mlruns/, no sqlite file
