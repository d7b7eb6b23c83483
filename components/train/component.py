"""KFP component: LoRA fine-tuning on a prepared Dataset, producing an adapter Model and an HTML report."""

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
) -> NamedTuple("TrainOutputs", [("final_loss", float), ("global_step", int)]):
    """Fine-tune `base_model` (default: the config's model_name) with `config_overrides` (["lora_r=32", ...])
    on `dataset`. `model` receives the final adapter checkpoint (adapter_model.safetensors, adapter_config.json,
    vembed_config.yaml) plus training_log.txt; `report` gets the loss curve."""
    import os
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from vembed.errors import VembedError
    from vembed.steps.train import render_report
    from vembed.steps.train import train as run_train

    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    out = Path(model.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Train next to the artifact (same filesystem), then move the final checkpoint into place.
    # Launch backends other than this process (multi-node jobs) plug in here.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".train-") as work:
        try:
            summary = run_train(dataset.path, work, base_model or None, list(config_overrides), config_path or None)
        except VembedError as e:  # one readable line in the pod log, not a traceback
            raise SystemExit(f"error: {e}") from None
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
