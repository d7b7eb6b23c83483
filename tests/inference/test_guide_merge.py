"""A model merged the guide's way (PeftModel.merge_and_unload() then save_pretrained(), no tokenizer)
loads in the Predictor through the base model it records, or fails saying what to add."""

import json
import shutil

import numpy as np
import pytest
from peft import PeftModel
from transformers import AutoModel

from vembed.config import load_config
from vembed.errors import CheckpointError
from vembed.inference.predictor import Predictor
from vembed.training import train

TEXTS = ["alpha beta gamma", "a river through the mountain forest"]


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("guide_merge")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i} {TEXTS[i % 2]}", "positive": f"p{i} {TEXTS[1 - i % 2]}"}) + "\n"
                            for i in range(16)))
    cfg = load_config(None, {"model_name": tiny_bert, "data_path": str(data), "output_dir": str(root / "output"),
                             "batch_size": 8, "max_steps": 2, "learning_rate": 1e-2, "torch_dtype": "float32",
                             "lora_target_modules": ["query", "value"]})
    result = train(cfg)
    # The guide, "Merge LoRA into Base Model", verbatim apart from the paths.
    base_model = AutoModel.from_pretrained(tiny_bert)
    model = PeftModel.from_pretrained(base_model, str(result.checkpoint_dir))
    merged_model = model.merge_and_unload()
    merged_model.save_pretrained(root / "output" / "merged_model")
    return root, result.checkpoint_dir, tiny_bert


def test_merged_dir_in_the_run_finds_its_base_through_the_run_config(run):
    root, checkpoint, _ = run
    merged = root / "output" / "merged_model"
    assert not (merged / "tokenizer.json").exists() and not (merged / "embedder.json").exists()
    adapter, guide = Predictor(checkpoint, device="cpu"), Predictor(merged, device="cpu")
    a, m = adapter.encode_text(TEXTS), guide.encode_text(TEXTS)
    assert np.abs(a - m).max() <= 1e-5
    base = Predictor(run[2], device="cpu").encode_text(TEXTS)
    assert np.abs(base - m).max() > 1e-4  # the merged weights are used, not the base's


def test_moved_merged_dir_needs_the_base_recorded_in_its_config(run, tmp_path):
    root, checkpoint, base = run
    moved = tmp_path / "merged_model"
    shutil.copytree(root / "output" / "merged_model", moved)
    with pytest.raises(CheckpointError, match=r'no tokenizer.*Add "_name_or_path": .*config\.json'):
        Predictor(moved, device="cpu")
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "_name_or_path": base}))
    np.testing.assert_allclose(
        Predictor(moved, device="cpu").encode_text(TEXTS), Predictor(checkpoint, device="cpu").encode_text(TEXTS),
        atol=1e-5,
    )


def test_a_recorded_base_of_another_architecture_is_not_used(run, tmp_path, tiny_qwen3):
    root, _, _ = run
    moved = tmp_path / "merged_model"
    shutil.copytree(root / "output" / "merged_model", moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "_name_or_path": tiny_qwen3}))
    with pytest.raises(CheckpointError, match="architecture differs"):
        Predictor(moved, device="cpu")
