"""Dropout that keeps a 1-byte mask for the backward pass instead of a 4-byte one.

torch's CPU dropout draws a float mask, scales it in place and multiplies; autograd then keeps
that float mask until backward. On a [32, 128, 384] activation that is 6 MiB per dropout layer,
and a BERT layer with LoRA on query/value has four of them. Keeping a bool mask instead holds a
quarter of that, and drawing `rand < keep` is cheaper than `bernoulli_` on CPU. Same distribution
(each element kept with probability 1 - p, kept elements scaled by 1 / (1 - p)), drawn from
torch's default generator, so seeded runs, resumes and GradCache's RNG replay stay exact.
"""

from __future__ import annotations

import torch
from torch import nn


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def lean_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    keep = torch.rand(x.shape, device=x.device) >= p
    return _MaskedScale.apply(x, keep, 1.0 / (1.0 - p))


class LeanDropout(nn.Dropout):
    """nn.Dropout with a bool mask; the same module otherwise (p, inplace, state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or not x.is_floating_point():
            return super().forward(x)
        return lean_dropout(x, self.p, self.training)


def use_lean_dropout(model: nn.Module) -> None:
    """Turn every plain nn.Dropout in `model` into a LeanDropout in place."""
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = LeanDropout
