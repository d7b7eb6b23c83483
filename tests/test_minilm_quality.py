"""On the real all-MiniLM-L6-v2, a short LoRA run lowers the loss and raises nDCG@10
over the base model on held-out pairs (built from Python's own docstrings)."""

import pytest

from vembed.config import load_config
from vembed.demo_data import build_demo_dataset
from vembed.evaluation import compare_models
from vembed.training import train


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
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    metrics = compare_models({"base": cfg.model_name, "tuned": str(result.checkpoint_dir)}, data["eval"])
    base, tuned = metrics["base"]["full"], metrics["tuned"]["full"]
    assert tuned["ndcg@10"] > base["ndcg@10"], (base, tuned)
