"""Integrity of every directory vembed writes: one hashing helper, one pickle refusal, one format.

`manifest.json` lists the size and sha256 of every other file in the directory and is written last,
so a directory without one is incomplete; readers check files against it. Checkpoints, merged and
registered models and stored datasets all carry it, and storage uploads and downloads it unchanged
(the manifest of a checkpoint is the manifest of its stored copy).

No torch here: the registry and storage import it without pulling the training stack.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from vembed.errors import CheckpointError, StorageError, VembedError, first_line

MANIFEST = "manifest.json"
# What vembed wrote before the manifest was its one format: {file: sha256}. Still verified, never written.
CHECKSUMS = "checksums.json"
# Every suffix that usually holds a pickle (torch.save, joblib, Lightning): never loaded, never registered.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def refuse_pickle(directory: str | os.PathLike[str], error: type[VembedError] = CheckpointError) -> None:
    """Raise `error` naming the pickle files anywhere under `directory`; vembed loads safetensors only."""
    d = Path(directory)
    if found := sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file()):
        raise error(f"{d}: refusing pickle weight files {found[:5]}; vembed loads safetensors only")


def build_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Size and sha256 of every file under `directory` (a top-level manifest.json excluded)."""
    root = Path(directory)
    files = [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    ]
    return {"version": 1, "files": files}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> None:
    """Write `manifest` (default: built from the directory's files) last, renamed into place whole."""
    d = Path(directory)
    data = manifest_bytes(manifest if manifest is not None else build_manifest(d))
    tmp = d / f".{MANIFEST}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    os.replace(tmp, d / MANIFEST)


def parse_manifest(data: bytes, where: str, error: type[VembedError] = StorageError) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        for entry in manifest["files"]:
            rel, _, _ = entry["path"], int(entry["size"]), str(entry["sha256"])
            # A manifest must never make us write outside the target directory.
            if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
                raise ValueError(f"unsafe path {rel!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise error(f"{where}: invalid {MANIFEST} ({e})") from None
    return manifest


def verify_file(path: Path, entry: dict[str, Any], where: str, error: type[VembedError] = StorageError) -> None:
    """`entry` is a manifest entry (a legacy one has no size)."""
    if entry.get("size") is not None and (size := path.stat().st_size) != entry["size"]:
        raise error(f"{where}: size {size} does not match manifest ({entry['size']}); the copy is corrupt")
    if sha256_file(path) != entry["sha256"]:
        raise error(f"{where}: sha256 does not match manifest; the copy is corrupt")


def verify_checkpoint(directory: str | os.PathLike[str]) -> Path:
    """Raise CheckpointError unless every file listed in the manifest is intact."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    refuse_pickle(d)
    if (d / MANIFEST).is_file():
        entries = parse_manifest((d / MANIFEST).read_bytes(), str(d / MANIFEST), CheckpointError)["files"]
    elif (d / CHECKSUMS).is_file():
        try:
            entries = [{"path": k, "sha256": v} for k, v in json.loads((d / CHECKSUMS).read_text()).items()]
        except (ValueError, AttributeError):
            raise CheckpointError(f"{d / CHECKSUMS}: corrupt checksum file") from None
    else:
        raise CheckpointError(f"{d}: incomplete checkpoint ({MANIFEST} missing); it was not fully written")
    for entry in entries:
        f = d / entry["path"]
        if not f.is_file():
            raise CheckpointError(f"{d}: corrupt checkpoint, {entry['path']} is missing")
        verify_file(f, entry, f"{d}: corrupt checkpoint, {entry['path']}", CheckpointError)
    return d


def check_integrity(directory: str | os.PathLike[str]) -> Path:
    """The one integrity policy for every reader (encode, Predictor, evaluate, merge, resume).

    - A manifest (or a legacy checksums.json) present: every listed file must match it.
    - A vembed training checkpoint (trainer_state.json) without one was not fully written (the
      manifest is written last): refused, by resume and by encode alike.
    - Any other model directory (an adapter saved by another tool) has nothing to check against;
      its safetensors headers are checked, so a truncated file is one line.
    Pickle weight files are refused everywhere.
    """
    d = Path(directory)
    if any((d / name).is_file() for name in (MANIFEST, CHECKSUMS, "trainer_state.json")):
        return verify_checkpoint(d)
    refuse_pickle(d)
    check_safetensors(d)
    return d


def check_safetensors(directory: Path) -> None:
    """A truncated or corrupt .safetensors file fails here with its path, not deep in a loader."""
    from safetensors import safe_open

    for f in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file ({first_line(e)})") from None


# --- the rules of stored copies (vembed.artifacts.storage) ----------------------------------------


def incomplete(uri: str) -> StorageError:
    return StorageError(
        f"{uri}: no {MANIFEST}, so the directory is incomplete (an upload crashed or is still running); refusing to read it"
    )


def check_replaceable(dest: Path) -> None:
    """Only an empty directory or an earlier complete one (with a manifest) may be replaced."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise StorageError(f"{dest}: exists and is not a directory; refusing to replace it")
    if dest.is_dir() and not (dest / MANIFEST).is_file() and any(dest.iterdir()):
        raise StorageError(f"{dest}: exists, is not empty and has no {MANIFEST}; refusing to replace it")


def cache_matches(dest: Path, manifest: dict[str, Any]) -> bool:
    """Files were verified when downloaded; a size check catches later truncation cheaply."""
    try:
        cached = json.loads((dest / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False
    files = manifest["files"]
    return cached == manifest and all((dest / e["path"]).is_file() and (dest / e["path"]).stat().st_size == e["size"] for e in files)
