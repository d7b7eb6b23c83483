"""Cross-process negatives: the seam where embeddings are gathered for the loss, and the mask of
in-batch false negatives (rows that share a positive are not each other's negatives)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from vembed.training.losses import false_negative_mask

log = logging.getLogger(__name__)


def batch_loss(
    accelerator: Accelerator, loss_fn: torch.nn.Module, masker: FalseNegativeMasker | None, batch: dict[str, Any],
    q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None, cross_device: bool,
) -> torch.Tensor:  # fmt: skip
    """The loss of one batch's embeddings; with cross-device negatives, every rank's positives and
    negatives are candidates (a single process scores only its own)."""
    labels = None
    if accelerator.num_processes > 1 and cross_device:
        from vembed.training.distributed import gather_candidates

        q, p, n, labels = gather_candidates(accelerator, q, p, n)
    mask = masker(batch, labels, q.size(0)) if masker is not None else None
    return loss_fn(q, p, n, labels, mask)


@dataclass
class FalseNegativeMasker:
    """Builds each step's false-negative mask from the batch's content ids and counts what it masked.

    A candidate is masked for a query when it has the content of the query's own positive but is
    another row's positive or a hard negative: duplicates and templated rows otherwise push a query
    away from its own answer. Counts are per process; `take_window()` returns and resets them.
    """

    accelerator: Accelerator
    cross_device: bool
    enabled: bool = True
    masked_pairs: int = 0
    duplicate_batches: int = 0

    def __call__(self, batch: dict[str, Any], labels: torch.Tensor | None, n_queries: int) -> torch.Tensor | None:
        if not self.enabled or "positive_ids" not in batch:
            return None
        pos_ids, neg_ids = batch["positive_ids"], batch["negative_ids"]
        if n_queries > 1 and pos_ids.unique().numel() == 1:
            self.duplicate_batches += 1
            if self.duplicate_batches == 1:
                log.warning(
                    "a batch of %d rows has one positive for all of them: with false negatives masked, "
                    "those rows have no negatives and teach nothing; deduplicate the data", n_queries
                )
        if self.accelerator.num_processes > 1 and self.cross_device:
            from vembed.training.distributed import all_gather_rows

            pos_ids, neg_ids = all_gather_rows(pos_ids, False)[0], all_gather_rows(neg_ids, False)[0]
        candidate_ids = torch.cat([pos_ids, neg_ids]).to(self.accelerator.device)
        if labels is None:
            labels = torch.arange(n_queries, device=candidate_ids.device)
        mask = false_negative_mask(labels, candidate_ids)
        count = int(mask.sum())
        self.masked_pairs += count
        return mask if count else None

    def take_window(self) -> int:
        count, self.masked_pairs = self.masked_pairs, 0
        return count
