"""FSDP (FULL_SHARD, use_orig_params) with LoRA on two CPU processes over gloo.

accelerate enables its FSDP plugin only on GPUs; vembed switches CPU process groups to torch's
FSDP1, which runs there (vembed.training.fsdp.activate_fsdp), so these tests shard for real.

Run A: plain step, 4 steps, checkpoints at 2 and 4. Run B: resumes A's checkpoint-2 with GradCache
on and trains to step 4. Both must match one process holding the whole batch, and the adapter
gathered from the shards must load with PeftModel.from_pretrained.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel

from tests.support.resume_log import assert_resumed
from tests.support.scaleout_helpers import (
    accelerate_launch,
    adapter,
    base_config,
    max_rel_diff,
    tiny_bert,
    write_config,
    write_pairs,
)
from vembed.config import TrainConfig
from vembed.training import train
from vembed.training.loop import build_embedder

ENTRYPOINT = "vembed/entrypoints/train.py"

pytestmark = pytest.mark.slow  # real multi-process launches


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fsdp")
    model = tiny_bert(root / "bert", dropout=0.0)
    data = write_pairs(root / "pairs.jsonl", 32)
    cfg = base_config(
        model, data, root / "run-a", use_fsdp=True, batch_size=4, max_steps=4, save_steps=2,
        eval_data_path=str(data), eval_steps=2, metric_for_best_model="loss",
    )  # fmt: skip
    accelerate_launch([ENTRYPOINT, str(write_config(root / "a.yaml", cfg))])

    (root / "run-b").mkdir()
    shutil.copytree(root / "run-a" / "checkpoint-2", root / "run-b" / "checkpoint-2")
    resumed = {
        **cfg,
        "output_dir": str(root / "run-b"),
        "resume_from_checkpoint": "latest",
        "use_gradient_cache": True,
        "gradient_cache_chunk_size": 3,
    }
    accelerate_launch([ENTRYPOINT, str(write_config(root / "b.yaml", resumed))])

    single = TrainConfig(**{**cfg, "use_fsdp": False, "batch_size": 8, "output_dir": str(root / "single")})
    return root, single, train(single)


def test_fsdp_adapter_holds_every_shard_and_loads_with_peft(runs):
    root, single, one = runs
    ckpt = root / "run-a" / "checkpoint-4"
    saved = adapter(ckpt)
    assert saved.keys() == adapter(one.checkpoint_dir).keys()
    assert all(t.abs().sum() > 0 for t in saved.values()), "an adapter tensor is all zeros"
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(single.model_name), str(ckpt))
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name.replace(".weight", ".default.weight")], tensor)


def test_fsdp_run_matches_one_process_with_the_whole_batch(runs):
    root, _, one = runs
    two_state = json.loads((root / "run-a" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["loss"] for h in two_state["history"]] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)
    assert max_rel_diff(adapter(root / "run-a" / "checkpoint-4"), adapter(one.checkpoint_dir)) <= 1e-4


def test_fsdp_validation_matches_one_process(runs):
    """Evaluation under FSDP (eval set shared out, same forwards on both ranks) gives one process's figures,
    and the resumed GradCache run (run-b) evaluates to the same values at step 4."""
    root, _, one = runs
    val = {
        name: json.loads((root / name / "checkpoint-4" / "trainer_state.json").read_text())["eval_history"]
        for name in ("run-a", "run-b")
    }
    one_val = one.eval_history
    assert [h["step"] for h in val["run-a"]] == [h["step"] for h in one_val] == [2, 4]
    for a, b in zip(val["run-a"], one_val, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert val["run-b"][-1] == pytest.approx(val["run-a"][-1], rel=1e-4, abs=1e-6)


def test_fsdp_optimizer_state_is_gathered_whole(runs):
    """Adam moments in the FSDP checkpoint are full tensors equal to the single process's."""
    root, single, _ = runs
    fsdp = load_file(str(root / "run-a" / "checkpoint-4" / "optimizer.safetensors"))
    ref = load_file(str(root / "single" / "checkpoint-4" / "optimizer.safetensors"))
    embedder = build_embedder(single, torch.float32)
    names = [n for n, p in embedder.named_parameters() if p.requires_grad]  # the loop's optimizer order
    for pid, name in enumerate(names):
        for moment in ("exp_avg", "exp_avg_sq"):
            got, want = fsdp[f"{name}.{moment}"], ref[f"{pid}.{moment}"]
            assert got.shape == want.shape
            assert max_rel_diff({name: got}, {name: want}) <= 1e-4


def test_fsdp_resume_with_grad_cache_continues_exactly(runs):
    root, _, one = runs
    resumed = root / "run-b" / "checkpoint-4"
    assert max_rel_diff(adapter(resumed), adapter(root / "run-a" / "checkpoint-4")) <= 1e-4
    assert max_rel_diff(adapter(resumed), adapter(one.checkpoint_dir)) <= 1e-4
    # run-b's log holds only what run-b wrote: a restart from scratch would log a start and steps 1-4.
    assert assert_resumed(root / "run-b" / "training_log.txt", checkpoint=2) == (2, [3, 4])
