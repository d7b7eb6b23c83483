"""KFP component: validate, deduplicate and split raw JSONL into a train/eval Dataset."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.settings import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare(
    raw_uri: str,
    dataset: Output[Dataset],
    eval_fraction: float = 0.1,
    seed: int = 0,
    on_bad_record: str = "error",
    s3_endpoint_url: str = "",
    mine_negatives: str = "",
) -> str:
    """Read `raw_uri` (a JSONL file, a folder, an s3:// prefix, or `<prefix>/latest` for the newest
    snapshot) and write `train.jsonl`, `eval.jsonl` and a manifest into `dataset`. `mine_negatives`: a model
    that mines hard negatives into the train split ("" = off). Returns the summary JSON."""
    import json

    from vembed.pipeline.steps import use_endpoints
    from vembed.pipeline.steps.prepare import prepare as run_prepare
    from vembed.retry import run_step

    use_endpoints(s3_endpoint_url=s3_endpoint_url)
    # Transient failures (network, 5xx, throttling) are retried; bad data fails at once, in one line.
    summary = run_step(
        lambda: run_prepare(
            raw_uri,
            dataset.path,
            eval_fraction=eval_fraction,
            seed=seed,
            on_bad_record=on_bad_record,
            mine_negatives=mine_negatives or None,
        )
    )
    dataset.metadata.update({k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool))})
    return json.dumps(summary, default=str)
