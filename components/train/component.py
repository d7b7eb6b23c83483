"""KFP component: LoRA fine-tuning on a prepared Dataset, producing an adapter Model and an HTML report.

Two components, one body (`vembed.pipeline.steps.train.train_component`):
- `train`: the pod trains itself (trainer.backend local), with the task's resources and GPUs. It has
  no `dsl.TaskConfig` input, so the default compile runs on KFP backends older than 2.15.
- `train_on_cluster` (components/train/cluster.py): the pod only launches a Kubeflow TrainJob / PyTorchJob
  and waits for it (docs/multinode.md); the task's settings pass through to the job's nodes (KFP 2.15+).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output

from components.settings import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    model: Output[Model],
    report: Output[HTML],
    base_model: str = "",
    config_overrides: list = [],  # noqa: B006 - KFP reads the default from the signature; never mutated
    config_path: str = "",
    s3_endpoint_url: str = "",
    train_backend: str = "",
    job_image: str = "",
    job_output_uri: str = "",
) -> NamedTuple("TrainOutputs", [("final_loss", float), ("global_step", int)]):
    """Fine-tune `base_model` (default: the config's model_name) with `config_overrides` (["lora_r=32", ...])
    on `dataset`. `model` receives the final adapter checkpoint (adapter_model.safetensors, adapter_config.json,
    vembed_config.yaml) plus training_log.txt; `report` gets the loss curve. `config_path` may name a
    config inside the image (`examples/x.yaml` resolves to /opt/vembed/examples/x.yaml).

    With trainer.backend trainjob / pytorchjob: `train_backend` is the backend the pipeline was compiled
    for (empty: as the config says), `job_image` the job's image when trainer.image is unset, and the job
    writes to `job_output_uri` (default: `<model artifact URI>-job`, s3:// or a shared-PVC path)."""
    inputs = dict(locals())  # the parameters above, before any import adds a name
    from collections import namedtuple

    from vembed.pipeline.steps.train import train_component

    return namedtuple("TrainOutputs", ["final_loss", "global_step"])(*train_component(**inputs))


from components.train.cluster import train as train_on_cluster  # noqa: E402 - re-exported next to `train`

__all__ = ["train", "train_on_cluster"]
