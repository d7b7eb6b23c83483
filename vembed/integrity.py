"""Integrity of model directories: the one hashing helper, the one pickle refusal, checksums.json
written last and verified on read (checkpoints, exported and registered models).

No torch here: the registry and storage import it without pulling the training stack.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError

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


def verify_checkpoint(directory: str | os.PathLike[str]) -> Path:
    """Raise CheckpointError unless every file listed in checksums.json is intact."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    refuse_pickle(d)
    sums_file = d / CHECKSUMS
    if not sums_file.is_file():
        raise CheckpointError(f"{d}: incomplete checkpoint ({CHECKSUMS} missing); it was not fully written")
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{sums_file}: corrupt checksum file") from None
    for name, digest in sums.items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{d}: corrupt checkpoint, {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{d}: corrupt checkpoint, {name} does not match its checksum")
    return d


def check_integrity(directory: str | os.PathLike[str]) -> Path:
    """The one integrity policy for every reader (encode, Predictor, evaluate, merge, resume).

    - checksums.json present: every listed file must match it.
    - A vembed training checkpoint (trainer_state.json) without checksums.json was not fully
      written (checksums.json is written last): refused, by resume and by encode alike.
    - Any other model directory (a merged model, an adapter saved by another tool) has no
      checksums to check; its safetensors headers are checked, so a truncated file is one line.
    Pickle weight files are refused everywhere.
    """
    d = Path(directory)
    if (d / CHECKSUMS).is_file() or (d / "trainer_state.json").is_file():
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
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file ({reason})") from None
