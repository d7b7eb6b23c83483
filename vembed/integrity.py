"""The one hashing helper and the one pickle refusal, shared by checkpoints, storage and the registry.

No torch here: the registry and storage import it without pulling the training stack.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vembed.errors import CheckpointError, VembedError

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
    found = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if found:
        raise error(f"{d}: refusing pickle weight files {found[:5]}; vembed loads safetensors only")


def write_checksums(directory: str | os.PathLike[str]) -> None:
    """`checksums.json`: sha256 of every file under `directory` (itself excluded); write it last."""
    d = Path(directory)
    sums = {
        str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file() and p.name != CHECKSUMS
    }
    (d / CHECKSUMS).write_text(json.dumps(sums, indent=1))
