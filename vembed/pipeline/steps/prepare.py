"""Pipeline step: raw JSONL (local or s3://) -> a validated, deduplicated train/eval dataset directory.

The dataset directory holds `train.jsonl`, `eval.jsonl`, `stats.json` and a `manifest.json`
written last (see vembed.artifacts.storage), so a crashed prepare never leaves a readable dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vembed.artifacts import storage
from vembed.artifacts.integrity import MANIFEST, sha256_file
from vembed.data import ReadStats, Record, read_records, split_to_files
from vembed.data.records import RecordRejected
from vembed.errors import ConfigError, DataError, StorageError

LATEST = "latest"
SNAPSHOT_RE = re.compile(r"^dt=\d{4}-\d{2}-\d{2}")  # dt=YYYY-MM-DD, optionally with a time suffix
MAX_EXAMPLES = 5


def latest_snapshot(prefix_uri: str) -> str:
    """The lexically newest `dt=YYYY-MM-DD/` sub-directory of a local dir or s3:// prefix."""
    names = [n for n in storage.list_dirs(prefix_uri) if SNAPSHOT_RE.match(n)]
    if not names:
        raise DataError(f"{prefix_uri}: no dt=YYYY-MM-DD/ snapshot found under this prefix")
    newest = storage.join(prefix_uri, max(names))
    return newest + "/" if storage.is_s3(newest) else newest


def resolve_raw_uri(raw_uri: str) -> str:
    """`<prefix>/latest` -> the newest dt= snapshot under the prefix; any other URI as it is."""
    prefix, _, name = raw_uri.rstrip("/").rpartition("/")
    return latest_snapshot(prefix) if prefix and name == LATEST else raw_uri


def _under(uri: str, directory: str) -> bool:
    """Whether `uri` lies inside `directory` (both local paths, or both s3:// URIs)."""
    if storage.is_s3(uri) != storage.is_s3(directory):
        return False
    if storage.is_s3(uri):
        return uri.startswith(directory.rstrip("/") + "/")
    return Path(uri).resolve().is_relative_to(Path(directory).resolve())


def source_files(raw_uri: str, output_uri: str | None = None) -> list[str]:
    """The JSONL files to read, in a fixed order: one file/object, or every *.jsonl under a dir/prefix
    (in a local folder, hidden files and folders left out; so is `output_uri`, the dataset a
    rerun would otherwise read back as raw data)."""
    local = not storage.is_s3(raw_uri)
    if local and not Path(raw_uri).exists():
        raise DataError(f"{raw_uri}: raw data not found")
    uris = storage.list(raw_uri)
    if uris != [str(Path(raw_uri)) if local else raw_uri]:  # a folder or prefix, not one named file
        hidden = lambda u: local and any(p.startswith(".") for p in Path(u).relative_to(raw_uri).parts)  # noqa: E731
        ours = lambda u: output_uri is not None and _under(u, output_uri)  # noqa: E731
        uris = [u for u in uris if u.endswith(".jsonl") and not hidden(u) and not ours(u)]
    if not uris:
        raise DataError(f"{raw_uri}: no *.jsonl files found")
    return uris


def check_output(output_uri: str) -> None:
    """Refuse a complete directory that is not an earlier dataset: staging_dir alone replaces any
    directory with a manifest (a merged model, a checkpoint, someone else's upload)."""
    if not storage.exists(storage.join(output_uri, MANIFEST)):
        return  # missing, empty or unfinished: staging_dir decides
    files = {entry["path"] for entry in storage.read_manifest(output_uri)["files"]}
    if not {"stats.json", "train.jsonl"} <= files:
        raise StorageError(f"{output_uri}: holds a complete directory that is not a prepared dataset; refusing to replace it")


def _resolve_image(source_uri: str, image: str) -> str:
    """An image path relative to its data file, made absolute (local path or s3:// URI).
    Paths that escape the data file's directory (or bucket) are refused."""
    from vembed.data.images import resolve_image_path

    if storage.is_s3(image):  # a full URI stays as it is, as resolve_image_path keeps it
        return image
    if storage.is_s3(source_uri):
        bucket, key = storage.split_s3(source_uri)
        if posixpath.isabs(image):  # joined, it became s3://bucket//path: an object that is not there
            raise DataError(f"image path {image!r} is a local absolute path in a data file on s3")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(key), image))
        if resolved.startswith("../") or resolved == "..":
            raise DataError(f"{source_uri}: image path {image!r} points outside the bucket")
        return f"s3://{bucket}/{resolved}"
    return resolve_image_path(image, os.path.dirname(os.path.abspath(source_uri)))


@dataclasses.dataclass
class _Reader:
    """Streams records from every source file in order; one downloaded file on disk at a time. Local images
    are copied into the dataset (content-addressed under images/), so the dataset directory is
    self-contained when it moves through object storage; s3:// images stay where they are."""

    uris: list[str]
    on_bad_record: str
    workdir: Path
    dataset_dir: Path
    copied: dict[str, str] = dataclasses.field(default_factory=dict)  # resolved local image -> its path in the dataset
    records: int = 0
    skipped: Counter[str] = dataclasses.field(default_factory=Counter)
    examples: list[str] = dataclasses.field(default_factory=list)
    images_rebased: int = 0
    files: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    source_hash: Any = dataclasses.field(default_factory=hashlib.sha256)  # of all source bytes, concatenated in order

    def _checked_image(self, source_uri: str, image: str) -> str:
        """Where an image of a data file is (local path or s3:// URI); a local one must be a readable image."""
        from vembed.data.images import check_image

        resolved = _resolve_image(source_uri, image)
        if storage.is_s3(resolved) or resolved in self.copied:
            return resolved
        src = Path(resolved)
        try:
            if not src.is_file():
                raise RecordRejected(f"image {image!r} not found (looked for {src})", "missing image")
            check_image(resolved)  # as the training reader does: a bad image is this line's, counted here
        except OSError as e:  # a name too long, permission denied, ...: this line's image, not the whole run
            raise RecordRejected(f"image {image!r} cannot be read ({e.strerror or type(e).__name__})", "bad image") from None
        return resolved

    def _placed_image(self, resolved: str) -> str:
        """A checked local image copied into the dataset (content-addressed, once): its dataset path."""
        if storage.is_s3(resolved):
            return resolved
        if resolved not in self.copied:
            src = Path(resolved)
            rel = f"images/{sha256_file(src)[:24]}{src.suffix.lower()}"
            dest = self.dataset_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                shutil.copyfile(src, dest)
            self.copied[resolved] = rel
        return self.copied[resolved]

    def _hash(self, path: Path) -> tuple[str, int]:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                self.source_hash.update(chunk)
        return digest.hexdigest(), path.stat().st_size

    def __iter__(self) -> Iterator[Record]:
        for uri in self.uris:
            local = storage.download_file(uri, self.workdir / "part.jsonl") if storage.is_s3(uri) else Path(uri)
            try:
                yield from self._read_file(uri, local)
            finally:
                if local.parent == self.workdir:
                    local.unlink(missing_ok=True)

    def _read_file(self, uri: str, local: Path) -> Iterator[Record]:
        sha, size = self._hash(local)
        stats = ReadStats()
        original = str(local)

        def named(message: str) -> str:
            # Errors name the original file (s3:// URI), not our temp copy; line numbers are unchanged.
            return uri + message[len(original) :] if message.startswith(original) else message

        def rebase(record: Record) -> Record:
            """Image paths become dataset-relative copies (local) or absolute s3:// URIs. Runs inside
            read_records, so a missing or escaping image is reported as path:line."""
            check = lambda image: self._checked_image(uri, image)  # noqa: E731
            changes: dict[str, Any] = {k: check(v) for k in ("query_image", "positive_image") if (v := getattr(record, k))}
            if record.negative_images:
                changes["negative_images"] = tuple(map(check, record.negative_images))
            # Copied once every image of the record passed: a skipped record leaves no image in the dataset.
            for k, v in changes.items():
                changes[k] = tuple(map(self._placed_image, v)) if k == "negative_images" else self._placed_image(v)
            self.images_rebased += bool(changes)
            return dataclasses.replace(record, **changes) if changes else record

        try:
            yield from read_records(local, on_bad_record=self.on_bad_record, stats=stats, transform=rebase)  # type: ignore[arg-type]
        except DataError as e:
            if self.on_bad_record != "skip":
                raise DataError(named(str(e))) from None
            # In skip mode read_records raises only for a file with no content at all.
            stats.skipped["empty file"] += 1
            stats.examples.append(named(str(e)))
        self.records += stats.records
        self.skipped.update(stats.skipped)
        self.examples.extend(named(m) for m in stats.examples[: MAX_EXAMPLES - len(self.examples)])
        self.files.append(
            {"uri": uri, "sha256": sha, "size": size, "records": stats.records, "skipped": stats.skipped_total}
        )


def _mine(train_path: Path, model: str) -> dict[str, Any]:
    """Rewrite the train split with mined negatives (default MiningSettings); returns what was mined, for stats.json."""
    from vembed.data import write_records
    from vembed.data.mining import MiningSettings, mine_negatives, predictor_encoder

    settings = MiningSettings()
    records = list(read_records(str(train_path)))
    mined, stats = mine_negatives(records, predictor_encoder(model), settings)
    write_records(mined, train_path)
    return {"model": model, **dataclasses.asdict(settings), **dataclasses.asdict(stats)}


def prepare(
    raw_uri: str,
    output_uri: str,
    eval_fraction: float = 0.1,
    seed: int = 0,
    on_bad_record: str = "error",
    mine_negatives: str | None = None,
) -> dict[str, Any]:
    """Validate, deduplicate and split raw JSONL into a dataset directory at `output_uri`.

    `raw_uri`: see `source_files`, or `<prefix>/latest` for the newest dt=YYYY-MM-DD/
    snapshot. The split is deterministic: same data and seed -> same split. `mine_negatives`: a model
    (HF id, directory or checkpoint) that mines hard negatives into the train split (vembed.data.mining).
    Returns the stats written to `stats.json`, plus `output` and `dataset_sha256` (sha256 of the
    dataset's manifest).
    """
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction: must be in [0, 1), got {eval_fraction}")
    if on_bad_record not in ("error", "skip"):
        raise ConfigError(f"on_bad_record: must be 'error' or 'skip', got {on_bad_record!r}")
    check_output(output_uri)
    source = resolve_raw_uri(raw_uri)
    uris = source_files(source, output_uri)

    with tempfile.TemporaryDirectory(prefix="vembed-prepare-") as workdir, storage.staging_dir(output_uri) as out:
        reader = _Reader(uris, on_bad_record, Path(workdir), out)
        counts = split_to_files(reader, out / "train.jsonl", out / "eval.jsonl", eval_fraction=eval_fraction, seed=seed)
        if counts.train == 0:
            skipped = sum(reader.skipped.values())
            raise DataError(f"{source}: no valid records to train on ({reader.records} read, {skipped} skipped)")
        warnings = []
        if eval_fraction > 0 and counts.eval == 0:
            warnings.append(f"eval split is empty: {counts.train} records are too few for eval_fraction={eval_fraction}")
        mined = _mine(out / "train.jsonl", mine_negatives) if mine_negatives else None
        stats: dict[str, Any] = {
            "source": source,
            "source_sha256": reader.source_hash.hexdigest(),
            "source_files": reader.files,
            "records": reader.records,
            "train": counts.train,
            "eval": counts.eval,
            "duplicates": counts.duplicates,
            "skipped": dict(reader.skipped.most_common()),
            "skipped_total": sum(reader.skipped.values()),
            "skipped_examples": reader.examples,
            "images_rebased": reader.images_rebased,
            "eval_fraction": eval_fraction,
            "seed": seed,
            "on_bad_record": on_bad_record,
            "warnings": warnings,
            **({"mining": mined} if mined else {}),
        }
        (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {**stats, "output": output_uri, "dataset_sha256": storage.manifest_sha256(output_uri)}
