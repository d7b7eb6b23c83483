"""Pipeline step: merge a LoRA adapter into its base model (safetensors, sentence-transformers layout)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def merge(adapter_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Returns {"merged_dir", "files"}: the standalone model directory and what it holds."""
    from vembed.inference.export import merge_adapter

    merged = Path(merge_adapter(adapter_dir, output_dir))
    files = sorted(str(p.relative_to(merged)) for p in merged.rglob("*") if p.is_file())
    return {"merged_dir": str(merged), "files": files}
