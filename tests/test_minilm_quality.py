"""On the real all-MiniLM-L6-v2, a short LoRA run lowers the loss and raises nDCG@10
over the base model on held-out pairs (built from Python's own docstrings)."""

import pytest
import torch

from vembed.config import load_config
from vembed.data import read_records
from vembed.demo_data import build_demo_dataset
from vembed.evaluation import compare_models
from vembed.losses import info_nce
from vembed.predictor import Predictor
from vembed.training import train


def held_out_loss(model: str, eval_path: str, batch_size: int = 32) -> float:
    """The training objective on fixed held-out batches (logged training losses vary with each
    batch's make-up, so they are no fair before/after comparison)."""
    records = list(read_records(eval_path))
    predictor = Predictor(model)
    losses = []
    for start in range(0, len(records) - batch_size + 1, batch_size):
        batch = records[start : start + batch_size]
        q = torch.from_numpy(predictor.encode_text([r.query for r in batch], is_query=True))
        p = torch.from_numpy(predictor.encode_text([r.positive for r in batch]))
        losses.append(info_nce(q, p, temperature=0.05).item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_short_lora_run_beats_base_on_held_out(tmp_path):
    data = build_demo_dataset(tmp_path / "data", max_train=600)
    cfg = load_config(
        None,
        {
            "model_name": "sentence-transformers/all-MiniLM-L6-v2",
            "lora_target_modules": ["query", "value"],
            "data_path": data["train"],
            "output_dir": str(tmp_path / "out"),
            "batch_size": 32,
            "max_seq_length": 64,
            "learning_rate": 5e-4,
            "max_steps": 18,
            "logging_steps": 3,
        },
    )
    result = train(cfg)
    base_loss = held_out_loss(cfg.model_name, data["eval"])
    tuned_loss = held_out_loss(str(result.checkpoint_dir), data["eval"])
    assert tuned_loss < base_loss, (base_loss, tuned_loss)
    metrics = compare_models({"base": cfg.model_name, "tuned": str(result.checkpoint_dir)}, data["eval"])
    base, tuned = metrics["base"]["full"], metrics["tuned"]["full"]
    assert tuned["ndcg@10"] > base["ndcg@10"], (base, tuned)
