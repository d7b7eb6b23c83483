"""Training data: records featurized once, shuffled deterministically per epoch."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from vembed.data import ReadStats, Record, read_records
from vembed.data.items import record_items
from vembed.errors import DataError
from vembed.models.base import Embedder, Item, feature_length


def content_id(item: Item) -> int:
    """A stable 63-bit id of a document's content (text and image), equal on every process and run:
    two rows whose positives have the same id are not each other's negatives (vembed.training.losses)."""
    h = hashlib.blake2b(digest_size=8)
    h.update((item.text or "").encode("utf-8") + b"\x00")
    image = item.image
    if image is not None:
        h.update(image.tobytes() if hasattr(image, "tobytes") else str(image).encode("utf-8"))
    return int.from_bytes(h.digest(), "little") >> 1


class PairDataset(Dataset):
    """Featurized (query, positive, negatives) triples; tokenisation happens once, here.
    Item i is (query, positive, negatives, (positive content id, negative content ids))."""

    def __init__(self, records: Sequence[Record], embedder: Embedder) -> None:
        self.examples: list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], tuple[int, list[int]]]] = []
        for r in records:
            q, p, negs = record_items(r)
            ids = (content_id(p), [content_id(n) for n in negs])
            pair = (embedder.featurize(q, is_query=True), embedder.featurize(p, is_query=False))
            self.examples.append((*pair, [embedder.featurize(n, is_query=False) for n in negs], ids))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return self.examples[i]

    def lengths(self) -> list[int]:
        """Tokens per example (query + positive + negatives); 0 for items without input_ids (images)."""
        return [sum(feature_length(f) for f in (q, p, *negs)) for q, p, negs, _ in self.examples]


@dataclass
class PairCollator:
    embedder: Embedder

    def __call__(self, rows) -> dict[str, Any]:
        negatives = [n for r in rows for n in r[2]]
        batch: dict[str, Any] = {
            "query": self.embedder.collate([r[0] for r in rows]),
            "positive": self.embedder.collate([r[1] for r in rows]),
            # content ids, for false-negative masking
            "positive_ids": torch.tensor([r[3][0] for r in rows], dtype=torch.long),
            "negative_ids": torch.tensor([i for r in rows for i in r[3][1]], dtype=torch.long),
        }
        if negatives:
            batch["negatives"] = self.embedder.collate(negatives)
        return batch


@dataclass
class EpochBatchSampler:
    """Shuffled batches whose order depends only on (seed, epoch), so a resumed run
    sees exactly the batches the interrupted one would have seen.

    With `lengths`, batches are grouped by length: the shuffled order is cut into windows of
    `group_batches` batches, each window is sorted by length and cut into batches, and the full
    batches are shuffled. Rows still meet random in-batch negatives (from a random window), but a
    batch is padded to a length close to its rows' own, which on the demo data removes about a
    third of the tokens a step computes (docs/benchmarks.md).
    """

    n: int
    batch_size: int
    seed: int
    lengths: Sequence[int] | None = None
    group_batches: int = 8
    epoch: int = field(default=0, init=False)  # set by the loop before each epoch

    def __post_init__(self) -> None:
        if self.lengths is not None and len(self.lengths) != self.n:
            raise ValueError(f"lengths has {len(self.lengths)} entries for {self.n} examples")

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            for start in range(0, self.n, self.batch_size):
                yield order[start : start + self.batch_size]
            return
        lengths, b = self.lengths, self.batch_size
        window = b * self.group_batches
        batches = []
        for start in range(0, self.n, window):
            rows = sorted(order[start : start + window], key=lambda i: -lengths[i])  # stable: ties stay shuffled
            batches += [rows[k : k + b] for k in range(0, len(rows), b)]
        # Only the last window can leave a short batch; it stays last, as without grouping.
        full = [batch for batch in batches if len(batch) == b]
        short = [batch for batch in batches if len(batch) < b]
        for i in torch.randperm(len(full), generator=g).tolist():
            yield full[i]
        yield from short

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


def load_records(
    path: str, on_bad_record: str, transform: Callable[[Record], Record] | None = None
) -> tuple[list[Record], ReadStats]:
    stats = ReadStats()
    records = list(read_records(path, on_bad_record=on_bad_record, stats=stats, transform=transform))  # type: ignore[arg-type]
    if not records:
        raise DataError(f"{path}: no valid records ({stats.summary()})")
    return records, stats
