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
    from vembed.predictor import Predictor
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
