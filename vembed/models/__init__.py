"""Model families behind one Embedder interface: text, clip, qwen3_vl, llava."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, PretrainedConfig

from vembed.artifacts.integrity import check_safetensors, refuse_pickle
from vembed.errors import ConfigError, first_line
from vembed.models.base import Embedder, EmbedderSpec, Item
from vembed.models.resolve import read_sentence_transformers_pooling, resolve_model_path

__all__ = ["Embedder", "EmbedderSpec", "Item", "detect_family", "load_embedder", "resolve_dtype"]

# family -> "module:Class"; imported lazily so text-only use never loads vision code.
FAMILY_CLASSES = {
    "text": "vembed.models.text:TextEmbedder",
    "clip": "vembed.models.clip:CLIPEmbedder",
    "qwen3_vl": "vembed.models.qwen_vl:QwenVLEmbedder",
    "llava": "vembed.models.llava:LlavaEmbedder",
}
MULTIMODAL_TYPES = {"clip": "clip", "qwen3_vl": "qwen3_vl", "qwen2_vl": "qwen3_vl", "qwen2_5_vl": "qwen3_vl",
                    "llava": "llava"}
SUPPORTED = (
    "text (encoders such as BERT/MiniLM and decoder embedders such as Qwen3-Embedding), "
    "clip, qwen3_vl (also qwen2_vl, qwen2_5_vl) and llava (LLaVA-1.5 style)"
)
# Sub-configs that mark a model as more than one text stack (vision, audio, encoder-decoder).
_NON_TEXT_PARTS = ("vision_config", "audio_config", "encoder_config", "decoder_config", "vision_tower")


def detect_family(config: PretrainedConfig) -> str:
    """The family for a model config. A model that is not a plain text stack and not one of the
    multimodal families is refused: run as text it would silently ignore its images."""
    model_type = config.model_type
    if model_type in MULTIMODAL_TYPES:
        return MULTIMODAL_TYPES[model_type]
    parts = [p for p in _NON_TEXT_PARTS if getattr(config, p, None) is not None]
    if parts or getattr(config, "is_encoder_decoder", False):
        what = ", ".join(parts) if parts else "is_encoder_decoder"
        arch = ", ".join(getattr(config, "architectures", None) or []) or model_type
        raise ConfigError(
            f"model_name: {arch} (model_type {model_type!r}, has {what}) is not a supported model family; "
            f"supported: {SUPPORTED}"
        )
    return "text"


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 on a CUDA device that supports it and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def family_class(family: str) -> type[Embedder]:
    module, cls = FAMILY_CLASSES[family].split(":")
    return getattr(importlib.import_module(module), cls)


# `org/name` or `name`: what a hub id looks like. A missing path of any other shape is simply missing.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def load_embedder(
    model_name: str,
    pooling: str = "auto",
    max_seq_length: int | None = None,
    query_instruction: str | None = None,
    dtype: torch.dtype | None = None,
) -> Embedder:
    """Load a base model of any supported family, offline.

    `max_seq_length` None: the model's own (sentence-transformers config), else 128."""
    local = Path(model_name).expanduser()
    if not local.exists() and not looks_like_hub_id(model_name):
        raise ConfigError(f"model_name: {model_name} does not exist")
    path = resolve_model_path(model_name)
    if Path(path).is_dir():  # transformers would load a pytorch_model.bin; vembed loads safetensors only
        refuse_pickle(path, ConfigError)
        check_safetensors(Path(path))  # a cut-off weights file is named, as Predictor names it
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_name: cannot load {model_name!r} (offline, no local copy?): {first_line(e)}") from None
    family = detect_family(config)
    cls = family_class(family)
    # A sentence-transformers directory says how it pools and whether it normalises.
    st_pooling, normalize, st_max_length = read_sentence_transformers_pooling(path)
    if pooling == "auto":
        pooling = st_pooling or cls.default_pooling(config)
    max_seq_length = max_seq_length or st_max_length or 128
    positions = getattr(config, "max_position_embeddings", None)  # CLIP clamps to its text tower's own
    if family == "text" and positions and max_seq_length > positions:  # else a long text crashes the forward pass
        raise ConfigError(
            f"max_seq_length: {max_seq_length} exceeds the {positions} positions of model {model_name} "
            "(max_position_embeddings); lower max_seq_length"
        )
    # Hub ids stay ids (resolved again at load time); local directories become absolute.
    stored_name = str(local.resolve()) if local.is_dir() else model_name
    spec = EmbedderSpec(
        family=family,
        model_name=stored_name,
        pooling=pooling,
        max_seq_length=max_seq_length,
        query_instruction=query_instruction,
        normalize=normalize,
    )
    try:
        return cls.from_pretrained(path, spec, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as e:  # a cut-off tokenizer.json or weights file, as Predictor says it
        raise ConfigError(f"model_name: cannot load {model_name!r}: {first_line(e)}") from None
