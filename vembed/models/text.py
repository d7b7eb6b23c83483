"""Text encoders: BERT/MiniLM-style (mean or cls pooling) and decoder embedders
such as Qwen3-Embedding (last-token pooling)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer, PretrainedConfig

from vembed.errors import DataError
from vembed.models.base import Embedder, EmbedderSpec, Item, base_model
from vembed.models.pooling import pool

# Families whose embedding is the last token's state.
DECODER_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"}


def format_query(text: str, instruction: str | None, decoder: bool) -> str:
    if not instruction:
        return text
    # Qwen3-Embedding's documented prompt; encoder models take a plain prefix.
    return f"Instruct: {instruction}\nQuery: {text}" if decoder else f"{instruction}{text}"


class TextEmbedder(Embedder):
    family = "text"
    model_class = AutoModel

    def __init__(self, backbone: torch.nn.Module, tokenizer: Any, spec: EmbedderSpec) -> None:
        super().__init__(backbone, tokenizer, spec)
        self._decoder = spec.pooling == "last_token"

    @staticmethod
    def default_pooling(config: PretrainedConfig) -> str:
        return "last_token" if config.model_type in DECODER_TYPES or getattr(config, "is_decoder", False) else "mean"

    @classmethod
    def load_processor(cls, path: str) -> Any:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    @property
    def tokenizer(self) -> Any:
        return self.processor  # a text model's processor is its tokenizer

    def featurize(self, item: Item, is_query: bool) -> dict[str, Any]:
        if item.text is None:  # an image record (e.g. positive_image) reached a text model
            raise DataError(
                f"{self.spec.model_name} is a text model and cannot embed image {item.image!r}; use a clip, "
                "qwen3_vl or llava model, or retrieval_mode t2t with records that have text fields"
            )
        instruction = item.instruction or (self.spec.query_instruction if is_query else None)
        text = format_query(item.text, instruction, self._decoder) if is_query else item.text
        enc = self.tokenizer(text, truncation=True, max_length=self.spec.max_seq_length)
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(list(features), padding=True, return_tensors="pt"))

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.backbone(**inputs)
        return pool(out.last_hidden_state, inputs["attention_mask"], self.spec.pooling)

    @property
    def dim(self) -> int:
        return int(self._config().hidden_size)

    def unused_modules(self) -> dict[str, str]:
        # BERT-style checkpoints carry a pooler (dense + tanh over [CLS]); every pooling mode here
        # reads last_hidden_state instead, so the pooler is computed and then dropped.
        if getattr(base_model(self.backbone), "pooler", None) is None:
            return {}
        return {"pooler": f"{self.spec.pooling} pooling reads last_hidden_state, not the pooler output"}
