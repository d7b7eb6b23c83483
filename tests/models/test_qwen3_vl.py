"""Qwen3-VL-Embedding family: prompt format, image tokens and grids, last-token pooling, LoRA
defaults, and the qwen3_vl_tiny example trained on synthetic shapes, merged and encoded."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import vl_flow
from tests.support.synthetic_images import write_image_caption_set
from vembed.config import load_config
from vembed.inference.evaluation import compare_models
from vembed.inference.predictor import Predictor
from vembed.models import Item, load_embedder
from vembed.models.chat_prompt import DEFAULT_INSTRUCTION
from vembed.models.lora import apply_lora
from vembed.models.qwen_vl import IMAGE_PAD
from vembed.training import train
from vembed.training.grad_cache import split_inputs

one_thread = pytest.fixture(autouse=True, scope="module")(vl_flow.one_thread)


@pytest.fixture(scope="module")
def tiny_qwen3_vl(tmp_path_factory) -> str:
    from tests.support.tiny_models import make_tiny_qwen3_vl

    return str(make_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny") / "qwen3_vl"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    return write_image_caption_set(tmp_path_factory.mktemp("shapes"), per_caption=4, size=32)


@pytest.fixture(scope="module")
def trained(tiny_qwen3_vl, shapes, tmp_path_factory) -> vl_flow.TrainedFlow:
    # LoRA on the decoder's q_proj/v_proj (the example's defaults) of the random model.
    return vl_flow.run_example("qwen3_vl_tiny.yaml", tiny_qwen3_vl, shapes, tmp_path_factory.mktemp("qwen_run"))


def picture(width: int = 32, height: int = 32) -> Image.Image:
    image = Image.new("RGB", (width, height), (230, 230, 230))
    image.paste((40, 70, 220), (4, 4, width // 2, height // 2))
    return image


def test_qwen3_vl_prompt_puts_the_instruction_in_the_system_turn(tiny_qwen3_vl):
    emb = load_embedder(tiny_qwen3_vl, query_instruction="Find the matching picture.")
    query = emb.featurize(Item(text="a blue square"), is_query=True)["prompt"]
    assert query.startswith("<|im_start|>system\nFind the matching picture.<|im_end|>\n<|im_start|>user\n")
    assert query.endswith("a blue square<|im_end|>\n<|im_start|>assistant\n")
    doc = emb.featurize(Item(text="caption", image=picture()), is_query=False)
    assert doc["prompt"].startswith(f"<|im_start|>system\n{DEFAULT_INSTRUCTION}<|im_end|>")
    user_turn = doc["prompt"].split("<|im_start|>user\n")[1]
    assert user_turn.startswith(f"<|vision_start|>{IMAGE_PAD}<|vision_end|>caption")
    # a record's own instruction wins over the configured one
    assert "Rank these." in emb.featurize(Item(text="q", instruction="Rank these."), is_query=True)["prompt"]


def test_qwen3_vl_collate_expands_image_tokens_with_one_grid_per_image(tiny_qwen3_vl):
    emb = load_embedder(tiny_qwen3_vl)
    items = [Item(text="just text"), Item(image=picture(32, 32)), Item(text="both", image=picture(64, 32))]
    batch = emb.collate([emb.featurize(it, is_query=False) for it in items])
    assert all(v.shape[0] == len(items) for v in batch.values())  # row-aligned, so GradCache can chunk it
    grids = batch["image_grid_thw"]
    merge = emb.processor.image_processor.merge_size
    image_tokens = batch["mm_token_type_ids"].sum(1).tolist()
    assert image_tokens == [int(g.prod()) // merge**2 for g in grids]
    assert image_tokens[0] == 0 and image_tokens[1] > 0 and image_tokens[2] > image_tokens[1]
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == emb._image_token_id)


def test_qwen3_vl_batch_matches_single_items_and_row_chunks(tiny_qwen3_vl):
    emb = load_embedder(tiny_qwen3_vl)
    items = [Item(text="a short one"), Item(image=picture()), Item(text="a red circle on the left", image=picture(48, 32)),
             Item(text="a considerably longer text that needs more padding than the others do")]
    batch = emb.collate([emb.featurize(it, is_query=False) for it in items])
    with torch.no_grad():
        together = emb(**batch)
        single = torch.cat([emb(**emb.collate([emb.featurize(it, False)])) for it in items])
        chunked = torch.cat([emb(**chunk) for chunk in split_inputs(batch, 2)])
    torch.testing.assert_close(together, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, single, atol=1e-5, rtol=1e-5)


def test_qwen3_vl_pools_the_last_token_of_the_hidden_size(tiny_qwen3_vl):
    emb = load_embedder(tiny_qwen3_vl)
    assert (emb.family, emb.spec.pooling) == ("qwen3_vl", "last_token")
    assert emb.dim == emb.backbone.config.text_config.hidden_size
    batch = emb.collate([emb.featurize(Item(text="a caption", image=picture()), is_query=False)])
    with torch.no_grad():
        hidden = emb.backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch["pixel_values"][0],
            image_grid_thw=batch["image_grid_thw"],
        ).last_hidden_state
        torch.testing.assert_close(emb(**batch), hidden[:, -1])


def test_qwen3_vl_default_lora_targets_adapt_the_decoder_not_the_vision_tower(tiny_qwen3_vl):
    emb = load_embedder(tiny_qwen3_vl)
    apply_lora(emb, load_config(None, {"model_name": tiny_qwen3_vl}))  # the guide's default target list
    adapted = [n for n, _ in emb.backbone.named_parameters() if "lora_A" in n]
    assert adapted and all("language_model" in n for n in adapted)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[1] for n in adapted} == {"q_proj", "v_proj"}
    # the vision tower's fused qkv is adapted when asked for
    emb = load_embedder(tiny_qwen3_vl)
    apply_lora(emb, load_config(None, {"model_name": tiny_qwen3_vl, "lora_target_modules": ["q_proj", "v_proj", "qkv"]}))
    assert any("visual" in n and ".qkv." in n for n, _ in emb.backbone.named_parameters() if "lora_A" in n)


def test_qwen3_vl_training_lowers_loss_and_beats_chance_on_held_out_pairs(trained):
    first, last = trained.history[0]["loss"], trained.history[-1]["loss"]
    assert last < 0.8 * first, (first, last)
    results = compare_models({"base": trained.base, "tuned": str(trained.checkpoint)}, trained.eval_path)
    chance = 1 / 48  # one held-out image per caption
    tuned, base = results["tuned"]["full"]["recall@1"], results["base"]["full"]["recall@1"]
    assert tuned >= 4 * chance and tuned > base, (tuned, base)


def test_qwen3_vl_merged_model_gives_the_adapter_embeddings(trained):
    adapter, merged = vl_flow.assert_merged_matches_adapter(trained)
    queries = ["a red circle on the left"]
    assert np.abs(adapter.encode_text(queries, is_query=True) - merged.encode_text(queries, is_query=True)).max() <= 1e-5
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(trained.merged)).__name__ == "Qwen3VLModel"


def test_qwen3_vl_predictor_encodes_paths_pil_images_and_truncates(trained):
    pred = Predictor(trained.merged, device="cpu")
    path = sorted((trained.data_dir / "images").glob("*.png"))[0]
    one = pred.encode_image(str(path))
    np.testing.assert_allclose(one, pred.encode_image(Image.open(path)), atol=1e-6)
    short = pred.encode_image([str(path), Image.open(path)], batch_size=1, dim=8)
    assert short.shape == (2, 8) and short.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)


def test_qwen3_vl_full_fine_tuning_checkpoint_loads_with_its_processor(tiny_qwen3_vl, shapes, tmp_path):
    cfg = load_config(None, {"model_name": tiny_qwen3_vl, "data_path": str(shapes["train"]), "use_lora": False,
                             "output_dir": str(tmp_path / "out"), "batch_size": 16, "max_steps": 2,
                             "retrieval_mode": "t2i", "learning_rate": 1e-3})
    result = train(cfg)
    assert (result.checkpoint_dir / "model.safetensors").is_file()
    assert (result.checkpoint_dir / "preprocessor_config.json").is_file()
    tuned, base = Predictor(result.checkpoint_dir, device="cpu"), Predictor(tiny_qwen3_vl, device="cpu")
    image = sorted((shapes["train"].parent / "images").glob("*.png"))[0]
    assert not np.allclose(tuned.encode_image(str(image)), base.encode_image(str(image)), atol=1e-4)
