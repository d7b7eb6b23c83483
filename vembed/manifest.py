"""The manifest of a stored directory: the size and sha256 of every file, written last, checked on read."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from vembed.errors import StorageError
from vembed.integrity import sha256_file

MANIFEST = "manifest.json"


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


def build_manifest(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Size and sha256 of every file under `local_dir` (a top-level manifest.json excluded)."""
    root = Path(local_dir)
    files = [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    ]
    return {"version": 1, "files": files}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        for entry in manifest["files"]:
            rel, _, _ = entry["path"], int(entry["size"]), str(entry["sha256"])
            # A manifest must never make us write outside the target directory.
            if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
                raise ValueError(f"unsafe path {rel!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{where}: invalid {MANIFEST} ({e})") from None
    return manifest


def verify_file(path: Path, entry: dict[str, Any], where: str) -> None:
    if (size := path.stat().st_size) != entry["size"]:
        raise StorageError(f"{where}: size {size} does not match manifest ({entry['size']}); the copy is corrupt")
    if sha256_file(path) != entry["sha256"]:
        raise StorageError(f"{where}: sha256 does not match manifest; the copy is corrupt")


def write_manifest_last(local_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = local_dir / f".{MANIFEST}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(manifest_bytes(manifest))
    os.replace(tmp, local_dir / MANIFEST)


def cache_matches(dest: Path, manifest: dict[str, Any]) -> bool:
    """Files were verified when downloaded; a size check catches later truncation cheaply."""
    try:
        cached = json.loads((dest / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False
    files = manifest["files"]
    return cached == manifest and all((dest / e["path"]).is_file() and (dest / e["path"]).stat().st_size == e["size"] for e in files)
