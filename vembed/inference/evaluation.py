"""Retrieval evaluation: Recall@1/5/10, MRR@10 and nDCG@10, per MRL dim, base vs tuned."""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vembed.artifacts.atomic_dir import check_output_file, staged_file
from vembed.data import Record, read_records
from vembed.data.items import record_items
from vembed.data.records import check_unicode
from vembed.errors import CheckpointError, ConfigError, DataError, first_line
from vembed.models.base import Item

METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


def retrieval_metrics(scores: np.ndarray, qrels: Sequence[set[int]], k: int = 10) -> dict[str, float]:
    """Mean metrics over queries. `scores` [Q, D]; `qrels[i]` = relevant doc indices of query i."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    sums = dict.fromkeys(METRICS, 0.0)
    for ranked, relevant in zip(top, qrels, strict=True):
        hits = [int(d) in relevant for d in ranked]
        for cutoff in (1, 5, 10):
            sums[f"recall@{cutoff}"] += sum(hits[:cutoff]) / len(relevant)
        sums["mrr@10"] += next((1.0 / (i + 1) for i, h in enumerate(hits) if h), 0.0)
        dcg = sum(1.0 / math.log2(i + 2) for i, h in enumerate(hits) if h)
        idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
        sums["ndcg@10"] += dcg / idcg
    return {m: v / len(qrels) for m, v in sums.items()}


def doc_key(item: Item) -> tuple[str | None, str | None]:
    """Documents with the same text and image are one document."""
    return (item.text, str(item.image) if item.image is not None else None)


def query_key(item: Item) -> tuple[Any, ...]:
    return (*doc_key(item), item.instruction)


def build_retrieval_set(
    records: Sequence[Record], corpus: Sequence[str] = ()
) -> tuple[list[Item], list[Item], list[set[int]]]:
    """Queries, documents (eval positives + extra corpus, deduplicated) and qrels."""
    queries: dict[tuple[Any, ...], tuple[int, Item]] = {}  # key -> (index, first item with that key)
    docs: dict[tuple[str | None, str | None], tuple[int, Item]] = {}
    relevant: dict[int, set[int]] = defaultdict(set)
    for r in records:
        q, p, _ = record_items(r)
        qi, _ = queries.setdefault(query_key(q), (len(queries), q))
        di, _ = docs.setdefault(doc_key(p), (len(docs), p))
        relevant[qi].add(di)
    for text in corpus:
        docs.setdefault(doc_key(Item(text=text)), (len(docs), Item(text=text)))
    return [q for _, q in queries.values()], [d for _, d in docs.values()], [relevant[i] for i in range(len(queries))]


def evaluate_retrieval(
    predictor: Any,
    records: Sequence[Record],
    corpus: Sequence[str] | None = None,
    dims: Sequence[int] | None = None,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """{"full": metrics, "<dim>": metrics, ...} for one model."""
    if too_large := [d for d in dims or () if d > predictor.dim]:  # else no row for it, and no word why
        raise ConfigError(f"dims: {too_large} exceed the model's embedding dim {predictor.dim}")
    queries, docs, qrels = build_retrieval_set(records, corpus or ())
    q = predictor.encode_items(queries, batch_size=batch_size, is_query=True)
    d = predictor.encode_items(docs, batch_size=batch_size)
    results = {"full": retrieval_metrics(_normalized(q) @ _normalized(d).T, qrels)}
    for dim in dims or ():
        if dim < q.shape[1]:
            results[str(dim)] = retrieval_metrics(_normalized(q[:, :dim]) @ _normalized(d[:, :dim]).T, qrels)
    return results


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def read_corpus(path: str | Path) -> list[str]:
    texts = []
    if not Path(path).exists():
        raise DataError(f"{path}: corpus file does not exist")
    if Path(path).is_dir():
        raise DataError(f"{path}: is a directory, expected a JSONL file")
    with open(path, "rb") as fh:  # decoded line by line, so that bad UTF-8 is reported with its line
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            except RecursionError:  # [[[[...]]]] thousands deep
                raise DataError(f"{path}:{lineno}: invalid JSON: nested too deeply") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise DataError(f'{path}:{lineno}: expected {{"text": "..."}} with a non-empty string')
            try:
                check_unicode("text", obj["text"])
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            texts.append(obj["text"])
    return texts


def compare_models(
    models: dict[str, str],
    eval_path: str | Path,
    corpus_path: str | Path | None = None,
    dims: Sequence[int] | None = None,
    batch_size: int = 64,
    retrieval_mode: str = "auto",
) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate several models on one eval set: {"base": {...}, "tuned": {...}}.

    `retrieval_mode` (t2t, t2i, i2t, i2i; auto: every field present) picks query and document fields."""
    from vembed.data.images import RecordImages
    from vembed.inference.predictor import Predictor

    # Image paths are resolved against the eval file's directory and checked up front (path:line errors).
    images = RecordImages(Path(eval_path).parent, retrieval_mode)
    records = list(read_records(eval_path, transform=images))
    corpus = read_corpus(corpus_path) if corpus_path else []
    return {
        name: evaluate_retrieval(Predictor(path), records, corpus, dims, batch_size)
        for name, path in models.items()
    }


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Models side by side, one row per (dim, metric), plus the change vs the first model."""
    from rich.console import Console
    from rich.table import Column, Table

    names = list(results)
    numbers = [*names, f"{names[-1]} - {names[0]}"] if len(names) > 1 else names
    table = Table("dim", "metric", *(Column(n, justify="right") for n in numbers), title="retrieval metrics")
    first = results[names[0]]
    for dim in first:
        for metric in METRICS:
            values = [results[n].get(dim, {}).get(metric) for n in names]
            cells = [f"{v:.4f}" if v is not None else "-" for v in values]
            if len(names) > 1 and None not in (values[0], values[-1]):
                cells.append(f"{values[-1] - values[0]:+.4f}")
            table.add_row(dim, metric, *cells)
    console = Console(width=120, file=io.StringIO())
    console.print(table)
    return console.file.getvalue()


def base_model_of(model_path: str) -> str | None:
    """The base model an adapter checkpoint was trained from, if it is one."""
    d = Path(model_path)
    if not (d / "adapter_config.json").is_file():
        return None
    from vembed.inference.predictor import read_spec

    if (spec := read_spec(d)) is not None:
        return spec.model_name
    try:
        return json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError) as e:  # not JSON, or not an object
        raise CheckpointError(f"{d / 'adapter_config.json'}: invalid ({first_line(e)})") from None


def parse_dims(text: str) -> list[int]:
    """`--dims 384,256` -> [384, 256]; anything else is a one-line error naming the flag."""
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--dims: expected comma-separated positive integers such as 384,256, got {text!r}")
    return [int(p) for p in parts]


def evaluate_cli(
    model: str, data: str, base: str | None = None, no_base: bool = False, corpus: str | None = None,
    dims: str | None = None, output: str | None = None, batch_size: int = 64, retrieval_mode: str = "auto",
    overwrite: bool = False,
) -> int:  # fmt: skip
    """`vembed evaluate`: the metrics table of the model (and its base model); `output` (a new file unless
    `overwrite`) also gets the JSON."""
    base = base or base_model_of(model)
    models = {"base": base} if base and not no_base else {}
    models["tuned"] = model
    dim_list = parse_dims(dims) if dims else None
    if output:
        check_output_file(Path(output), overwrite)
    results = compare_models(models, data, corpus, dim_list, batch_size, retrieval_mode=retrieval_mode)
    print(format_table(results))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with staged_file(Path(output)) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
    return 0
