"""Qwen3-VL-Embedding: one decoder embeds text, images or both, pooled at the last token.

Prompt (Qwen3-VL-Embedding's format): the instruction in the system turn (default
"Represent the user's input."; queries use `query_instruction` or the record's
`instruction`), the image and/or text in the user turn, then the assistant header from the
chat template's generation prompt. The embedding is the last token's final hidden state, so the
dim is the language model's hidden size: 2048 for the 2B model and 4096 for the 8B.

Inputs are built here from the tokenizer, the image processor and the chat template, as
Qwen3VLProcessor does for images: each `<|image_pad|>` becomes one token per merged patch group,
and `mm_token_type_ids` (1 at image tokens) plus one `image_grid_thw` row per image go to the
model for its multimodal RoPE. (Qwen3VLProcessor itself cannot be built without torchvision,
which its video processor needs.) Pixel patches are stored row-aligned, padded to
[batch, max_patches, patch_dim], so GradCache can slice a batch by rows.

LoRA: the default targets `q_proj` and `v_proj` match only the language model's attention
(all decoder layers). The vision tower's attention uses one fused `qkv` Linear (and `proj`
for its output), and its patch merger uses `linear_fc1`/`linear_fc2`: by default the vision
tower is frozen and unadapted. Add `qkv` to `lora_target_modules` to adapt it too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoImageProcessor, AutoTokenizer

from vembed.data.images import load_image
from vembed.models.base import EmbedderSpec, scatter_rows
from vembed.models.chat_prompt import ChatEmbedder
from vembed.models.pooling import pool

IMAGE_PAD = "<|image_pad|>"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", IMAGE_PAD, "<|video_pad|>")
# Qwen3-VL-Embedding's reference preprocessing bounds images to 1800 merged 32x32 patches;
# a processor config that allows more (the base Qwen3-VL allows 16M pixels) is capped to it.
MAX_PIXELS = 1800 * 32 * 32

# Used when a model directory ships no chat template: Qwen's ChatML with vision markers.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class VLProcessor:
    """The tokenizer (with its chat template) and the image processor, saved and loaded together."""

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, path: str) -> VLProcessor:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:
            # Qwen3-VL repositories keep the template in the processor's chat_template.json.
            f = Path(path) / "chat_template.json"
            saved = json.loads(f.read_text()).get("chat_template") if f.is_file() else None
            tokenizer.chat_template = saved or DEFAULT_CHAT_TEMPLATE
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|endoftext|>"
        # Right padding: a text-only batch then gets the positions 0..n-1 it would get alone.
        tokenizer.padding_side = "right"
        image_processor = AutoImageProcessor.from_pretrained(path)
        size = image_processor.size
        if getattr(size, "longest_edge", None) and size.longest_edge > MAX_PIXELS:
            image_processor.size = {"shortest_edge": size.shortest_edge, "longest_edge": MAX_PIXELS}
        return cls(tokenizer, image_processor)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


class QwenVLEmbedder(ChatEmbedder):
    family = "qwen3_vl"
    display_name = "Qwen3-VL"
    vision_tokens = VISION_TOKENS

    def __init__(self, backbone: torch.nn.Module, processor: VLProcessor, spec: EmbedderSpec) -> None:
        super().__init__(backbone, processor, spec)
        self._image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self._merge = int(processor.image_processor.merge_size)

    @classmethod
    def load_processor(cls, path: str) -> VLProcessor:
        return VLProcessor.from_pretrained(path)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        image_rows = [i for i, f in enumerate(features) if "image" in f]
        prompts = [f["prompt"] for f in features]
        if image_rows:
            images = [load_image(features[i]["image"]) for i in image_rows]
            vision = self.processor.image_processor(images=images, return_tensors="pt")
            grids, patches = vision["image_grid_thw"], vision["pixel_values"]
            counts = grids.prod(-1).tolist()
            # One placeholder becomes one token per merged group of patches.
            for row, n in zip(image_rows, counts, strict=True):
                prompts[row] = prompts[row].replace(IMAGE_PAD, IMAGE_PAD * (n // self._merge**2), 1)
            # Each image's patches padded to the most any image has: [rows, max_patches, patch_dim].
            pixel_rows = scatter_rows(pad_sequence(list(patches.split(counts)), batch_first=True), image_rows, len(features))
            grid_rows = scatter_rows(grids, image_rows, len(features))
        enc = self.tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
        batch = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "mm_token_type_ids": (enc["input_ids"] == self._image_token_id).int(),
        }
        if image_rows:
            batch.update(pixel_values=pixel_rows, image_grid_thw=grid_rows)
        return batch

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {k: inputs[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if "image_grid_thw" in inputs:
            grids = inputs["image_grid_thw"]
            counts = grids.prod(-1).tolist()
            rows = [i for i, n in enumerate(counts) if n > 0]
            if rows:  # a GradCache chunk of a mixed batch may hold no image rows
                kwargs["pixel_values"] = torch.cat([inputs["pixel_values"][i, : counts[i]] for i in rows])
                kwargs["image_grid_thw"] = grids[rows]
        out = self.backbone(**kwargs, use_cache=False)
        return pool(out.last_hidden_state, inputs["attention_mask"], self.spec.pooling)
