"""Contrastive losses: InfoNCE over in-batch plus hard negatives, and a Matryoshka wrapper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each query against every positive in the batch plus all hard negatives.

    `query` [B, D], `positive` [P, D] (P >= B when positives were gathered from other
    processes), `negatives` [N, D]. Query i's target is positive `labels[i]` (default i).
    Hard negatives are added to the candidate pool; they never replace in-batch negatives.
    `mask` [B, P + N], True where a candidate is a false negative of the query (the same content
    as its positive): that candidate is left out of the query's softmax.
    """
    q = F.normalize(query.float(), dim=-1)
    candidates = positive if negatives is None or negatives.numel() == 0 else torch.cat([positive, negatives])
    c = F.normalize(candidates.float(), dim=-1)
    logits = q @ c.T / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    if labels is None:
        labels = torch.arange(q.size(0), device=q.device)
    return F.cross_entropy(logits, labels)


def false_negative_mask(labels: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """[B, C] True where candidate c has the same content id as query b's positive but is not it.

    `candidate_ids` [C]: content ids of the positives, then the hard negatives, in loss order.
    """
    target = candidate_ids[labels]
    mask = candidate_ids.unsqueeze(0) == target.unsqueeze(1)
    mask[torch.arange(labels.size(0), device=labels.device), labels] = False
    return mask


class InfoNCELoss(nn.Module):
    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return info_nce(query, positive, negatives, self.temperature, labels, mask)


class MatryoshkaLoss(nn.Module):
    """Weighted mean of the base loss at each truncated dim (each renormalised)."""

    def __init__(self, base: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        weights = [1.0] * len(dims) if weights is None else list(weights)
        if len(weights) != len(dims):
            raise ValueError(f"mrl_weights has {len(weights)} entries but mrl_dims has {len(dims)}")
        self.base = base
        self.dims = list(dims)
        self.weights = weights

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        full = query.size(-1)
        too_big = [d for d in self.dims if d > full]
        if too_big:
            raise ValueError(f"mrl_dims {too_big} exceed the embedding dim {full}")
        total = query.new_zeros((), dtype=torch.float32)
        for dim, weight in zip(self.dims, self.weights, strict=True):
            n = None if negatives is None else negatives[..., :dim]
            total = total + weight * self.base(query[..., :dim], positive[..., :dim], n, labels, mask)
        return total / sum(self.weights)


def build_loss(cfg, embedding_dim: int) -> nn.Module:
    """The loss a config asks for; MRL dims default to the full dim alone (see resolve_mrl_dims)."""
    base = InfoNCELoss(cfg.temperature)
    if not cfg.use_mrl:
        return base
    return MatryoshkaLoss(base, resolve_mrl_dims(cfg.mrl_dims, embedding_dim), cfg.mrl_weights)


def resolve_mrl_dims(dims: Sequence[int] | None, embedding_dim: int) -> list[int]:
    if dims is None:
        # Measured (docs/benchmarks.md, issue 15, three seeds on two data sets): the rotation that
        # use_mrl saves (vembed.models.rotation) alone keeps 97-98.5% of the full-dim nDCG@10 at a
        # quarter of the dim with the full dim unchanged; adding a quarter-dim loss keeps about the
        # same and costs the full dim up to 0.011. So by default only the full dim is trained.
        return [embedding_dim]
    too_big = [d for d in dims if d > embedding_dim]
    if too_big:
        from vembed.errors import ConfigError

        raise ConfigError(f"mrl_dims: {too_big} exceed the model's embedding dim {embedding_dim}")
    return list(dims)
