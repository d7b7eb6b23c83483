"""The interface every model family implements.

An Embedder turns items (text and/or image) into pooled, *unnormalised* vectors.
Normalisation happens in the loss and in the Predictor, after any MRL truncation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class EmbedderSpec:
    """What is needed to rebuild an embedder around a (possibly merged) backbone."""

    family: str
    model_name: str
    pooling: str
    max_seq_length: int
    query_instruction: str | None = None
    normalize: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Item:
    text: str | None = None
    image: Any = None  # a path, an s3:// URI or a PIL image
    instruction: str | None = None


class Embedder(nn.Module):
    family: str = "base"
    model_class: Any = None  # the transformers class `from_pretrained` loads the backbone with
    poolings: tuple[str, ...] = ("mean", "cls", "last_token")  # the modes this family embeds with
    # [dim, dim] orthogonal, applied by `embed_items` (vembed.models.rotation); training never sees it.
    rotation: torch.Tensor | None = None

    def __init__(self, backbone: nn.Module, processor: Any, spec: EmbedderSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.processor = processor  # a tokenizer, or a processor holding one (and an image processor)
        self.spec = spec

    @classmethod
    def load_processor(cls, path: str) -> Any:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str, spec: EmbedderSpec, dtype: torch.dtype | None = None) -> Embedder:
        return cls(load_backbone(cls.model_class, path, dtype), cls.load_processor(path), spec)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    # Per-item work that can be done once, ahead of training (e.g. tokenisation).
    def featurize(self, item: Item, is_query: bool) -> dict[str, Any]:
        raise NotImplementedError

    # Stack featurized items into model inputs.
    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def unused_modules(self) -> dict[str, str]:
        """Backbone module paths whose output never reaches the embedding -> why.

        LoRA leaves them alone and `modules_to_save` refuses them: their parameters would get
        no gradient, which DDP and FSDP report as unused parameters."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _config(self) -> Any:
        """The transformers config of the backbone (under any PeftModel wrapper)."""
        return base_model(self.backbone).config

    @torch.no_grad()
    def embed_items(self, items: Sequence[Item], is_query: bool = False, batch_size: int = 32) -> torch.Tensor:
        """Inference helper: pooled vectors (unnormalised, float32, rotated when the model has a rotation)."""
        features = [self.featurize(it, is_query) for it in items]
        if not features:
            return torch.empty(0, self.dim)
        emb = embed_features(self, self.collate, features, batch_size, self.device)
        return emb if self.rotation is None else emb @ self.rotation


def embed_features(
    model: nn.Module, collate: Any, features: Sequence[dict[str, Any]], batch_size: int, device: torch.device,
    out_device: torch.device | str = "cpu",
) -> torch.Tensor:  # fmt: skip
    """Float32 embeddings of featurized items (on `out_device`), in their order. Batches are formed
    longest first, which keeps padding small; the order is restored afterwards."""
    order = sorted(range(len(features)), key=lambda i: -feature_length(features[i]))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in idx]).items()}
        out.append(model(**batch).float().to(out_device))
    emb = torch.cat(out)
    return emb[torch.tensor(order, device=emb.device).argsort()]  # row j of emb is item order[j]


def scatter_rows(values: torch.Tensor, rows: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    """`values` as `rows` of an n-row batch; the other rows are zeros. Multimodal families collate
    every input row-aligned with the batch, so that GradCache can slice a batch into chunks by rows."""
    if len(rows) == n:
        return values
    out = values.new_zeros((n, *values.shape[1:]))
    out[rows] = values
    return out


def base_model(model: nn.Module) -> nn.Module:
    """The model under a PeftModel wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_backbone(model_cls: Any, path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """`model_cls.from_pretrained(path)`, except on the ranks of an FSDP run with RAM-efficient
    loading other than each node's local rank 0: there the model is built from its config on the
    meta device (no weight is read or allocated), and FSDP fills it from rank 0 shard unit by shard
    unit (vembed.training.fsdp). transformers 5 no longer does this itself."""
    kwargs = {"dtype": dtype} if dtype else {}
    if not _loads_on_meta():
        return model_cls.from_pretrained(path, **kwargs)
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):  # AutoModel builds every family's class (CLIPModel for CLIP) from its config
        model = AutoModel.from_config(AutoConfig.from_pretrained(path), **kwargs)
    return model.eval()  # as from_pretrained leaves it


def _loads_on_meta() -> bool:
    import torch.distributed as dist

    enabled = all(
        os.environ.get(k, "").lower() in ("1", "true") for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")
    )
    return enabled and dist.is_available() and dist.is_initialized() and int(os.environ.get("LOCAL_RANK", "0")) != 0


def feature_length(feature: dict[str, Any]) -> int:
    """Tokens of a featurized item; 0 without input_ids (images)."""
    ids = feature.get("input_ids")
    return len(ids) if ids is not None else 0
