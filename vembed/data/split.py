"""Deterministic train/eval split by hash, with exact-duplicate removal."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from vembed.data.records import Record


def is_eval(record: Record, eval_fraction: float, seed: int = 0, root: str | os.PathLike[str] | None = None) -> bool:
    """Same record, same seed -> same split, on any machine and any re-run.

    The hash covers the query side only, so records sharing a query never
    straddle train and eval. `root`: the data file's directory, when the record's image paths were
    resolved against it (RecordImages); the query image is then hashed relative to it, so the split
    does not change when the data directory moves (another machine, a resumed run).
    """
    if root is not None and record.query_image and Path(record.query_image).is_absolute():
        image = Path(record.query_image)
        if image.is_relative_to(base := Path(root).resolve()):
            record = replace(record, query_image=image.relative_to(base).as_posix())
    digest = hashlib.sha256(f"{seed}:{record.query_key()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


@dataclass
class SplitResult:
    train: list[Record] = field(default_factory=list)
    eval: list[Record] = field(default_factory=list)
    duplicates: int = 0


@dataclass
class SplitCounts:
    train: int = 0
    eval: int = 0
    duplicates: int = 0


def _tag(records: Iterable[Record], eval_fraction: float, seed: int, counts: SplitCounts) -> Iterator[tuple[Record, bool]]:
    if not 0 <= eval_fraction < 1:
        raise ValueError("eval_fraction must be in [0, 1)")
    seen: set[bytes] = set()  # 32 bytes per unique record: fine far beyond RAM-sized files
    for r in records:
        k = bytes.fromhex(r.key())
        if k in seen:
            counts.duplicates += 1
            continue
        seen.add(k)
        held = is_eval(r, eval_fraction, seed)
        counts.eval += held
        counts.train += not held
        yield r, held


def split_records(records: Iterable[Record], eval_fraction: float = 0.1, seed: int = 0) -> SplitResult:
    """Drop exact duplicates (keeping the first) and split in memory."""
    counts = SplitCounts()
    out = SplitResult()
    for r, held in _tag(records, eval_fraction, seed, counts):
        (out.eval if held else out.train).append(r)
    out.duplicates = counts.duplicates
    return out


def split_to_files(
    records: Iterable[Record],
    train_path: str | os.PathLike[str],
    eval_path: str | os.PathLike[str],
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> SplitCounts:
    """Streaming split straight into two JSONL files."""
    counts = SplitCounts()
    for p in (train_path, eval_path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    with open(train_path, "w", encoding="utf-8") as tr, open(eval_path, "w", encoding="utf-8") as ev:
        for r, held in _tag(records, eval_fraction, seed, counts):
            (ev if held else tr).write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    return counts
