"""LLaVA family: prompt with the instruction, image tokens through the LlavaProcessor, last-token
pooling, LoRA leaving the unused end of the vision tower alone, the llava_tiny example trained on
synthetic shapes, merged and encoded; and unknown multimodal architectures refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import vl_flow
from tests.support.synthetic_images import write_image_caption_set
from vembed.config import load_config
from vembed.errors import ConfigError
from vembed.inference.evaluation import compare_models
from vembed.models import Item, load_embedder
from vembed.models.lora import apply_lora
from vembed.training.grad_cache import split_inputs

one_thread = pytest.fixture(autouse=True, scope="module")(vl_flow.one_thread)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> str:
    from tests.support.tiny_models import make_tiny_llava

    return str(make_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    return write_image_caption_set(tmp_path_factory.mktemp("shapes"), per_caption=4, size=32)


@pytest.fixture(scope="module")
def trained(tiny_llava, shapes, tmp_path_factory) -> vl_flow.TrainedFlow:
    return vl_flow.run_example("llava_tiny.yaml", tiny_llava, shapes, tmp_path_factory.mktemp("llava_run"))


def picture(width: int = 32, height: int = 32) -> Image.Image:
    image = Image.new("RGB", (width, height), (230, 230, 230))
    image.paste((40, 70, 220), (4, 4, width // 2, height // 2))
    return image


def test_llava_checkpoint_is_its_own_family_with_the_instruction_in_the_prompt(tiny_llava):
    assert json.loads((Path(tiny_llava) / "config.json").read_text())["architectures"] == [
        "LlavaForConditionalGeneration"
    ]
    emb = load_embedder(tiny_llava, query_instruction="Find the matching picture.")
    assert (emb.family, emb.spec.pooling, type(emb.backbone).__name__) == ("llava", "last_token", "LlavaModel")
    assert emb.dim == emb.backbone.config.text_config.hidden_size
    query = emb.featurize(Item(text="a blue square"), is_query=True)["prompt"]
    assert query.startswith("Find the matching picture.") and query.endswith("a blue square ASSISTANT:")
    doc = emb.featurize(Item(text="caption", image=picture()), is_query=False)["prompt"]
    assert "<image>" in doc and "Find the matching" not in doc
    # user text cannot forge image placeholders
    assert "<image>" not in emb.featurize(Item(text="a <image> trick"), is_query=True)["prompt"]


def test_llava_images_expand_to_the_vision_feature_count_and_batches_match_single_items(tiny_llava):
    emb = load_embedder(tiny_llava)
    items = [Item(text="just text"), Item(image=picture()), Item(text="both", image=picture(64, 32)),
             Item(text="a considerably longer text that needs more padding than the others do")]
    batch = emb.collate([emb.featurize(it, is_query=False) for it in items])
    assert all(v.shape[0] == len(items) for v in batch.values())  # row-aligned, so GradCache can chunk it
    image_id = emb.backbone.config.image_token_id
    per_image = emb.backbone.config.image_seq_length
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [0, per_image, per_image, 0]
    with torch.no_grad():
        together = emb(**batch)
        single = torch.cat([emb(**emb.collate([emb.featurize(it, False)])) for it in items])
        chunked = torch.cat([emb(**chunk) for chunk in split_inputs(batch, 2)])
        hidden = emb.backbone(input_ids=batch["input_ids"][1:2], attention_mask=batch["attention_mask"][1:2],
                              pixel_values=batch["pixel_values"][1:2]).last_hidden_state
    torch.testing.assert_close(together, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, single, atol=1e-5, rtol=1e-5)
    last = int(batch["attention_mask"][1].sum()) - 1
    torch.testing.assert_close(together[1], hidden[0, last])


def test_llava_lora_skips_the_vision_layers_after_the_feature_layer(tiny_llava):
    emb = load_embedder(tiny_llava)
    apply_lora(emb, load_config(None, {"model_name": tiny_llava, "lora_target_modules": ["q_proj", "v_proj"]}))
    adapted = {n.split(".lora_A")[0] for n, _ in emb.backbone.named_parameters() if "lora_A" in n}
    assert any("language_model" in n for n in adapted) and any("vision_tower" in n for n in adapted)
    assert not any("encoder.layers.2." in n for n in adapted if "vision_tower" in n)
    # every adapted parameter gets a gradient from an image+text batch (nothing dead for DDP/FSDP)
    batch = emb.collate([emb.featurize(Item(text="x", image=picture()), False)])
    torch.nn.init.normal_(next(p for n, p in emb.named_parameters() if "lora_B" in n))
    emb(**batch).pow(2).sum().backward()
    assert all(p.grad is not None for n, p in emb.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        apply_lora(load_embedder(tiny_llava),
                   load_config(None, {"model_name": tiny_llava, "modules_to_save": ["post_layernorm"]}))


def test_llava_training_lowers_loss_and_the_merged_model_gives_the_adapter_embeddings(trained):
    first, last = trained.history[0]["loss"], trained.history[-1]["loss"]
    assert last < 0.8 * first, (first, last)
    results = compare_models({"base": trained.base, "tuned": str(trained.checkpoint)}, trained.eval_path)
    assert results["tuned"]["full"]["recall@1"] > results["base"]["full"]["recall@1"]
    adapter, merged = vl_flow.assert_merged_matches_adapter(trained)
    assert merged.spec.family == "llava"
    queries = ["a red circle on the left"]
    assert np.abs(adapter.encode_text(queries, is_query=True) - merged.encode_text(queries, is_query=True)).max() <= 1e-5


def test_unknown_multimodal_architecture_is_refused_naming_the_families(tmp_path):
    from transformers import LlavaNextConfig

    LlavaNextConfig(text_config={"model_type": "llama"}).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"LlavaNext|llava_next.*not a supported model family.*qwen3_vl.*llava"):
        load_embedder(str(tmp_path))
