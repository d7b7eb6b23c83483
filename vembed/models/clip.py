"""CLIP as a dual encoder: texts through the text tower, images through the vision tower, both
through their projection heads into one shared space.

Each item is a text or an image (CLIP has no joint text+image input). A batch side may mix
both: the text rows and the image rows are embedded separately and scattered back into place.
Every collated tensor is row-aligned with the batch (rows of the other modality are zero
padding), so GradCache can slice a batch into chunks by rows.

LoRA: the guide's CLIP targets `q_proj`, `v_proj` and `out_proj` exist in both towers, so the
adapter covers the text and the vision encoder alike; the projection heads stay frozen unless
`modules_to_save: [text_projection, visual_projection]` trains them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoProcessor, CLIPModel, PretrainedConfig

from vembed.data.images import load_image
from vembed.errors import ConfigError, DataError
from vembed.models.base import Embedder, EmbedderSpec, Item, base_model, scatter_rows

TEXT, IMAGE = 0, 1


class CLIPEmbedder(Embedder):
    family = "clip"
    model_class = CLIPModel
    poolings = ("projection",)

    def __init__(self, backbone: torch.nn.Module, processor: Any, spec: EmbedderSpec) -> None:
        super().__init__(backbone, processor, spec)
        # CLIP's logit_scale is its own temperature; our loss has one, and a trainable parameter
        # that never gets a gradient would trip DDP's unused-parameter check.
        base_model(self.backbone).logit_scale.requires_grad_(False)

    @staticmethod
    def default_pooling(config: PretrainedConfig) -> str:
        return "projection"

    @classmethod
    def load_processor(cls, path: str) -> Any:
        return AutoProcessor.from_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str, spec: EmbedderSpec, dtype: torch.dtype | None = None) -> CLIPEmbedder:
        if spec.pooling != "projection":
            raise ConfigError(
                f"pooling: CLIP embeds through its projection heads; {spec.pooling!r} does not apply (use auto)"
            )
        return super().from_pretrained(path, spec, dtype)  # type: ignore[return-value]

    def featurize(self, item: Item, is_query: bool) -> dict[str, Any]:
        if item.text is not None and item.image is not None:
            raise DataError(
                "CLIP embeds a text or an image per item, not both; "
                "set retrieval_mode (t2i, i2t, i2i or t2t) to choose the fields"
            )
        if item.image is not None:
            return {"image": item.image}  # decoded in collate, i.e. in the DataLoader workers
        if item.text is None:
            raise DataError("CLIP got an item with neither text nor image")
        instruction = item.instruction or (self.spec.query_instruction if is_query else None)
        text = f"{instruction}{item.text}" if is_query and instruction else item.text
        enc = self.tokenizer(text, truncation=True, max_length=self._max_length())
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        modality = torch.tensor([IMAGE if "image" in f else TEXT for f in features])
        batch: dict[str, torch.Tensor] = {"modality": modality}
        text_rows = (modality == TEXT).nonzero().flatten()
        image_rows = (modality == IMAGE).nonzero().flatten()
        if len(text_rows):
            padded = self.tokenizer.pad(
                [{k: features[i][k] for k in ("input_ids", "attention_mask")} for i in text_rows.tolist()],
                padding=True,
                return_tensors="pt",
            )
            for key in ("input_ids", "attention_mask"):
                batch[key] = scatter_rows(padded[key], text_rows, len(features))
        if len(image_rows):
            images = [load_image(features[i]["image"]) for i in image_rows.tolist()]
            pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            batch["pixel_values"] = scatter_rows(pixels, image_rows, len(features))
        return batch

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        modality = inputs["modality"]
        clip = self.backbone  # a CLIPModel, or a PeftModel that forwards these methods to it
        text_rows = (modality == TEXT).nonzero().flatten()
        image_rows = (modality == IMAGE).nonzero().flatten()
        parts: list[torch.Tensor] = []  # each tower's embeddings in place, zeros in the other's rows
        # Each tower sees only its rows; transformers 5: the output's pooler_output is the projected embedding.
        if len(text_rows):
            ids, mask = inputs["input_ids"][text_rows], inputs["attention_mask"][text_rows]
            emb = clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
            parts.append(scatter_rows(emb, text_rows, len(modality)))
        if len(image_rows):
            emb = clip.get_image_features(pixel_values=inputs["pixel_values"][image_rows]).pooler_output
            parts.append(scatter_rows(emb, image_rows, len(modality)))
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    @property
    def dim(self) -> int:
        return int(self._config().projection_dim)

    def _max_length(self) -> int:
        return min(self.spec.max_seq_length, int(self._config().text_config.max_position_embeddings))
