"""KFP component: LoRA fine-tuning on a prepared Dataset, producing an adapter Model and an HTML report.

Two components share one function:
- `train`: the pod trains itself (trainer.backend local), with the task's resources and GPUs.
- `train_on_cluster`: the pod only launches a Kubeflow TrainJob / PyTorchJob and waits for it
  (docs/multinode.md). The task's resources, node selector, tolerations and affinity are not applied to
  this pod but handed to the job's nodes (`dsl.TaskConfig` passthroughs); env (secret references
  included) and volumes go to both, since this pod needs the storage credentials too.
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
    task_config: dsl.TaskConfig,
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
    vembed_config.yaml) plus training_log.txt; `report` gets the loss curve.

    With trainer.backend trainjob / pytorchjob: `train_backend` is the backend the pipeline was compiled
    for (empty: as the config says), `job_image` the job's image when trainer.image is unset, and the job
    writes to `job_output_uri` (default: `<model artifact URI>-job`, s3:// or a shared-PVC path)."""
    import dataclasses
    import os
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from vembed.retry import run_step
    from vembed.steps.launch import job_output_uri as default_job_output_uri
    from vembed.steps.train import render_report
    from vembed.steps.train import train as run_train

    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    out = Path(model.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Train next to the artifact (same filesystem), then move the final checkpoint into place.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".train-") as work:
        def attempt() -> dict:
            return run_train(
                dataset.path,
                work,
                base_model or None,
                list(config_overrides),
                config_path or None,
                output_uri=job_output_uri or default_job_output_uri(model.uri),
                task_config=dataclasses.asdict(task_config) if task_config else None,
                backend=train_backend or None,
                job_image=job_image or None,
            )

        # Bad config or data fails at once with one line; a transient storage error is retried.
        summary = run_step(attempt)
        if out.exists():  # a retried attempt in the same place
            shutil.rmtree(out)
        shutil.move(summary["checkpoint_dir"], out)
        shutil.copy2(summary["log_path"], out / "training_log.txt")
    Path(report.path).write_text(render_report(summary), encoding="utf-8")
    model.metadata.update(
        base_model=summary["config"]["model_name"],
        final_loss=summary["final_loss"],
        global_step=summary["global_step"],
    )
    outputs = namedtuple("TrainOutputs", ["final_loss", "global_step"])
    return outputs(summary["final_loss"], summary["global_step"])


# What the job's nodes get from the task (apply_to_task=False: not this pod, which needs no GPU node).
CLUSTER_PASSTHROUGHS = [
    dsl.TaskConfigField.RESOURCES,
    dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
    dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
    dsl.TaskConfigField.KUBERNETES_AFFINITY,
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True),
]

train_on_cluster = dsl.component(
    train.python_func,
    base_image=GPU_IMAGE,
    install_kfp_package=False,
    task_config_passthroughs=CLUSTER_PASSTHROUGHS,
)
