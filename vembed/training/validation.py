"""Validation during training: InfoNCE loss and retrieval metrics on held-out records.

Every rank embeds an equal share of the eval items (padded to the same number of forwards, which
FSDP needs), the embeddings are gathered, and every rank computes the same metrics from the same
tensors, so decisions taken from them (best checkpoint, early stop) agree across ranks.
The loss is InfoNCE over consecutive blocks of `loss_block` records (in-batch plus hard negatives):
the training objective without dropout, over as many records as one training step's loss sees (the
global batch with cross-device negatives); the retrieval metrics are vembed.inference.evaluation's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate import Accelerator

from vembed.data import Record
from vembed.data.items import record_items
from vembed.inference.evaluation import build_retrieval_set, doc_key, query_key, retrieval_metrics
from vembed.models.base import Embedder, Item, embed_features

# The metrics written to the log, the history and MLflow (as val/<name>).
LOGGED = ("loss", "ndcg@10", "recall@10", "mrr@10", "recall@1")


class Validator:
    """Holds the featurized eval set; `evaluate(model)` returns {"loss": ..., "ndcg@10": ..., ...}."""

    def __init__(
        self, records: Sequence[Record], embedder: Embedder, batch_size: int, loss_block: int | None = None,
        corpus: Sequence[str] = (),
    ) -> None:  # fmt: skip
        queries, docs, self.qrels = build_retrieval_set(records, corpus)  # corpus: more documents to rank
        q_index = {query_key(q): i for i, q in enumerate(queries)}
        d_index = {doc_key(d): i for i, d in enumerate(docs)}
        negatives: list[Item] = []
        self.rows: list[tuple[int, int, list[int]]] = []  # per record: query, positive doc, negative items
        for r in records:
            q, p, negs = record_items(r)
            first = len(negatives)
            negatives.extend(negs)
            self.rows.append((q_index[query_key(q)], d_index[doc_key(p)], list(range(first, len(negatives)))))
        self.n_queries, self.n_docs = len(queries), len(docs)
        self.features = [embedder.featurize(q, is_query=True) for q in queries]
        self.features += [embedder.featurize(d, is_query=False) for d in docs + negatives]
        self.batch_size = batch_size
        self.loss_block = loss_block or batch_size
        self.collate = embedder.collate

    def embed_all(self, accelerator: Accelerator, model: torch.nn.Module) -> torch.Tensor:
        """Every eval item's embedding (float32, on every rank), computed in equal shares per rank."""
        return embed_sharded(accelerator, model, self.collate, self.features, self.batch_size)

    def evaluate(self, accelerator: Accelerator, model: torch.nn.Module, loss_fn: torch.nn.Module) -> dict[str, float]:
        emb = self.embed_all(accelerator, model)
        queries, docs, negatives = emb.tensor_split([self.n_queries, self.n_queries + self.n_docs])
        metrics: dict[str, float] = {"loss": self._loss(queries, docs, negatives, loss_fn)}
        q, d = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (queries, docs))
        metrics.update(retrieval_metrics((q @ d.T).numpy(), self.qrels))
        return metrics

    @torch.no_grad()
    def _loss(self, queries: torch.Tensor, docs: torch.Tensor, negatives: torch.Tensor, loss_fn) -> float:
        total = 0.0
        for start in range(0, len(self.rows), self.loss_block):
            block = self.rows[start : start + self.loss_block]
            q = queries[[r[0] for r in block]]
            p = docs[[r[1] for r in block]]
            neg_ids = [i for r in block for i in r[2]]
            n = negatives[neg_ids] if neg_ids else None
            total += float(loss_fn(q, p, n, None)) * len(block)
        return total / len(self.rows)


@torch.no_grad()
def embed_sharded(
    accelerator: Accelerator, model: torch.nn.Module, collate: Any, features: Sequence[dict[str, Any]], batch_size: int
) -> torch.Tensor:
    """The embeddings of featurized items (float32, on every rank), computed in equal shares per rank,
    in eval mode. Collective: every rank calls it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    share = math.ceil(len(features) / world)
    mine = list(range(rank * share, (rank + 1) * share))
    # Past the end: repeat item 0 so that every rank runs the same forwards; cut off below.
    feats = [features[i] if i < len(features) else features[0] for i in mine]
    was_training = model.training
    model.eval()
    # Must not move the training's random streams (exact resume, same run with or without it).
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            local = embed_features(model, collate, feats, batch_size, accelerator.device, accelerator.device)
    finally:
        model.train(was_training)
    gathered = accelerator.gather(local) if world > 1 else local
    return gathered[: len(features)].cpu()


@dataclass
class BestTracker:
    """Best value of the chosen metric, where it was reached, and evaluations since it improved.

    Its state travels in trainer_state.json (`to_dict`/`load`), so a resumed run continues the
    same patience count and keeps the same best checkpoint."""

    metric: str | None
    greater_is_better: bool | None  # None: true for every metric but the loss
    patience: int | None = None
    best_value: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0

    def __post_init__(self) -> None:
        if self.greater_is_better is None:
            self.greater_is_better = self.metric not in (None, "loss")

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when it is a new best."""
        if self.metric is None:
            return False
        value, best = metrics[self.metric], self.best_value
        better = best is None or (value > best if self.greater_is_better else value < best)
        if better:
            self.best_value, self.best_step, self.best_checkpoint = value, step, f"checkpoint-{step}"
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "patience"}

    def load(self, state: dict[str, Any] | None) -> None:
        if not state or state.get("metric") != self.metric:
            return  # a different metric than the saved run's: start tracking afresh
        self.best_value, self.best_step = state.get("best_value"), state.get("best_step")
        self.best_checkpoint = state.get("best_checkpoint")
        self.evals_without_improvement = int(state.get("evals_without_improvement") or 0)
