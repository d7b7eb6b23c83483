"""What gets registered: the inference files of an adapter checkpoint and a merged model directory.

Resume state (optimizer, scheduler, RNG) stays behind, pickle files are refused, and `content_key`
names the content so a retried registration finds the version it already created.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from vembed.errors import RegistryError
from vembed.integrity import CHECKSUMS, MANIFEST, refuse_pickle, sha256_file, write_manifest

# Files of a training checkpoint that only matter for resuming, never for inference.
_RESUME_ONLY = {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors", "rng.json"}


def check_model_dir(path: str | os.PathLike[str] | None, kind: str) -> Path | None:
    if path is None or str(path) == "":
        return None
    d = Path(path)
    marker = "adapter_config.json" if kind == "adapter" else "config.json"
    if not d.is_dir():
        raise RegistryError(f"{d}: {kind} directory not found")
    if not (d / marker).is_file() and not (kind == "merged" and (d / "modules.json").is_file()):
        raise RegistryError(f"{d}: not a {kind} model directory ({marker} missing)")
    return d


def inference_files(adapter_dir: Path) -> list[Path]:
    """The files of an adapter checkpoint a Predictor needs; resume state and the manifest are left out."""
    refuse_pickle(adapter_dir, RegistryError)
    return sorted(
        p
        for p in adapter_dir.iterdir()
        if p.is_file() and p.name not in _RESUME_ONLY and p.name not in (CHECKSUMS, MANIFEST)
    )


def content_key(adapter_dir: str | os.PathLike[str] | None, merged_dir: str | os.PathLike[str] | None) -> str:
    """A stable id of what gets registered: sha256 over the adapter's inference files (else the merged model)."""
    h = hashlib.sha256()
    if adapter_dir:
        files = [(p.name, p) for p in inference_files(Path(adapter_dir))]
    elif merged_dir:
        root = Path(merged_dir)
        files = [(str(p.relative_to(root)), p) for p in sorted(root.rglob("*")) if p.is_file()]
    else:
        raise RegistryError("register: give an adapter directory, a merged model directory, or both")
    for rel, path in files:
        h.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # no second copy of multi-GB weights on the same filesystem
    except OSError:
        shutil.copy2(src, dst)
    return dst


def stage_adapter(adapter_dir: Path, dest: Path) -> Path:
    """The adapter's inference files under `dest`, with a fresh manifest of just those files."""
    dest.mkdir(parents=True)
    for src in inference_files(adapter_dir):
        _link_or_copy(str(src), str(dest / src.name))
    write_manifest(dest)
    return dest


def stage_merged(merged_dir: Path, dest: Path) -> Path:
    """The merged model under `dest`, so the logged artifact is named `merged` whatever the source dir is."""
    refuse_pickle(merged_dir, RegistryError)
    shutil.copytree(merged_dir, dest, copy_function=_link_or_copy)
    return dest
