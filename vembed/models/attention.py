"""Attention with dropout on CPU that keeps less for the backward pass.

With attention dropout, torch's CPU SDPA cannot use its flash kernel and falls back to the math
path, which keeps the softmax output, a float dropout mask and the dropped-out probabilities
([batch, heads, seq, seq] each, 24 MiB per layer at 32 x 128 tokens with 12 heads) and spends time
guarding fully masked rows. This version keeps the softmax output and a bool mask, recomputes the
dropped-out probabilities in backward, and draws the mask like vembed.models.dropout (same
distribution, torch's default generator, so seeded runs and RNG replays stay exact).

It is registered with transformers under NAME and used only in training, for models that use
SDPA; without dropout (eval) and on other devices it hands over to transformers' SDPA function,
whose CUDA kernels do dropout themselves.

Its mask also lets a query that may attend to nothing (a left-padding position of a decoder
embedder) attend to its row: torch's CUDA SDPA kernels (checked: torch 2.11, H200) return finite
outputs for such rows but NaN gradients, which poison every weight after the first step. Real
tokens never attend to padding, so their outputs and gradients are unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from vembed.models.base import base_model

log = logging.getLogger(__name__)

NAME = "vembed_lean_sdpa"


class _LeanAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, scale: float):
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        if mask is not None:
            scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
        probs = torch.softmax(scores, dim=-1)
        del scores
        keep = torch.rand(probs.shape, device=probs.device) >= p
        keep_scale = 1.0 / (1.0 - p)
        out = torch.matmul(probs.mul(keep).mul_(keep_scale), v)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, keep = ctx.saved_tensors
        # Under autocast the forward's matmuls ran in low precision and softmax in fp32; backward
        # runs outside autocast, so dtypes are matched by hand (no-ops in plain fp32).
        dropped = probs.mul(keep).mul_(ctx.keep_scale).to(grad_out.dtype)
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out.to(dropped.dtype)).to(v.dtype)
        del dropped
        grad_probs = torch.matmul(grad_out, v.transpose(-2, -1).to(grad_out.dtype)).to(probs.dtype)
        grad_probs = grad_probs.mul_(keep).mul_(ctx.keep_scale)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(ctx.scale)
        grad_q = torch.matmul(grad_scores, k.to(grad_scores.dtype)).to(q.dtype)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q.to(grad_scores.dtype)).to(k.dtype)
        return grad_q, grad_k, grad_v, None, None, None


def lean_attention(q, k, v, mask: torch.Tensor | None, p: float, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask), dropout p, times v; [batch, heads, seq, head_dim] in and out."""
    return _LeanAttention.apply(q, k, v, mask, p, scale)


def lean_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers' attention-function signature; output [batch, seq, heads, head_dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    plain = (
        dropout == 0.0
        or query.device.type != "cpu"
        or causal
        or getattr(module, "num_key_value_groups", 1) > 1
        or kwargs.get("position_bias") is not None
        or key.shape[-2] != query.shape[-2]
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = lean_attention(query, key, value, attention_mask, dropout, scale)
    return out.transpose(1, 2).contiguous(), None


def training_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask (bool, True = attend, or None), with rows that attend to nothing opened."""
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def use_training_attention(backbone: nn.Module) -> bool:
    """Switch an SDPA model to NAME for training; False (unchanged) for other attention implementations."""
    model = base_model(backbone)
    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, lean_sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, training_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError) as e:  # a model that cannot switch keeps SDPA
        log.info("lean attention not used: %s", e)
        return False
    return model.config._attn_implementation == NAME
