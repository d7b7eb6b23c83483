"""On the real all-MiniLM-L6-v2, a short LoRA run lowers the held-out loss and raises nDCG@10 over the
base model on held-out pairs (built from Python's own docstrings), by clear margins.

Fair comparison: base, tuned and control are all scored at the max_seq_length the adapter was trained
with (the base's own default is 256, so a longer-context base would otherwise be compared with a
64-token tuned model). Control: the trained adapter with its LoRA B matrices zeroed, which adds nothing
to the base weights. It must score exactly like the base, so the gain comes from what training learned,
not from the adapter's loading or scoring path.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vembed.config import load_config
from vembed.data import read_records
from vembed.data.demo_data import build_demo_dataset
from vembed.inference.evaluation import build_retrieval_set, retrieval_metrics
from vembed.inference.predictor import Predictor
from vembed.training import train
from vembed.training.losses import info_nce

MAX_SEQ_LENGTH = 64
# Measured on this data (seed 0, 18 steps): held-out loss 0.813 -> 0.752 (-0.061, every one of the 7
# batches lower), nDCG@10 0.821 -> 0.844 (+0.023 = 3.3 standard errors of the paired per-query difference
# over 211 queries). The margins keep about half of that, so a run that learns less fails.
LOSS_MARGIN = 0.03
NDCG_STANDARD_ERRORS = 2.0


def scorer(model: str) -> Predictor:
    predictor = Predictor(model)
    predictor.embedder.spec.max_seq_length = MAX_SEQ_LENGTH  # tokenisation reads it per call
    return predictor


def held_out_losses(predictor: Predictor, records: list, batch_size: int = 32) -> np.ndarray:
    """The training objective on fixed held-out batches, one value per batch (logged training losses vary
    with each batch's make-up, so they are no fair before/after comparison)."""
    losses = []
    for start in range(0, len(records) - batch_size + 1, batch_size):
        batch = records[start : start + batch_size]
        q = torch.from_numpy(predictor.encode_text([r.query for r in batch], is_query=True))
        p = torch.from_numpy(predictor.encode_text([r.positive for r in batch]))
        losses.append(info_nce(q, p, temperature=0.05).item())
    return np.array(losses)


def per_query_ndcg(predictor: Predictor, records: list) -> np.ndarray:
    queries, docs, qrels = build_retrieval_set(records, ())
    q = predictor.encode_items(queries, is_query=True)
    d = predictor.encode_items(docs)
    scores = q @ d.T  # both L2-normalised by the Predictor
    return np.array([retrieval_metrics(scores[i : i + 1], [qrels[i]])["ndcg@10"] for i in range(len(qrels))])


def zeroed_adapter(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's adapter with every LoRA B set to zero: same files and settings, no learned change."""
    out.mkdir()
    for name in ("adapter_config.json", "embedder.json"):
        shutil.copy2(checkpoint / name, out / name)
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    zeroed = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}
    assert sum("lora_B" in k for k in zeroed) > 0
    save_file(zeroed, str(out / "adapter_model.safetensors"))
    return out


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
            "max_seq_length": MAX_SEQ_LENGTH,
            "learning_rate": 5e-4,
            "max_steps": 18,
            "logging_steps": 3,
            "seed": 0,
        },
    )
    result = train(cfg)
    assert json.loads((result.checkpoint_dir / "embedder.json").read_text())["max_seq_length"] == MAX_SEQ_LENGTH
    control = zeroed_adapter(result.checkpoint_dir, tmp_path / "control")
    records = list(read_records(data["eval"]))
    models = {"base": cfg.model_name, "tuned": str(result.checkpoint_dir), "control": str(control)}
    loss, ndcg = {}, {}
    for name, path in models.items():
        predictor = scorer(path)
        loss[name], ndcg[name] = held_out_losses(predictor, records), per_query_ndcg(predictor, records)

    # The control scores like the base: the adapter path alone changes nothing.
    np.testing.assert_allclose(loss["control"], loss["base"], atol=1e-5)
    np.testing.assert_allclose(ndcg["control"], ndcg["base"], atol=1e-6)
    # The trained adapter beats the base by the margins.
    figures = {k: (round(loss[k].mean(), 4), round(ndcg[k].mean(), 4)) for k in models}
    assert loss["tuned"].mean() < loss["base"].mean() - LOSS_MARGIN, figures
    gain = ndcg["tuned"] - ndcg["base"]
    standard_error = gain.std(ddof=1) / np.sqrt(len(gain))
    assert gain.mean() > NDCG_STANDARD_ERRORS * standard_error, (figures, standard_error)
