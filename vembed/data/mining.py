"""Hard-negative mining: each query's near misses from a rank window of the corpus, minus likely positives.

The corpus (by default every distinct positive of the data, plus an optional extra corpus) is encoded
once with a given model (the base model or the current champion: anything `Predictor` loads). For each
query, an exact top-k over the corpus runs in chunks: a running top-k is merged with each chunk's
scores, so memory is bounded by (queries per block) x (chunk size) scores whatever the corpus size.
Candidates come from ranks [rank_start, rank_end) of that ranking (the query's own positive left out):
the very top ranks are often unlabelled positives. A candidate that scores above `margin` times the
query's own positive score is skipped as a likely false negative. The result depends only on the
model, the data and the settings: no sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vembed.artifacts.atomic_dir import staged_file
from vembed.data.records import Record, read_records, write_records
from vembed.errors import ConfigError, DataError
from vembed.models.base import Item

log = logging.getLogger(__name__)

Encode = Callable[[list[Item], bool], np.ndarray]  # (items, is_query) -> L2-normalised [n, d]


@dataclass(frozen=True)
class MiningSettings:
    rank_start: int = 10
    rank_end: int = 50
    num_negatives: int = 1
    margin: float = 0.95
    chunk_size: int = 16384
    query_block: int = 1024

    def __post_init__(self) -> None:
        if not 0 <= self.rank_start < self.rank_end:
            raise ConfigError(f"mining: need 0 <= rank_start < rank_end, got {self.rank_start}, {self.rank_end}")
        if self.num_negatives < 1:
            raise ConfigError(f"mining: num_negatives must be >= 1, got {self.num_negatives}")
        if not 0 < self.margin <= 1:
            raise ConfigError(f"mining: margin must be in (0, 1], got {self.margin}")
        if self.chunk_size < 1 or self.query_block < 1:
            raise ConfigError("mining: chunk_size and query_block must be >= 1")


@dataclass
class MiningStats:
    queries: int = 0
    mined: int = 0  # records that received at least one negative
    negatives: int = 0
    skipped_margin: int = 0  # candidates dropped as likely false negatives
    not_text: int = 0  # records without a text query and positive: left as they were

    def summary(self) -> str:
        return (
            f"{self.negatives} negatives for {self.mined} of {self.queries} queries; "
            f"{self.skipped_margin} candidates skipped by the margin; {self.not_text} non-text records left as they were"
        )


def chunked_topk(
    queries: torch.Tensor, corpus_chunks: Iterable[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products of `queries` [Q, D] over the concatenation of `corpus_chunks`,
    merging a running top-k with each chunk. Returns (scores, corpus indices), each [Q, min(k, N)],
    best first."""
    best_s = queries.new_empty(queries.size(0), 0)
    best_i = torch.empty(queries.size(0), 0, dtype=torch.long)
    offset = 0
    for chunk in corpus_chunks:
        # Each chunk's own top-k first: only [Q, chunk] scores and [Q, 2k] candidates are ever held.
        scores, pos = (queries @ chunk.T).topk(min(k, chunk.size(0)), dim=1)
        merged_s, merged_i = torch.cat([best_s, scores], 1), torch.cat([best_i, pos + offset], 1)
        best_s, keep = merged_s.topk(min(k, merged_s.size(1)), dim=1)
        best_i = merged_i.gather(1, keep)
        offset += chunk.size(0)
    return best_s, best_i


def mine_negatives(
    records: Sequence[Record],
    encode: Encode,
    settings: MiningSettings | None = None,
    extra_corpus: Sequence[str] = (),
) -> tuple[list[Record], MiningStats]:
    """`records` with mined text negatives appended (existing negatives kept, no duplicates)."""
    s = settings or MiningSettings()
    stats = MiningStats(queries=len(records))
    text_rows = [i for i, r in enumerate(records) if r.query and r.positive]
    stats.not_text = len(records) - len(text_rows)
    corpus = list(dict.fromkeys([records[i].positive for i in text_rows] + list(extra_corpus)))  # type: ignore[misc]
    if not text_rows or len(corpus) < 2:
        return list(records), stats
    where = {text: j for j, text in enumerate(corpus)}
    labelled: dict[tuple[str | None, str | None], set[str | None]] = {}  # every positive of a query, not only its row's
    for i in text_rows:
        labelled.setdefault((records[i].instruction, records[i].query), set()).add(records[i].positive)
    queries = [Item(text=records[i].query, instruction=records[i].instruction) for i in text_rows]
    q_emb = torch.from_numpy(np.ascontiguousarray(encode(queries, True), dtype=np.float32))
    c_emb = torch.from_numpy(np.ascontiguousarray(encode([Item(text=t) for t in corpus], False), dtype=np.float32))
    own = torch.tensor([where[records[i].positive] for i in text_rows])  # type: ignore[index]
    pos_scores = (q_emb * c_emb[own]).sum(-1)
    k = min(s.rank_end + 1, len(corpus))  # +1: the query's own positive may be in the ranking
    out = list(records)
    for start in range(0, len(text_rows), s.query_block):
        block = slice(start, start + s.query_block)
        scores, idx = chunked_topk(q_emb[block], c_emb.split(s.chunk_size), k)
        for row, (sc, ix) in enumerate(zip(scores.tolist(), idx.tolist(), strict=True)):
            n = start + row
            record = records[text_rows[n]]
            ranked = [(j, v) for j, v in zip(ix, sc, strict=True) if j != int(own[n])][s.rank_start : s.rank_end]
            limit = s.margin * float(pos_scores[n])
            chosen = []
            for j, v in ranked:
                if v > limit:
                    stats.skipped_margin += 1
                    continue
                if corpus[j] not in record.negatives and corpus[j] not in labelled[(record.instruction, record.query)]:
                    chosen.append(corpus[j])
                if len(chosen) == s.num_negatives:
                    break
            if chosen:
                out[text_rows[n]] = replace(record, negatives=(*record.negatives, *chosen))
                stats.mined += 1
                stats.negatives += len(chosen)
    return out, stats


def predictor_encoder(model_path: str, batch_size: int = 64) -> Encode:
    """Encode with a trained checkpoint, merged model, HF id or directory (`vembed.Predictor`)."""
    from vembed.inference.predictor import Predictor

    predictor = Predictor(model_path)

    def encode(items: list[Item], is_query: bool) -> np.ndarray:
        return predictor.encode_items(items, batch_size=batch_size, is_query=is_query)

    return encode


def mine_file(
    data_path: str,
    output_path: str,
    model: str,
    corpus: str | None = None,
    batch_size: int = 64,
    **settings: int | float,
) -> dict[str, object]:
    """`vembed mine`: read records, mine with `model`, write them to a new file; returns a summary."""
    from vembed.inference.evaluation import read_corpus

    out = Path(output_path)
    if out.exists():  # never overwrite what this command did not create
        raise DataError(f"{out}: already exists; choose a new output file")
    s = MiningSettings(**settings)  # type: ignore[arg-type]
    records = list(read_records(data_path))  # never empty: an empty file or a bad record raises
    extra = read_corpus(corpus) if corpus else []
    mined, stats = mine_negatives(records, predictor_encoder(model, batch_size), s, extra)
    with staged_file(out) as tmp:  # a crash leaves no half file (which would block the rerun as "exists")
        write_records(mined, tmp)
    log.info("mined: %s", stats.summary())
    return {"output": str(out), "model": model, "settings": s.__dict__, "summary": stats.summary(), **stats.__dict__}
