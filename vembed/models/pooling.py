"""Pooling of token states into one vector per sequence."""

from __future__ import annotations

import torch

# sentence-transformers' names for our modes, both ways.
ST_POOLING = {"mean": "mean", "cls": "cls", "last_token": "lasttoken"}
FROM_ST_POOLING = {v: k for k, v in ST_POOLING.items()}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last non-padding token, whichever side the padding is on."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = (positions * mask.long()).argmax(dim=1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


_POOLERS = {"mean": mean_pool, "cls": lambda hidden, mask: hidden[:, 0], "last_token": last_token_pool}


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    return _POOLERS[mode](hidden, mask)
