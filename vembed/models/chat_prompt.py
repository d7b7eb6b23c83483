"""The chat prompt that the vision-language embedders (Qwen3-VL, LLaVA) encode: the instruction in the
system turn, then the user's image and text; the embedding is the last token's state.

ChatEmbedder is what the two families share: loading, the prompt, truncation, pooling and the dim."""

from __future__ import annotations

from typing import Any

from transformers import AutoModel, PretrainedConfig

from vembed.errors import DataError
from vembed.models.base import Embedder, Item

DEFAULT_INSTRUCTION = "Represent the user's input."


class ChatEmbedder(Embedder):
    """A decoder that embeds the chat prompt of an item, pooled at the last token (default)."""

    display_name = ""  # in error messages
    vision_tokens: tuple[str, ...] = ()  # stripped from user text: it must not forge image placeholders
    model_class = AutoModel

    @staticmethod
    def default_pooling(config: PretrainedConfig) -> str:
        return "last_token"

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def featurize(self, item: Item, is_query: bool) -> dict[str, Any]:
        """{"prompt": ...} plus "image" when the item has one; the image is decoded later, in collate
        (DataLoader workers), where its size sets the number of image tokens."""
        if item.text is None and item.image is None:
            raise DataError(f"{self.display_name} got an item with neither text nor image")
        instruction = item.instruction or (self.spec.query_instruction if is_query else None)
        content: list[dict[str, str]] = [{"type": "image"}] if item.image is not None else []
        if item.text is not None:
            content.append({"type": "text", "text": self._truncate(item.text)})
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": instruction or DEFAULT_INSTRUCTION}]},
            {"role": "user", "content": content},
        ]
        prompt = self.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return {"prompt": prompt} if item.image is None else {"prompt": prompt, "image": item.image}

    def _truncate(self, text: str) -> str:
        for token in self.vision_tokens:
            text = text.replace(token, "")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.spec.max_seq_length:
            return text
        return self.tokenizer.decode(ids[: self.spec.max_seq_length])

    @property
    def dim(self) -> int:
        return int(self._config().text_config.hidden_size)
