"""What gets registered: the inference files of an adapter checkpoint and a merged model directory.

Resume state stays behind, pickle files are refused, and `content_key` names the content so a
retried registration finds the version it already created.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from vembed.artifacts.integrity import CHECKSUMS, MANIFEST, refuse_pickle, sha256_file, write_manifest
from vembed.artifacts.mlflow_store import ADAPTER_ARTIFACT, MERGED_ARTIFACT
from vembed.errors import RegistryError

# Files of a checkpoint that only matter for resuming (or describe the whole checkpoint), never for inference.
_LEFT_BEHIND = {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors", "rng.json"}
_LEFT_BEHIND |= {CHECKSUMS, MANIFEST}


def check_model_dir(path: str | os.PathLike[str] | None, kind: str) -> Path | None:
    """`path` as an adapter / merged model directory (None when not given), else a one-line error."""
    if path is None or str(path) == "":
        return None
    d, marker = Path(path), "adapter_config.json" if kind == "adapter" else "config.json"
    if not d.is_dir():
        raise RegistryError(f"{d}: {kind} directory not found")
    if not (d / marker).is_file() and not (kind == "merged" and (d / "modules.json").is_file()):
        raise RegistryError(f"{d}: not a {kind} model directory ({marker} missing)")
    return d


def content_key(adapter_dir: str | os.PathLike[str] | None, merged_dir: str | os.PathLike[str] | None) -> str:
    """A stable id of what gets registered: sha256 over the adapter's inference files (else the merged model)."""
    if not (root := adapter_dir or merged_dir):
        raise RegistryError("register: give an adapter directory, a merged model directory, or both")
    root, h = Path(root), hashlib.sha256()
    refuse_pickle(root, RegistryError)
    for path in sorted(root.rglob("*")):
        if path.is_file() and not (adapter_dir and path.name in _LEFT_BEHIND):
            h.update(f"{path.relative_to(root)}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # no second copy of multi-GB weights on the same filesystem
    except OSError:
        shutil.copy2(src, dst)
    return dst


def stage(tmp: Path, adapter_dir: Path | None, merged_dir: Path | None) -> dict[str, str]:
    """{merged, adapter: directory} under `tmp`, named so whatever the sources are called; the adapter
    with only its inference files and a fresh manifest of them."""
    artifacts = {}
    for name, src in ((MERGED_ARTIFACT, merged_dir), (ADAPTER_ARTIFACT, adapter_dir)):
        if src is not None:
            refuse_pickle(src, RegistryError)
            skip = shutil.ignore_patterns(*_LEFT_BEHIND) if name == ADAPTER_ARTIFACT else None
            artifacts[name] = str(shutil.copytree(src, tmp / name, ignore=skip, copy_function=_link_or_copy))
    if adapter_dir is not None:
        write_manifest(tmp / ADAPTER_ARTIFACT)
    return artifacts
