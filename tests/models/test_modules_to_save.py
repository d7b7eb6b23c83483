"""modules_to_save: resolved per family like LoRA targets, dead modules refused by name, and the
guide's example (examples/modules_to_save.yaml) trained end to end on a tiny CLIP."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.support import vl_flow
from tests.support.synthetic_images import write_image_caption_set
from vembed.config import load_config
from vembed.errors import ConfigError
from vembed.models import load_embedder
from vembed.models.lora import apply_lora

one_thread = pytest.fixture(autouse=True, scope="module")(vl_flow.one_thread)


def _apply(model: str, **overrides):
    return apply_lora(load_embedder(model), load_config(None, {"model_name": model, **overrides}))


def test_bert_pooler_is_refused_by_name(tiny_bert):
    # The guide's exact list: `classifier` is in no embedding model (skipped), `pooler` never feeds
    # the mean-pooled embedding.
    with pytest.raises(ConfigError, match=r"modules_to_save: 'pooler' \(pooler\) does not reach the embedding.*mean"):
        _apply(tiny_bert, modules_to_save=["classifier", "pooler"])
    # a path inside the pooler is refused as well
    with pytest.raises(ConfigError, match=r"pooler\.dense"):
        _apply(tiny_bert, modules_to_save=["pooler.dense"])


def test_no_match_lists_the_top_level_modules(tiny_bert):
    with pytest.raises(ConfigError, match="none of \\['classifier'\\].*embeddings, encoder, pooler"):
        _apply(tiny_bert, modules_to_save=["classifier"])


def test_suffix_names_resolve_and_every_saved_module_gets_a_gradient(tiny_bert):
    emb = _apply(tiny_bert, modules_to_save=["classifier", "layer.1.output.LayerNorm"])
    saved = {n for n, p in emb.named_parameters() if p.requires_grad and "modules_to_save" in n}
    assert saved and all("layer.1.output.LayerNorm" in n for n in saved)
    from vembed.models import Item

    batch = emb.collate([emb.featurize(Item(text=t), False) for t in ["one two", "three four five"]])
    emb(**batch).pow(2).sum().backward()
    assert all(p.grad is not None for n, p in emb.named_parameters() if p.requires_grad)


def test_decoder_final_norm_is_accepted(tiny_qwen3):
    emb = _apply(tiny_qwen3, lora_target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
    saved = {n.split(".modules_to_save")[0] for n, p in emb.named_parameters() if "modules_to_save" in n}
    assert saved == {"backbone.base_model.model.norm"}


def test_guide_example_trains_the_clip_projection_heads(tmp_path_factory):
    from tests.support.tiny_models import make_tiny_clip

    model = str(make_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip"))
    shapes = write_image_caption_set(tmp_path_factory.mktemp("shapes"), per_caption=2, size=32)
    flow = vl_flow.run_example(
        "modules_to_save.yaml", model, shapes, tmp_path_factory.mktemp("run"),
        "max_steps=3", "batch_size=16", "learning_rate=5e-3", "torch_dtype=float32", "logging_steps=1",
    )
    adapter = {k.removeprefix("base_model.model."): v
               for k, v in load_file(str(flow.checkpoint / "adapter_model.safetensors")).items()}
    heads = {k for k in adapter if "projection" in k}
    assert heads == {"text_projection.weight", "visual_projection.weight"}, sorted(adapter)[:8]
    from transformers import CLIPModel

    base = CLIPModel.from_pretrained(model)
    for key in heads:
        assert not torch.equal(adapter[key], getattr(base, key.split(".")[0]).weight), f"{key} did not train"
    merged = CLIPModel.from_pretrained(flow.merged)
    torch.testing.assert_close(merged.text_projection.weight, adapter["text_projection.weight"])
    vl_flow.assert_merged_matches_adapter(flow)
    assert np.isfinite([h["loss"] for h in flow.history]).all()
