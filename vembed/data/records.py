"""Streaming JSONL reader. Each bad record is reported as `path:line: reason`."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vembed.errors import DataError

TEXT_FIELDS = ("query", "positive", "instruction")
IMAGE_FIELDS = ("query_image", "positive_image")
LIST_FIELDS = ("negatives", "negative_images")
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Record:
    """One training pair. Image fields are paths as written in the file."""

    query: str | None = None
    positive: str | None = None
    negatives: tuple[str, ...] = ()
    query_image: str | None = None
    positive_image: str | None = None
    negative_images: tuple[str, ...] = ()
    instruction: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if k in LIST_FIELDS else v for k, v in asdict(self).items() if v not in (None, ())}

    def key(self) -> str:
        """Content hash: equal for exact duplicates."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def query_key(self) -> str:
        """Hash of the query side only, so one query never lands in both splits."""
        q = json.dumps([self.instruction, self.query, self.query_image])
        return hashlib.sha256(q.encode()).hexdigest()


@dataclass
class ReadStats:
    records: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first few skip messages, for the report

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.records} records"
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        return f"{self.records} records, {self.skipped_total} skipped ({reasons})"


class RecordRejected(DataError):
    """A record that cannot be used; `kind` is its category in the skip counts."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_unicode(key: str, text: str) -> None:
    """A lone surrogate escape ("\\ud800") is valid JSON but no Unicode text: writing it as UTF-8 or
    tokenizing it fails later, with a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordRejected(f"field {key!r} holds a lone surrogate escape at character {e.start}", "invalid UTF-8") from None


def _parse(obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise RecordRejected(f"expected a JSON object, got {type(obj).__name__}", "wrong type")
    values: dict[str, Any] = {}
    for key in (*TEXT_FIELDS, *IMAGE_FIELDS, *LIST_FIELDS):
        if (v := obj.get(key)) is None:
            continue
        if key in LIST_FIELDS:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise RecordRejected(f"field {key!r} must be a list of strings", "wrong type")
            if any(not x.strip() for x in v):
                raise RecordRejected(f"field {key!r} contains an empty string", "empty field")
            for x in v:
                check_unicode(key, x)
            v = tuple(v)
        elif not isinstance(v, str):
            raise RecordRejected(f"field {key!r} must be a string, got {type(v).__name__}", "wrong type")
        elif not v.strip():
            raise RecordRejected(f"field {key!r} is empty", "empty field")
        else:
            check_unicode(key, v)
        values[key] = v
    # No file system takes a NUL in a path; os calls raise a bare ValueError on one.
    paths = [(k, values[k]) for k in IMAGE_FIELDS if k in values] + [("negative_images", p) for p in values.get("negative_images", ())]
    if bad := next((k for k, p in paths if "\x00" in p), None):
        raise RecordRejected(f"field {bad!r}: an image path with a NUL character", "bad image path")
    for side in ("query", "positive"):
        if side not in values and f"{side}_image" not in values:
            raise RecordRejected(f"missing field {side!r} (or {side}_image)", "missing field")
    return Record(**values)


def read_records(
    path: str | os.PathLike[str],
    on_bad_record: Literal["error", "skip"] = "error",
    stats: ReadStats | None = None,
    transform: Callable[[Record], Record] | None = None,
) -> Iterator[Record]:
    """Yield records from a JSONL file, one line at a time (files larger than RAM work).

    With on_bad_record="error" the first bad record raises DataError("path:line: reason").
    With "skip" bad records are counted in `stats` and reading goes on.
    `transform` checks or rewrites each record (e.g. vembed.data.images.RecordImages); a
    DataError it raises is reported for that line like any other bad record.
    """
    stats = stats if stats is not None else ReadStats()
    if "://" in str(path):  # Path() would turn s3://b/k into s3:/b/k and report that as not found
        raise DataError(f"{path}: a URI; only local JSONL files are read here (the pipeline fetches s3:// data)")
    path = Path(path)
    seen_content = False
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a JSONL file") from None
    lineno = 0
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            if not raw.strip():
                continue
            seen_content = True
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise RecordRejected(f"invalid UTF-8 at byte {e.start}", "invalid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise RecordRejected(f"invalid JSON: {e.msg} (column {e.colno})", "invalid JSON") from None
                except RecursionError:  # e.g. [[[[...]]]] thousands deep: json's parser recurses per level
                    raise RecordRejected("invalid JSON: nested too deeply", "invalid JSON") from None
                record = _parse(obj)
                if transform is not None:
                    record = transform(record)
            except DataError as bad:  # a RecordRejected, or any DataError of `transform`
                message = f"{path}:{lineno}: {bad}"
                if on_bad_record == "error":
                    raise DataError(message) from None
                stats.skipped[getattr(bad, "kind", "rejected")] += 1
                if len(stats.examples) < 5:
                    stats.examples.append(message)
                continue
            stats.records += 1
            yield record
    if not seen_content:
        what = "empty" if lineno == 0 else "entirely blank"
        raise DataError(f"{path}:{max(lineno, 1)}: file is {what}, no records")


def write_records(records: Iterable[Record], path: str | os.PathLike[str]) -> int:
    """Write records as JSONL; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n
