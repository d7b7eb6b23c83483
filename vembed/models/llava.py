"""LLaVA (LlavaForConditionalGeneration checkpoints, e.g. llava-hf/llava-1.5-7b-hf) as an embedder:
one decoder embeds text, an image or both, pooled at the last token.

Prompt: the instruction (queries: the record's `instruction` or `query_instruction`; otherwise
"Represent the user's input.") goes in the system turn, the image placeholder and the text in the
user turn, then the generation prompt; rendered with the model's chat template (llava-hf ships
one) or, without one, LLaVA-1.5's `USER: <image>\\n... ASSISTANT:` format. The embedding is the last
token's final hidden state (AutoModel loads the checkpoint as LlavaModel, without the LM head), so
the dim is the language model's hidden size.

Images go through the model's LlavaProcessor: its image processor resizes every image to the same
size and it expands each `<image>` into one token per vision feature. Pixel rows are row-aligned
with the batch (zeros for text-only rows), so GradCache can slice a batch by rows.

The vision tower's hidden state at `vision_feature_layer` (-2 in LLaVA-1.5) feeds the projector, so
the layers after it and the tower's post-layernorm never reach the embedding: LoRA leaves them
alone (the guide's q_proj/v_proj would otherwise match them) and modules_to_save refuses them.
LLaVA-NeXT / OneVision (tiled images) are not this family and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoProcessor

from vembed.data.images import load_image
from vembed.models.base import EmbedderSpec, base_model, scatter_rows
from vembed.models.chat_prompt import ChatEmbedder
from vembed.models.pooling import pool

# LLaVA-1.5's conversation format, used when the checkpoint ships no chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- for part in message.content %}{{- part.text + '\\n' }}{%- endfor %}"
    "{%- else %}{{- message.role.upper() + ': ' }}"
    "{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<image>\\n' }}{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{{- ' ' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)


class LlavaEmbedder(ChatEmbedder):
    family = "llava"
    display_name = "LLaVA"

    def __init__(self, backbone: torch.nn.Module, processor: Any, spec: EmbedderSpec) -> None:
        super().__init__(backbone, processor, spec)
        if not getattr(processor, "chat_template", None):
            processor.chat_template = DEFAULT_CHAT_TEMPLATE
        tok = processor.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        tok.padding_side = "right"
        self.vision_tokens = (processor.image_token,)

    @classmethod
    def load_processor(cls, path: str) -> Any:
        return AutoProcessor.from_pretrained(path)

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.processor.apply_chat_template(conversation, **kwargs)  # the processor holds the template

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        image_rows = [i for i, f in enumerate(features) if "image" in f]
        images = [load_image(features[i]["image"]) for i in image_rows] or None
        # The processor expands each <image> into the tower's feature count, in row order.
        enc = self.processor(
            text=[f["prompt"] for f in features], images=images, padding=True, return_tensors="pt"
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if image_rows:
            batch["pixel_values"] = scatter_rows(enc["pixel_values"], image_rows, len(features))
            batch["has_image"] = torch.tensor(["image" in f for f in features])
        return batch

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if "has_image" in inputs and bool(inputs["has_image"].any()):
            # a GradCache chunk of a mixed batch may hold no image rows
            kwargs["pixel_values"] = inputs["pixel_values"][inputs["has_image"]]
        out = self.backbone(**kwargs, use_cache=False)
        return pool(out.last_hidden_state, inputs["attention_mask"], self.spec.pooling)

    def unused_modules(self) -> dict[str, str]:
        config = self._config()
        layer = config.vision_feature_layer
        deepest = max(layer) if isinstance(layer, list) else layer
        tower = base_model(self.backbone).vision_tower
        prefix = "vision_tower."
        if hasattr(tower, "vision_model"):
            prefix, tower = "vision_tower.vision_model.", tower.vision_model
        encoder_layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if encoder_layers is None:
            return {}
        n = len(encoder_layers)
        # hidden_states has n + 1 entries (the embeddings first): index k is the output of layer k - 1.
        used_up_to = (deepest % (n + 1)) - 1
        why = f"the projector reads the vision tower's hidden state at vision_feature_layer={layer}"
        unused = {f"{prefix}encoder.layers.{i}": why for i in range(used_up_to + 1, n)}
        for name in ("post_layernorm", "head"):
            if hasattr(tower, name):
                unused[prefix + name] = why
        return unused
