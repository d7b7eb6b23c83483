"""Merge an adapter into its base model and export a standalone, sentence-transformers
compatible directory (text models) that `transformers.AutoModel` also loads.

Nothing already on disk is lost: the model is written into a temporary sibling of the output
directory (removed on any failure) and renamed into place. An existing output directory is
refused unless it is empty, or `overwrite=True` and it is an earlier merge output (recognised by
its MERGE_MARKER file), never a checkpoint, a run directory, the source, a folder above it or the
adapter's own base model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vembed.artifacts.atomic_dir import staged_dir
from vembed.artifacts.integrity import write_manifest
from vembed.errors import CheckpointError, StorageError
from vembed.inference.predictor import load_trained_embedder, read_spec
from vembed.models.base import Embedder
from vembed.models.pooling import ST_POOLING
from vembed.models.rotation import save_rotation
from vembed.models.text import format_query

MERGE_MARKER = "vembed_merged.json"  # written by merge_adapter only: "this directory is a merge output"
# Files that make a directory something merge must never replace.
_PROTECTED_FILES = ("trainer_state.json", "adapter_config.json", "training_log.txt", "vembed_config.yaml")


def check_merge_target(src: Path, out: Path, overwrite: bool) -> None:
    """Raise unless writing the merged model to `out` loses nothing merge did not create."""
    src_r, out_r = src.resolve(), out.resolve()
    if src_r.is_relative_to(out_r):
        what = "the source checkpoint" if src_r == out_r else f"a folder that contains the source checkpoint {src}"
        raise StorageError(f"{out}: is {what}; choose a new output directory")
    if out_r.is_relative_to(src_r):
        raise StorageError(f"{out}: is inside the source checkpoint {src}; choose a directory outside it")
    # An adapter only means something on top of its own base (a local directory); a merge output may be one.
    base = Path(spec.model_name) if (src / "adapter_config.json").is_file() and (spec := read_spec(src)) else None
    if base is not None and base.exists() and base.resolve().is_relative_to(out_r):
        raise StorageError(f"{out}: is the base model of {src}; replacing it would break that checkpoint; choose a new output directory")
    if Path.cwd().resolve().is_relative_to(out_r):
        raise StorageError(f"{out}: is the current directory (or above it); choose a new output directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise StorageError(f"{out}: exists and is not a directory; refusing to replace it")
    if not out.is_dir() or not any(out.iterdir()):
        return  # missing or empty: nothing to lose
    if not overwrite:
        raise StorageError(
            f"{out}: directory is not empty; refusing to replace it "
            "(--overwrite replaces only an earlier merge output)"
        )
    protected = [n for n in _PROTECTED_FILES if (out / n).exists()]
    runs = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]
    if protected or runs:
        raise StorageError(f"{out}: holds a checkpoint or training run ({(protected + runs)[0]}); refusing to replace it")
    if not (out / MERGE_MARKER).is_file():
        raise StorageError(f"{out}: not an earlier merge output (no {MERGE_MARKER}); refusing to replace it")


def merge_adapter(
    checkpoint_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """merge_and_unload, then save safetensors; written to a temp sibling and renamed when complete."""
    from peft import PeftModel

    src = Path(checkpoint_dir)
    if not src.exists():
        raise CheckpointError(f"{src}: does not exist")
    if not (src / "adapter_config.json").is_file() and not (src / "embedder.json").is_file():
        steps = [int(p.parent.name[11:]) for p in src.glob("checkpoint-*/embedder.json") if p.parent.name[11:].isdigit()]
        if steps:  # a training run's output_dir, as resume_from_checkpoint says it
            raise CheckpointError(f"{src}: is a training run; give one of its checkpoints, e.g. {src / f'checkpoint-{max(steps)}'}")
        raise CheckpointError(f"{src}: not an adapter checkpoint (adapter_config.json missing)")
    out = Path(output_dir)
    check_merge_target(src, out, overwrite)  # before the (slow) load, so a refusal is instant
    embedder = load_trained_embedder(src, device="cpu")
    if isinstance(embedder.backbone, PeftModel):
        embedder.backbone = embedder.backbone.merge_and_unload()
    # `may_replace` ran above already; the target was approved.
    with staged_dir(out, may_replace=lambda _: None) as tmp:
        if embedder.family == "text":
            _save_sentence_transformer(embedder, tmp)
        else:
            embedder.backbone.save_pretrained(tmp, safe_serialization=True)
            embedder.processor.save_pretrained(tmp)
        (tmp / "embedder.json").write_text(json.dumps(embedder.spec.to_dict(), indent=1))
        if embedder.rotation is not None:
            save_rotation(tmp, embedder.rotation)
        (tmp / MERGE_MARKER).write_text(json.dumps({"source": str(src.resolve())}, indent=1))
        write_manifest(tmp)
    return out


def _save_sentence_transformer(embedder: Embedder, directory: Path) -> None:
    """Save through SentenceTransformer so modules.json keeps Pooling and Normalize
    (a plain transformers save would drop both)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    weights = directory / "_weights"
    embedder.backbone.save_pretrained(weights, safe_serialization=True)
    embedder.tokenizer.save_pretrained(weights)
    spec = embedder.spec
    modules = [
        Transformer(str(weights), max_seq_length=spec.max_seq_length),
        Pooling(embedder.dim, pooling_mode=ST_POOLING[spec.pooling]),
    ]
    if embedder.rotation is not None:  # x @ R is a bias-free linear layer with weight R^T
        modules.append(Dense(embedder.dim, embedder.dim, bias=False, activation_function=None, init_weight=embedder.rotation.T.contiguous()))
    if spec.normalize:
        modules.append(Normalize())
    query_prompt = format_query("", spec.query_instruction, spec.pooling == "last_token")
    model = SentenceTransformer(modules=modules, prompts={"query": query_prompt} if query_prompt else None, device="cpu")
    model.save(str(directory))
    shutil.rmtree(weights)
