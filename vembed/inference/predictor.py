"""Predictor: embeddings from an adapter checkpoint, a merged or plain model,
an s3:// URI or a `models:/NAME@alias` registry URI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from vembed.artifacts.integrity import check_integrity
from vembed.errors import CheckpointError, ConfigError, VembedError, first_line
from vembed.models import (
    FAMILY_CLASSES,
    Embedder,
    EmbedderSpec,
    Item,
    family_class,
    load_embedder,
    looks_like_hub_id,
)
from vembed.models.merged_base import find_base, lacks_tokenizer
from vembed.models.rotation import load_rotation


def materialize(model_path: str) -> Path:
    """A local directory for any supported model location."""
    if model_path.startswith("s3://"):
        from vembed.artifacts.storage import materialize as fetch

        return Path(fetch(model_path))
    if model_path.startswith("models:/"):
        from vembed.artifacts.mlflow_store import download_model

        return Path(download_model(model_path))
    return Path(model_path)


def read_spec(directory: Path) -> EmbedderSpec | None:
    """The pooling/family spec in a model directory's embedder.json (None without one); a bad one is one
    CheckpointError naming the file."""
    f = directory / "embedder.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())  # keys this version does not know (older checkpoints' `extra`) are ignored
        spec = EmbedderSpec(**{k.name: data[k.name] for k in fields(EmbedderSpec) if k.name in data})
    except (ValueError, TypeError) as e:  # not JSON, not an object, or a required key missing
        raise CheckpointError(f"{f}: invalid ({first_line(e).removeprefix('EmbedderSpec.__init__() ')})") from None
    # Checked here: else an unknown family is a KeyError deep in loading, and an unknown pooling passes
    # `vembed serve`'s /health (the readiness probe) and then fails every request with HTTP 500.
    if spec.family not in FAMILY_CLASSES:
        raise CheckpointError(f"{f}: family {spec.family!r} is not one of {sorted(FAMILY_CLASSES)}")
    if spec.pooling not in (allowed := family_class(spec.family).poolings):
        raise CheckpointError(f"{f}: pooling {spec.pooling!r} is not one of {list(allowed)} for {spec.family}")
    return spec


def load_trained_embedder(directory: str | Path, device: str | torch.device | None = None) -> Embedder:
    d = Path(directory)
    if not d.is_dir():
        name = str(directory)
        if d.exists():
            raise CheckpointError(f"{name}: is a file, expected a model directory")
        # A hub id or a name the resolver knows (e.g. the packaged MiniLM); Predictor refused other missing names.
        try:
            return _to_device(load_embedder(name), device)
        except (VembedError, OSError, ValueError) as e:
            raise CheckpointError(f"{name}: no such local directory, and not loadable as a hub model ({first_line(e)})") from None
    check_integrity(d)
    spec = read_spec(d)
    if (d / "adapter_config.json").is_file():
        from peft import PeftModel

        try:  # the base is a path or hub id recorded at training time: name the checkpoint that records it
            if spec is None:
                base = json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
                if not base:
                    raise CheckpointError(f"{d}/adapter_config.json: no base_model_name_or_path")
                embedder = load_embedder(base)
            else:
                embedder = load_embedder(spec.model_name, spec.pooling, spec.max_seq_length, spec.query_instruction)
                embedder.spec = spec
        except ConfigError as e:
            raise CheckpointError(f"{d}: cannot load the adapter's base model ({e})") from None
        if not (d / "adapter_model.safetensors").is_file():
            raise CheckpointError(f"{d}: adapter_model.safetensors missing")
        embedder.backbone = PeftModel.from_pretrained(embedder.backbone, str(d))
    elif spec is not None:
        # A merged model or a full fine-tune: the weights are here, the spec says how to pool.
        embedder = family_class(spec.family).from_pretrained(str(d), spec)
    elif lacks_tokenizer(d):
        embedder = _load_guide_merged(d)
    else:
        embedder = load_embedder(str(d))
    embedder.rotation = load_rotation(d)
    return _to_device(embedder, device)


def _load_guide_merged(d: Path) -> Embedder:
    """Weights from `d`, tokenizer/processor and pooling from the base model it was merged from."""
    base, options = find_base(d)
    embedder = load_embedder(base, options.get("pooling", "auto"), options.get("max_seq_length"),
                             options.get("query_instruction"))
    embedder.backbone = type(embedder.backbone).from_pretrained(str(d))
    return embedder


def check_device(device: str | torch.device | None) -> None:
    """A device this machine has (None: the default), checked before a slow model load; one line, not torch's
    traceback."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: {str(device)!r} is not a torch device (cpu, cuda, cuda:1, mps ...)") from None
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device: {str(device)!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")


def _to_device(embedder: Embedder, device: str | torch.device | None) -> Embedder:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return embedder.to(device).eval()


class Predictor:
    """`encode_text` / `encode_image` returning L2-normalised float32 numpy arrays."""

    def __init__(self, model_path: str | Path, device: str | None = None) -> None:
        self.model_path = str(model_path)
        check_device(device)
        # Checked on the name as given: `./no-model` is a missing path, though Path() makes it `no-model`.
        if "://" not in self.model_path and not self.model_path.startswith("models:/"):
            if not Path(self.model_path).exists() and not looks_like_hub_id(self.model_path):
                raise CheckpointError(f"{self.model_path}: does not exist")
        elif "://" in self.model_path and not self.model_path.startswith("s3://"):  # Path() would make gs:// gs:/
            raise CheckpointError(
                f"{self.model_path}: unsupported location; give a model directory, an s3:// URI or models:/NAME@alias"
            )
        local = materialize(self.model_path)
        try:
            self.embedder = load_trained_embedder(local, device)
        except (OSError, ValueError, SafetensorError) as e:
            raise VembedError(f"{model_path}: cannot load model: {first_line(e)}") from None

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def spec(self) -> EmbedderSpec:
        return self.embedder.spec

    def _finish(self, emb: torch.Tensor, dim: int | None) -> np.ndarray:
        if dim is not None:
            if not 0 < dim <= emb.shape[-1]:
                raise VembedError(f"dim={dim} must be between 1 and the model's dim {emb.shape[-1]}")
            emb = emb[:, :dim]
        if self.spec.normalize or dim is not None:
            emb = F.normalize(emb, dim=-1)
        return emb.numpy().astype(np.float32, copy=False)

    def encode_items(
        self, items: Sequence[Item], batch_size: int = 32, dim: int | None = None, is_query: bool = False
    ) -> np.ndarray:
        return self._finish(self.embedder.embed_items(items, is_query=is_query, batch_size=batch_size), dim)

    def encode_text(
        self, texts: str | Sequence[str], batch_size: int = 32, dim: int | None = None, is_query: bool = False
    ) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.encode_items([Item(text=t) for t in texts], batch_size, dim, is_query)

    def encode_image(
        self, images: Any, batch_size: int = 32, dim: int | None = None, is_query: bool = False
    ) -> np.ndarray:
        images = list(images) if isinstance(images, list | tuple) else [images]
        if self.spec.family == "text":
            raise VembedError(f"{self.model_path}: a text model cannot encode images")
        return self.encode_items([Item(image=i) for i in images], batch_size, dim, is_query)
