"""Lean dropout and lean attention: the same maths as the plain ops, with less kept for backward."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from vembed.config import load_config
from vembed.models.attention import NAME, lean_attention
from vembed.models.dropout import LeanDropout, lean_dropout
from vembed.training.loop import build_embedder


def saved_bytes(fn, *args) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def test_lean_dropout_is_dropout_with_a_bool_mask():
    x = torch.randn(64, 128, 48, requires_grad=True)
    torch.manual_seed(3)
    y = lean_dropout(x, 0.25, training=True)
    torch.manual_seed(3)
    assert torch.equal(y, lean_dropout(x, 0.25, training=True))  # seeded: replayable
    keep = y != 0
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[keep], x[keep] / 0.75)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, keep.float() / 0.75)
    assert lean_dropout(x, 0.25, training=False) is x
    # a bool mask is a quarter of the float one torch's CPU dropout keeps
    assert saved_bytes(lean_dropout, x, 0.25, True) * 4 == saved_bytes(F.dropout, x, 0.25, True)


def test_lean_attention_matches_softmax_dropout_matmul():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    grad = torch.randn(3, 2, 7, 4, dtype=torch.float64)
    torch.manual_seed(9)
    out = lean_attention(q, k, v, mask, 0.2, 0.5)
    out.backward(grad)
    ours = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(9)  # the same draw: rand >= p over the probabilities' shape
    probs = (q @ k.transpose(-2, -1) * 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    keep = torch.rand(probs.shape) >= 0.2
    ref = (probs * keep / 0.8) @ v
    ref.backward(grad)
    for a, b in zip(ours, [ref.detach(), q.grad, k.grad, v.grad], strict=True):
        torch.testing.assert_close(a, b)


def test_lean_attention_under_bf16_autocast_gives_input_dtype_gradients():
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lean_attention(q, k, v, None, 0.1, 0.5)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def test_training_model_uses_both_and_eval_output_is_unchanged(tiny_bert, tmp_path):
    cfg = load_config(None, {"model_name": tiny_bert, "lora_target_modules": ["query", "value"]})
    embedder = build_embedder(cfg, torch.float32)
    base = embedder.backbone.get_base_model()
    assert base.config._attn_implementation == NAME
    assert any(isinstance(m, LeanDropout) for m in embedder.modules())
    plain = AutoModel.from_pretrained(tiny_bert).eval()
    embedder.eval()
    enc = embedder.tokenizer(["a short one", "and a rather longer text to pad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = embedder.backbone(**enc).last_hidden_state
        theirs = plain(**enc).last_hidden_state
    torch.testing.assert_close(ours, theirs)
    # the switch is not written into saved configs, so anything can load a full fine-tune
    base.save_pretrained(tmp_path / "saved")
    assert NAME not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_gets_gradients_with_and_without_attention_dropout(tiny_bert, p):
    """Without dropout the lean path hands over to SDPA; with it, gradients still flow to LoRA."""
    cfg = load_config(None, {"model_name": tiny_bert, "lora_target_modules": ["query", "value"]})
    embedder = build_embedder(cfg, torch.float32)
    for m in embedder.modules():
        if hasattr(m, "dropout") and isinstance(m.dropout, torch.nn.Dropout):
            m.dropout.p = p
    embedder.train()
    enc = embedder.tokenizer(["x y z", "a b c d e f"], padding=True, return_tensors="pt")
    embedder(**enc).sum().backward()
    grads = [p_.grad for n, p_ in embedder.named_parameters() if "lora_B" in n and "query" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_training_mask_opens_left_padding_rows_and_keeps_real_tokens():
    """CUDA SDPA gives NaN gradients for a query that attends to nothing (left padding of a decoder
    embedder; seen on an H200). The training mask opens those rows only, so real tokens' outputs match."""
    from transformers import Qwen3Config, Qwen3Model
    from transformers.masking_utils import sdpa_mask

    from vembed.models.attention import training_mask, use_training_attention

    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    plain = sdpa_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=padding.bool())
    opened = training_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=padding.bool())
    assert not plain.any(-1).all()  # the rows the fix is for exist
    assert opened.any(-1).all()
    real = plain.any(-1, keepdim=True).expand_as(plain)
    assert torch.equal(opened[real], plain[real])

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attn_implementation="sdpa",
    )  # fmt: skip
    model = Qwen3Model(config).eval()
    ids = torch.randint(1, 64, (2, 5)) * padding
    before = model(input_ids=ids, attention_mask=padding).last_hidden_state
    assert use_training_attention(model)
    after = model(input_ids=ids, attention_mask=padding).last_hidden_state
    keep = padding.bool()
    torch.testing.assert_close(after[keep], before[keep])
