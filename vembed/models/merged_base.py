"""A model merged the guide's way (`merge_and_unload()` then `save_pretrained()`) has weights and a
config.json but no tokenizer, processor or embedder.json. Find the base model it came from, whose
tokenizer (or processor) and pooling apply unchanged.

Where the base is recorded, first match wins:
1. `config.json` `"_name_or_path"` (transformers 4 wrote it; transformers 5 does not, so a user may add it),
2. `config.json` `"vembed_base_model"` (the same, under a name nothing else overwrites),
3. the vembed run the directory sits in: `<dir>/../config.yaml` (the run's resolved config, written to
   `output_dir`), as in the guide's `output/merged_model` next to `output/checkpoint-N`. Its model,
   pooling, sequence length and query instruction are used.
A candidate counts only if its config.json has the same model_type and hidden size as the merged one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vembed.errors import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
)
CONFIG_KEYS = ("_name_or_path", "vembed_base_model")


def lacks_tokenizer(directory: Path) -> bool:
    return (directory / "config.json").is_file() and not any((directory / f).is_file() for f in TOKENIZER_FILES)


def find_base(directory: Path) -> tuple[str, dict[str, Any]]:
    """(base model name, embedder options from the run's config) for a guide-style merged directory."""
    merged = json.loads((directory / "config.json").read_text())
    candidates = [(str(merged[key]), {}, f"config.json {key}") for key in CONFIG_KEYS if merged.get(key)]
    run_config = directory.parent / "config.yaml"
    if run_config.is_file():
        run = yaml.safe_load(run_config.read_text()) or {}
        if isinstance(run, dict) and run.get("model_name"):
            options = {k: run[k] for k in ("pooling", "max_seq_length", "query_instruction") if k in run}
            candidates.append((str(run["model_name"]), options, str(run_config)))
    tried = []
    for name, options, source in candidates:
        if _same_architecture(name, merged):
            return name, options
        tried.append(f"{name} (from {source})")
    hint = f"; tried {', '.join(tried)}, whose architecture differs or which cannot be found" if tried else ""
    raise CheckpointError(
        f"{directory}: has model weights but no tokenizer, and no base model is recorded{hint}. "
        f'Add "_name_or_path": "<base model id or directory>" to {directory / "config.json"}, or save the '
        "base model's tokenizer (and image processor) into it, or merge with `vembed merge CHECKPOINT DIR`, "
        "which writes a complete model directory"
    )


def _same_architecture(name: str, merged: dict[str, Any]) -> bool:
    from transformers import AutoConfig

    from vembed.models.resolve import resolve_model_path

    try:
        base = AutoConfig.from_pretrained(resolve_model_path(name)).to_dict()
    except (OSError, ValueError):
        return False
    return base.get("model_type") == merged.get("model_type") and _hidden(base) == _hidden(merged)


def _hidden(config: dict[str, Any]) -> Any:
    text = config.get("text_config") or {}
    return config.get("hidden_size") or text.get("hidden_size") or config.get("projection_dim")
