"""KFP component: the train step for a pod that launches a Kubeflow TrainJob / PyTorchJob (docs/multinode.md).

A module of its own so that the component is also named `train` (task `train`, executor `exec-train`)
in either compile; `components.train.component.train_on_cluster` is this component.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output

from components.settings import GPU_IMAGE

# What the job's nodes get from the task (apply_to_task=False: not this pod, which needs no GPU node).
# Resources apply to this pod (its small requests and limits, so it is not the first evicted); the job's
# own come in `job_settings`, which replace the task's in the job. Env (secret references included) and
# volumes go to both: this pod needs the storage credentials too.
CLUSTER_PASSTHROUGHS = [
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.RESOURCES, apply_to_task=True),
    dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
    dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
    dsl.TaskConfigField.KUBERNETES_AFFINITY,
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True),
]


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False, task_config_passthroughs=CLUSTER_PASSTHROUGHS)
def train(
    dataset: Input[Dataset],
    model: Output[Model],
    report: Output[HTML],
    task_config: dsl.TaskConfig,
    base_model: str = "",
    config_overrides: list = [],  # noqa: B006 - KFP reads the default from the signature; never mutated
    config_path: str = "",
    s3_endpoint_url: str = "",
    train_backend: str = "",
    job_image: str = "",
    job_output_uri: str = "",
    job_settings: dict = {},  # noqa: B006 - KFP reads the default from the signature; never mutated
) -> NamedTuple("TrainOutputs", [("final_loss", float), ("global_step", int)]):
    """`train` for a pod that launches a cluster job. `job_settings`: {"resources": {"requests": ...,
    "limits": ...}, "image_pull_secrets": [...]} for the job's pods (trainer.* in the config wins)."""
    inputs = dict(locals())  # the parameters above, before any import adds a name
    from collections import namedtuple

    from vembed.pipeline.steps.train import train_component

    return namedtuple("TrainOutputs", ["final_loss", "global_step"])(*train_component(**inputs))
