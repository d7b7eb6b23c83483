"""GradCache gives the gradients of one large-batch step (max relative difference <= 1e-5, fp32).

With dropout on, the large-batch reference is the same function with the same dropout masks:
the chunks are embedded in the same order from the same RNG state, keeping every graph, and one
backward runs through the full-batch loss. Without RNG replay the masks of the re-run chunks
differ, and the control test shows that this is caught.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support.scaleout_helpers import (
    adapter,
    base_config,
    max_rel_diff,
    perturb_lora_b,
    tiny_bert,
    write_pairs,
)
from tests.support.tiny_models import make_tiny_qwen3
from vembed.config import TrainConfig
from vembed.training import train
from vembed.training.data import PairCollator, PairDataset, load_records
from vembed.training.grad_cache import GROUPS, grad_cache_step, split_inputs
from vembed.training.loop import build_accelerator, build_embedder
from vembed.training.losses import build_loss
from vembed.training.step import plain_step

BATCH = 8
CHUNK = 3  # chunks of 3, 3, 2 rows: a partial last chunk


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("gc") / "pairs.jsonl", 24)


@pytest.fixture(scope="module")
def dropout_bert(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("gc") / "bert-dropout", dropout=0.1)


@pytest.fixture(scope="module")
def plain_bert(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("gc") / "bert-nodropout", dropout=0.0)


def setup(model: Path, data: Path, tmp_path: Path, **overrides):
    cfg = TrainConfig(**base_config(model, data, tmp_path, gradient_cache_chunk_size=CHUNK, **overrides))
    accelerator, dtype = build_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    embedder = build_embedder(cfg, dtype)
    if cfg.use_lora:
        perturb_lora_b(embedder)
    embedder.train()
    records, _ = load_records(cfg.data_path, "error")
    dataset = PairDataset(records, embedder)
    batch = PairCollator(embedder)([dataset[i] for i in range(BATCH)])
    assert "negatives" in batch
    return cfg, accelerator, embedder, build_loss(cfg, embedder.dim), batch


def grads_of(embedder: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in embedder.named_parameters() if p.grad is not None}
    embedder.zero_grad(set_to_none=True)
    assert out, "no parameter received a gradient"
    return out


def large_batch_grads(embedder, loss_fn, batch, chunk_size: int, seed: int) -> tuple[float, dict]:
    """One backward through the full-batch loss, every chunk's graph kept (the memory-hungry way)."""
    torch.manual_seed(seed)
    reps = {
        g: torch.cat([embedder(**inputs) for inputs in split_inputs(batch[g], chunk_size)])
        for g in GROUPS
        if g in batch
    }
    loss = loss_fn(reps["query"], reps["positive"], reps.get("negatives"))
    loss.backward()
    return loss.item(), grads_of(embedder)


def grad_cache_grads(cfg, accelerator, embedder, loss_fn, batch, seed: int, **kwargs) -> tuple[float, dict]:
    torch.manual_seed(seed)
    loss = grad_cache_step(cfg, accelerator, embedder, loss_fn, **kwargs)(batch)
    return loss.item(), grads_of(embedder)


CASES = {
    "lora_dropout_negatives": {"lora_dropout": 0.1},
    "lora_dropout_mrl": {"lora_dropout": 0.1, "use_mrl": True, "mrl_dims": [32, 16, 8]},
    "full_finetune_dropout": {"use_lora": False},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grad_cache_equals_large_batch_step_with_dropout(case, dropout_bert, data, tmp_path):
    cfg, accelerator, embedder, loss_fn, batch = setup(dropout_bert, data, tmp_path, **CASES[case])
    ref_loss, ref = large_batch_grads(embedder, loss_fn, batch, CHUNK, seed=11)
    loss, got = grad_cache_grads(cfg, accelerator, embedder, loss_fn, batch, seed=11)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert got.keys() == ref.keys()
    assert max_rel_diff(got, ref) <= 1e-5


def test_without_rng_replay_dropout_breaks_exactness(dropout_bert, data, tmp_path):
    """The control: the comparison above does see dropout masks."""
    cfg, accelerator, embedder, loss_fn, batch = setup(dropout_bert, data, tmp_path, lora_dropout=0.1)
    _, ref = large_batch_grads(embedder, loss_fn, batch, CHUNK, seed=11)
    _, got = grad_cache_grads(cfg, accelerator, embedder, loss_fn, batch, seed=11, replay_rng=False)
    assert max_rel_diff(got, ref) > 1e-3


def test_replay_leaves_the_rng_where_the_no_graph_pass_left_it(dropout_bert, data, tmp_path):
    cfg, accelerator, embedder, loss_fn, batch = setup(dropout_bert, data, tmp_path, lora_dropout=0.1)
    torch.manual_seed(5)
    grad_cache_step(cfg, accelerator, embedder, loss_fn)(batch)
    after_step = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        for g in GROUPS:
            for inputs in split_inputs(batch[g], CHUNK):
                embedder(**inputs)
    assert torch.equal(torch.rand(3), after_step)


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_grad_cache_equals_one_unchunked_step_without_dropout(family, plain_bert, data, tmp_path):
    """No dropout: the reference is the plain step, one forward per group over the whole batch."""
    model = plain_bert if family == "bert" else make_tiny_qwen3(tmp_path / "qwen3")
    cfg, accelerator, embedder, loss_fn, batch = setup(
        model, data, tmp_path, lora_target_modules=["query", "value", "q_proj", "v_proj"]
    )
    plain_step(accelerator, embedder, loss_fn, cross_device=True)(batch)
    ref = grads_of(embedder)
    _, got = grad_cache_grads(cfg, accelerator, embedder, loss_fn, batch, seed=0)
    assert max_rel_diff(got, ref) <= 1e-5


def test_inputs_that_are_not_batch_first_need_the_embedders_splitter():
    inputs = {"input_ids": torch.zeros(4, 3), "pixel_values": torch.zeros(10, 6)}
    with pytest.raises(ValueError, match="split_inputs"):
        split_inputs(inputs, 2)


def test_training_run_with_grad_cache_ends_with_the_same_adapter(plain_bert, data, tmp_path):
    common = {"max_steps": 3, "gradient_cache_chunk_size": CHUNK}
    plain = train(TrainConfig(**base_config(plain_bert, data, tmp_path / "plain", **common)))
    cached = train(
        TrainConfig(**base_config(plain_bert, data, tmp_path / "cached", use_gradient_cache=True, **common))
    )
    assert [h["loss"] for h in cached.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-5)
    assert max_rel_diff(adapter(cached.checkpoint_dir), adapter(plain.checkpoint_dir)) <= 1e-4
    saved = json.loads((cached.checkpoint_dir / "trainer_state.json").read_text())
    assert saved["global_step"] == 3
