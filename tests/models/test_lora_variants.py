"""rsLoRA and DoRA reach peft's LoraConfig, and a DoRA checkpoint loads back through Predictor."""

from __future__ import annotations

import math

import torch

from vembed.config import load_config
from vembed.models import load_embedder
from vembed.models.lora import apply_lora


def adapted(tiny_bert: str, **kw):
    cfg = load_config(None, {"model_name": tiny_bert, "lora_r": 4, "lora_alpha": 8, **kw})
    return apply_lora(load_embedder(tiny_bert, "auto", 32, None, torch.float32), cfg)


def lora_layers(embedder):
    return [m for m in embedder.backbone.modules() if isinstance(getattr(m, "scaling", None), dict)]


def test_rslora_scales_by_alpha_over_sqrt_rank(tiny_bert):
    plain, rs = lora_layers(adapted(tiny_bert)), lora_layers(adapted(tiny_bert, use_rslora=True))
    assert plain and rs
    assert plain[0].scaling["default"] == 8 / 4
    assert math.isclose(rs[0].scaling["default"], 8 / math.sqrt(4))


def test_dora_trains_a_magnitude_and_predictor_loads_it(tiny_bert, pairs_file, tmp_path):
    from vembed.inference.predictor import Predictor
    from vembed.training import train

    names = [n for n, p in adapted(tiny_bert, use_dora=True).named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    cfg = load_config(
        None,
        {"model_name": tiny_bert, "data_path": pairs_file, "output_dir": str(tmp_path / "o"), "use_dora": True,
         "batch_size": 16, "max_steps": 2, "max_seq_length": 32},
    )
    result = train(cfg)
    emb = Predictor(str(result.checkpoint_dir)).encode_text(["a query"])
    assert emb.shape[0] == 1 and abs(float((emb**2).sum()) - 1) < 1e-4


def embed(embedder, texts=("a query about files", "open a socket")):
    from vembed.models import Item

    embedder.eval()
    with torch.no_grad():
        return embedder.embed_items([Item(text=t) for t in texts])


def first_lora_layer(embedder):
    return lora_layers(embedder)[0]


def test_lora_init_reaches_peft(tiny_bert):
    for init, expected in (("default", True), ("gaussian", "gaussian"), ("olora", "olora")):
        emb = adapted(tiny_bert, lora_init=init)
        assert emb.backbone.peft_config["default"].init_lora_weights == expected


def test_pissa_moves_the_principal_part_into_the_adapter(tiny_bert):
    original = load_embedder(tiny_bert, "auto", 32, None, torch.float32)
    plain, pissa = adapted(tiny_bert), adapted(tiny_bert, lora_init="pissa")
    layer, plain_layer = first_lora_layer(pissa), first_lora_layer(plain)
    name = next(n for n, m in pissa.backbone.get_base_model().named_modules() if m is layer)
    base_before = original.backbone.get_submodule(name).weight
    # Default LoRA: B = 0 and the base untouched. PiSSA: B != 0 and the base holds only the residual.
    assert float(plain_layer.lora_B["default"].weight.detach().abs().max()) == 0
    assert float(layer.lora_B["default"].weight.detach().abs().max()) > 0
    assert not torch.allclose(layer.base_layer.weight, base_before)
    # ...and the two together are still the original model.
    torch.testing.assert_close(embed(pissa), embed(original), atol=1e-5, rtol=1e-4)


def test_pissa_adapter_is_saved_as_plain_lora_on_the_original_base(tiny_bert, tmp_path):
    """Trained PiSSA weights saved, then loaded on the unmodified base: the same embeddings."""
    import json

    from peft import PeftModel

    pissa = adapted(tiny_bert, lora_init="pissa")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every adapter weight
        for n, p in pissa.backbone.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    trained = embed(pissa)
    pissa.backbone.save_pretrained(str(tmp_path / "a"), safe_serialization=True)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    fresh = load_embedder(tiny_bert, "auto", 32, None, torch.float32)
    fresh.backbone = PeftModel.from_pretrained(fresh.backbone, str(tmp_path / "a"))
    torch.testing.assert_close(embed(fresh), trained, atol=1e-5, rtol=1e-4)


def test_olora_trains_and_predictor_loads_the_converted_adapter(tiny_bert, pairs_file, tmp_path):
    from vembed.inference.predictor import Predictor
    from vembed.training import train

    cfg = load_config(
        None,
        {"model_name": tiny_bert, "data_path": pairs_file, "output_dir": str(tmp_path / "o"), "lora_init": "olora",
         "batch_size": 16, "max_steps": 2, "max_seq_length": 32},
    )
    result = train(cfg)
    emb = Predictor(str(result.checkpoint_dir)).encode_text(["a query"])
    assert emb.shape[0] == 1 and abs(float((emb**2).sum()) - 1) < 1e-4


def test_lora_init_refuses_what_cannot_work(tiny_bert):
    import pytest

    from vembed.errors import ConfigError

    with pytest.raises(ConfigError, match="lora_init: unknown lora_init 'svd'"):
        load_config(None, {"lora_init": "svd"})
    with pytest.raises(ConfigError, match="pissa cannot be combined with use_dora"):
        load_config(None, {"lora_init": "pissa", "use_dora": True})
    with pytest.raises(ConfigError, match="olora cannot resume"):
        load_config(None, {"lora_init": "olora", "resume_from_checkpoint": "latest"})
    assert load_config(None, {"lora_init": "pissa_niter_4"}).lora_init == "pissa_niter_4"


def test_loraplus_trains_b_matrices_at_ratio_times_the_learning_rate(tiny_bert, pairs_file, tmp_path):
    import pytest

    from vembed.errors import ConfigError
    from vembed.training import train
    from vembed.training.loop import build_optimizer

    cfg = load_config(None, {"model_name": tiny_bert, "learning_rate": 1e-3, "loraplus_lr_ratio": 8})
    embedder = apply_lora(load_embedder(tiny_bert, "auto", 32, None, torch.float32), cfg)
    lr_of = {id(p): g["lr"] for g in build_optimizer(cfg, embedder).param_groups for p in g["params"]}
    trainable = {n: p for n, p in embedder.named_parameters() if p.requires_grad}
    assert len(lr_of) == len(trainable)  # every trainable parameter exactly once
    for name, p in trainable.items():
        assert lr_of[id(p)] == pytest.approx(8e-3 if "lora_B" in name else 1e-3), name
    assert any("lora_B" in n for n in trainable) and any("lora_A" in n for n in trainable)

    run = load_config(
        None,
        {"model_name": tiny_bert, "data_path": pairs_file, "output_dir": str(tmp_path / "o"), "loraplus_lr_ratio": 8,
         "batch_size": 16, "max_steps": 2, "max_seq_length": 32},
    )  # fmt: skip
    assert train(run).checkpoint_dir.is_dir()
    with pytest.raises(ConfigError, match="loraplus_lr_ratio: needs use_lora"):
        load_config(None, {"loraplus_lr_ratio": 4, "use_lora": False})
    with pytest.raises(ConfigError, match="loraplus_lr_ratio: cannot be combined with use_fsdp"):
        load_config(None, {"loraplus_lr_ratio": 4, "use_fsdp": True})
