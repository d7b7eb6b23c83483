"""Merge an adapter into its base model and export a standalone, sentence-transformers
compatible directory (text models) that `transformers.AutoModel` also loads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vembed.errors import CheckpointError
from vembed.models.base import Embedder
from vembed.models.pooling import ST_POOLING
from vembed.models.text import format_query
from vembed.predictor import load_trained_embedder
from vembed.training.checkpoint import write_checksums


def merge_adapter(checkpoint_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> Path:
    """merge_and_unload, then save safetensors; written to a temp dir and renamed when complete."""
    from peft import PeftModel

    src = Path(checkpoint_dir)
    if not (src / "adapter_config.json").is_file() and not (src / "embedder.json").is_file():
        raise CheckpointError(f"{src}: not an adapter checkpoint (adapter_config.json missing)")
    embedder = load_trained_embedder(src, device="cpu")
    if isinstance(embedder.backbone, PeftModel):
        embedder.backbone = embedder.backbone.merge_and_unload()
    out = Path(output_dir)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if embedder.family == "text":
        _save_sentence_transformer(embedder, tmp)
    else:
        embedder.backbone.save_pretrained(tmp, safe_serialization=True)
        for attr in ("processor", "tokenizer"):
            if getattr(embedder, attr, None) is not None:
                getattr(embedder, attr).save_pretrained(tmp)
                break
    (tmp / "embedder.json").write_text(json.dumps(embedder.spec.to_dict(), indent=1))
    write_checksums(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _save_sentence_transformer(embedder: Embedder, directory: Path) -> None:
    """Save through SentenceTransformer so modules.json keeps Pooling and Normalize
    (a plain transformers save would drop both)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    weights = directory / "_weights"
    embedder.backbone.save_pretrained(weights, safe_serialization=True)
    embedder.tokenizer.save_pretrained(weights)
    spec = embedder.spec
    modules = [
        Transformer(str(weights), max_seq_length=spec.max_seq_length),
        Pooling(embedder.dim, pooling_mode=ST_POOLING[spec.pooling]),
    ]
    if spec.normalize:
        modules.append(Normalize())
    prompts = {}
    if spec.query_instruction:
        prompts["query"] = format_query("", spec.query_instruction, spec.pooling == "last_token")
    model = SentenceTransformer(modules=modules, prompts=prompts or None, device="cpu")
    model.save(str(directory))
    shutil.rmtree(weights)
