"""Two CPU processes (accelerate launch, gloo) against one process holding the whole batch.

Global batch 8 = 2 ranks x 4 versus 1 x 8, dropout off: with cross-device negatives the loss and
the all-reduced gradients must equal the single process's, for the plain step and for GradCache.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.support.scaleout_helpers import (
    WORKER,
    accelerate_launch,
    adapter,
    base_config,
    max_rel_diff,
    perturb_lora_b,
    tiny_bert,
    write_config,
    write_pairs,
)
from vembed.config import TrainConfig
from vembed.training import train
from vembed.training.data import EpochBatchSampler, PairCollator, PairDataset, load_records
from vembed.training.loop import build_accelerator, build_embedder
from vembed.training.losses import build_loss
from vembed.training.step import make_step

N_RECORDS = 32

pytestmark = pytest.mark.slow  # real multi-process launches
GLOBAL_BATCH = 8


def single_process_grads(cfg: TrainConfig) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the first batch of `cfg.batch_size` rows, in this process."""
    accelerator, dtype = build_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    embedder = build_embedder(cfg, dtype)
    perturb_lora_b(embedder)
    records, _ = load_records(cfg.data_path, cfg.on_bad_record)
    dataset = PairDataset(records, embedder)
    rows = next(iter(EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed)))
    batch = PairCollator(embedder)([dataset[i] for i in rows])
    step = make_step(cfg, accelerator, embedder, build_loss(cfg, embedder.dim))
    loss = step(batch)
    grads = {n: p.grad.detach().clone() for n, p in embedder.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ddp")
    model = tiny_bert(root / "bert", dropout=0.0)
    data = write_pairs(root / "pairs.jsonl", N_RECORDS)
    cfg = base_config(
        model, data, root / "out-2proc",
        batch_size=GLOBAL_BATCH // 2, use_gradient_cache=True, gradient_cache_chunk_size=3, max_steps=3,
        eval_data_path=str(data), eval_steps=2, metric_for_best_model="ndcg@10",
    )  # fmt: skip
    config = write_config(root / "ddp.yaml", cfg)
    (root / "result").mkdir()
    accelerate_launch([str(WORKER), str(config), str(root / "result")])
    single = TrainConfig(**{**cfg, "batch_size": GLOBAL_BATCH, "output_dir": str(root / "out-1proc")})
    return root, single


def test_each_rank_gets_its_own_shard(ddp_run):
    root, _ = ddp_run
    result = json.loads((root / "result" / "result.json").read_text())
    assert result["num_processes"] == 2
    rank0, rank1 = result["seen"]
    assert len(rank0) == len(rank1) == N_RECORDS // 2
    assert not set(rank0) & set(rank1), "both ranks saw the same records"
    assert len(set(rank0) | set(rank1)) == N_RECORDS


@pytest.mark.parametrize("variant", ["plain", "grad_cache"])
def test_two_processes_equal_one_process_with_the_whole_batch(ddp_run, variant):
    root, single = ddp_run
    result = json.loads((root / "result" / "result.json").read_text())
    loss, grads = single_process_grads(single.model_copy(update={"use_gradient_cache": variant == "grad_cache"}))
    assert result["losses"][variant] == pytest.approx(loss, rel=1e-5)
    two = load_file(str(root / "result" / f"grads-{variant}.safetensors"))
    assert max_rel_diff(two, grads) <= 1e-5


def test_grad_cache_all_reduces_gradients_once_per_step(ddp_run):
    """Its re-run chunks (several per rank here) run under no_sync: as many all-reduces as a plain step."""
    root, _ = ddp_run
    counts = json.loads((root / "result" / "result.json").read_text())["all_reduces"]
    assert counts["grad_cache"] == counts["plain"] > 0


def test_without_cross_device_negatives_the_gradients_differ(ddp_run):
    """The control for the test above: each rank's own 4 rows are a different loss."""
    root, single = ddp_run
    _, grads = single_process_grads(single)
    local = load_file(str(root / "result" / "grads-plain_local_negatives.safetensors"))
    assert max_rel_diff(local, grads) > 1e-2


def test_two_process_training_run_matches_one_process(ddp_run):
    """A whole `train()` under DDP with GradCache: same losses and adapter as one process."""
    root, single = ddp_run
    one = train(single)
    two_dir = root / "out-2proc"
    two_state = json.loads((two_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["loss"] for h in two_state["history"]] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)
    assert [h["lr"] for h in two_state["history"]] == pytest.approx([h["lr"] for h in one.history])
    assert max_rel_diff(adapter(two_dir / "checkpoint-3"), adapter(one.checkpoint_dir)) <= 1e-4
    # Validation with the eval set shared out over both processes gives one process's figures.
    two_val, one_val = two_state["eval_history"], one.eval_history
    assert [h["step"] for h in two_val] == [h["step"] for h in one_val] == [2, 3]
    for a, b in zip(two_val, one_val, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert two_state["best"] == pytest.approx(json.loads((one.checkpoint_dir / "trainer_state.json").read_text())["best"])


def test_launch_configs_parse_and_fsdp_keeps_lora_settings():
    from accelerate.commands.config.config_args import load_config_from_file

    from tests.support.scaleout_helpers import REPO

    configs = {p.stem: load_config_from_file(str(p)) for p in (REPO / "examples" / "accelerate").glob("*.yaml")}
    assert {"single_gpu", "multi_gpu_ddp", "fsdp", "cpu_2proc"} <= configs.keys()
    assert configs["cpu_2proc"].num_processes == 2
    fsdp = configs["fsdp"].fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_use_orig_params"] is True


def test_fsdp_launch_without_use_fsdp_is_a_config_error(monkeypatch, tmp_path):
    from vembed.errors import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="use_fsdp"):
        build_accelerator(TrainConfig(output_dir=str(tmp_path)))


# --- the gather itself, with unequal row counts per rank ------------------------------------


def test_gather_with_unequal_rows_gives_the_single_process_sum(tmp_path):
    """Rows are padded for the collective and cut off again; gradients reach each rank's own rows.

    (The training loop's ranks always hold equal batches, accelerate's even_batches, so there
    DDP's mean over ranks equals the global mean; here the per-query sums are compared.)"""
    import torch.multiprocessing as mp

    from tests.conftest import free_port
    from tests.support.gather_worker import gather_worker, global_tensors
    from vembed.training.losses import info_nce

    mp.spawn(gather_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0]["labels"].tolist() == [0, 1, 2] and ranks[1]["labels"].tolist() == [3]

    full = {k: v.clone().requires_grad_() for k, v in global_tensors().items()}
    total = info_nce(full["query"], full["positive"], full["negatives"]) * full["query"].size(0)
    total.backward()
    assert (ranks[0]["loss"] + ranks[1]["loss"]).item() == pytest.approx(total.item(), rel=1e-6)
    for key in ("query", "positive", "negatives"):
        # Each rank holds the gradient of the global sum for its own rows (the gather's backward sums).
        got = torch.cat([r[f"grad.{key}"] for r in ranks if f"grad.{key}" in r])
        assert torch.allclose(got, full[key].grad, rtol=1e-5, atol=1e-7), key
