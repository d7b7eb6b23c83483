"""The chat prompt that the vision-language embedders (Qwen3-VL, LLaVA) encode: the instruction in the
system turn, then the user's image and text; the embedding is the last token's state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vembed.errors import DataError
from vembed.models.base import Item

DEFAULT_INSTRUCTION = "Represent the user's input."


def chat_features(
    item: Item,
    instruction: str | None,
    truncate: Callable[[str], str],
    apply_chat_template: Callable[..., str],
    family: str,
) -> dict[str, Any]:
    """{"prompt": ...} plus "image" when the item has one; the image is decoded later, in collate
    (DataLoader workers), where its size sets the number of image tokens."""
    if item.text is None and item.image is None:
        raise DataError(f"{family} got an item with neither text nor image")
    content: list[dict[str, str]] = []
    if item.image is not None:
        content.append({"type": "image"})
    if item.text is not None:
        content.append({"type": "text", "text": truncate(item.text)})
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": instruction or DEFAULT_INSTRUCTION}]},
        {"role": "user", "content": content},
    ]
    prompt = apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return {"prompt": prompt} if item.image is None else {"prompt": prompt, "image": item.image}
