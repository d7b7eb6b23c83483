"""KFP component: merge the LoRA adapter into its base model (sentence-transformers compatible)."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.settings import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def merge(model: Input[Model], merged_model: Output[Model]) -> None:
    """Write a standalone model (safetensors; loadable by AutoModel and SentenceTransformer) to `merged_model`."""
    from vembed.pipeline.steps.merge import merge as run_merge
    from vembed.retry import run_step

    summary = run_step(lambda: run_merge(model.path, merged_model.path))  # errors: one line, no traceback
    merged_model.metadata.update(base_model=model.metadata.get("base_model", ""), files=len(summary["files"]))
