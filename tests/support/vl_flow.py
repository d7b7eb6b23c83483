"""The end-to-end flow shared by the CLIP and Qwen3-VL tests: an example config trained through
the `run.py` command on the synthetic shapes set, merged, evaluated and encoded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vembed.cli import main as cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass
class TrainedFlow:
    base: str
    checkpoint: Path
    merged: Path
    history: list[dict[str, Any]]
    eval_path: Path
    data_dir: Path


def one_thread():
    """Tiny models run faster on one thread than on two that contend with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_example(example: str, model_dir: str, data: dict[str, Any], out: Path, *overrides: str) -> TrainedFlow:
    """`python run.py examples/<example> --config_override ...`, then `vembed merge`."""
    args = [
        f"model_name={model_dir}",
        f"data_path={data['train']}",
        f"eval_data_path={data['eval']}",
        f"output_dir={out}",
        *overrides,
    ]
    assert cli(["train", str(EXAMPLES / example), "--config_override", *args]) == 0
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((checkpoint / "trainer_state.json").read_text())["history"]
    assert cli(["merge", str(checkpoint), str(out / "merged")]) == 0
    return TrainedFlow(model_dir, checkpoint, out / "merged", history, Path(data["eval"]), Path(data["train"]).parent)


def assert_merged_matches_adapter(trained: TrainedFlow, tol: float = 1e-5):
    """Images and texts embed the same through the adapter checkpoint and the merged model.
    Returns both predictors for family-specific checks."""
    import numpy as np

    from vembed.inference.predictor import Predictor

    adapter, merged = Predictor(trained.checkpoint, device="cpu"), Predictor(trained.merged, device="cpu")
    images = sorted((trained.data_dir / "images").glob("*.png"))[:6]
    texts = ["a red circle on the left", "a blue square at the top"]
    for encode in ("encode_image", "encode_text"):
        inputs = images if encode == "encode_image" else texts
        a, m = getattr(adapter, encode)(inputs), getattr(merged, encode)(inputs)
        assert a.shape == (len(inputs), adapter.dim)
        assert np.abs(a - m).max() <= tol
    return adapter, merged
