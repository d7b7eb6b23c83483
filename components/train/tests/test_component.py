import pytest
from kfp import dsl

from components.train.component import train, train_on_cluster


def test_two_variants_one_name_task_config_only_on_the_cluster_one() -> None:
    assert train.name == train_on_cluster.name == "train"
    local, cluster = (set(c.component_spec.inputs) for c in (train, train_on_cluster))
    assert cluster - local == {"task_config", "job_settings"}  # otherwise the same inputs
    assert "task_config" not in local  # so the default compile runs on KFP backends before 2.15


@pytest.mark.parametrize("component", [train, train_on_cluster], ids=["local", "cluster"])
def test_without_a_prepared_dataset_the_step_fails_in_one_line(component, artifact, no_services) -> None:
    dataset = artifact(dsl.Dataset, "dataset")
    model, report = artifact(dsl.Model, "model"), artifact(dsl.HTML, "report")
    extra = {"task_config": None} if component is train_on_cluster else {}
    with pytest.raises(SystemExit, match=r"^error: .*no train\.jsonl"):
        component.python_func(dataset=dataset, model=model, report=report, **extra)
    assert model.metadata == {}
