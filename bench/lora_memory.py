"""Trainable parameters, adapter size and training-state memory of LoRA per model and rank,
computed from the published model configs (written below) on the meta device: nothing is
downloaded or allocated. Writes the tables in docs/lora-memory.md.

    python -m bench.lora_memory                    # print the markdown
    python -m bench.lora_memory --output docs/lora-memory.md

Counts come from peft itself (get_peft_model with vembed's target resolution) at each rank.
Memory is for the weights and optimizer state only; activations come on top and depend on batch
size and sequence length (gradient checkpointing trades them for ~30% more compute).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from bench.common import md_table
from vembed.models.lora import resolve_target_modules

RANKS = (4, 8, 16, 32, 64)
GUIDE_TARGETS = ["q_proj", "v_proj", "query", "value", "key", "dense"]  # the guide's default list
GIB = 1024**3
MIB = 1024**2


def hf(model: str, config: str, **kw: object) -> Callable[[], nn.Module]:
    """A builder of transformers' `model` class from its `config` class, e.g. hf("BertModel", "BertConfig")."""

    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**kw))

    return build


def qwen3_vl(text: dict, vision: dict) -> Callable[[], nn.Module]:
    """Qwen3-VL from the fields in which the published sizes differ; the rest they share."""
    text = {"vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8, **text}
    vision = {"num_heads": 16, "patch_size": 16, "num_position_embeddings": 2304, **vision}
    return hf("Qwen3VLModel", "Qwen3VLConfig", text_config=text, vision_config=vision)


QV = ["q_proj", "v_proj"]
# Published configs (config.json of each hub repository), the fields that set parameter shapes.
MODELS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "Qwen3-VL-Embedding-2B": (
        qwen3_vl({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                  "tie_word_embeddings": True},
                 {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "out_hidden_size": 2048,
                  "deepstack_visual_indexes": [5, 11, 17]}),
        QV,
    ),
    "Qwen3-VL-Embedding-8B": (
        qwen3_vl({"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                  "tie_word_embeddings": False},
                 {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 4096,
                  "deepstack_visual_indexes": [8, 16, 24]}),
        QV,
    ),
    "Qwen3-Embedding-0.6B": (
        hf("Qwen3Model", "Qwen3Config", vocab_size=151669, hidden_size=1024, intermediate_size=3072,
           num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
        QV,
    ),
    "Qwen3-Embedding-8B": (
        hf("Qwen3Model", "Qwen3Config", vocab_size=151665, hidden_size=4096, intermediate_size=12288,
           num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
        QV,
    ),
    "all-MiniLM-L6-v2": (
        hf("BertModel", "BertConfig", vocab_size=30522, hidden_size=384, intermediate_size=1536,
           num_hidden_layers=6, num_attention_heads=12, max_position_embeddings=512),
        ["query", "key", "value", "dense"],
    ),
}  # fmt: skip


def lora_parameters(build: Callable[[], nn.Module], targets: list[str], rank: int) -> tuple[int, int]:
    """(trainable LoRA parameters, base parameters) of the model with LoRA at `rank`, on meta."""
    with torch.device("meta"):
        model = build()
        base = sum(p.numel() for p in model.parameters())
        matched = resolve_target_modules(model, targets)
        # BERT's pooler never reaches the embedding: vembed leaves it out (TextEmbedder.unused_modules).
        excluded = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("pooler")]
        peft = get_peft_model(model, LoraConfig(r=rank, target_modules=matched, exclude_modules=excluded or None))
        trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    return trainable, base


def rows() -> list[dict]:
    out = []
    for name, (build, targets) in MODELS.items():
        for rank in RANKS:
            trainable, base = lora_parameters(build, targets, rank)
            out.append({"model": name, "targets": targets, "rank": rank, "lora": trainable, "base": base})
    return out


def _n(x: float) -> str:
    return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K"


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB" if x >= GIB / 10 else f"{x / MIB:.0f} MiB"


def markdown(table: list[dict]) -> str:
    header = ["model", "LoRA targets", "rank", "base params", "LoRA params", "% of base", "adapter file (fp32)",
              "LoRA training state", "frozen base in bf16", "full fine-tuning state"]  # fmt: skip
    rows = [[r["model"], ", ".join(r["targets"]), r["rank"], _n(r["base"]), _n(r["lora"]), f"{100 * r['lora'] / r['base']:.3f}%",
             _gib(4 * r["lora"]), _gib(16 * r["lora"]), _gib(2 * r["base"]), _gib(16 * r["base"])] for r in table]  # fmt: skip
    return md_table(header, rows) + "\n"


HEADER = """# LoRA memory: parameters and adapter size per model and rank

Generated by `python -m bench.lora_memory --output docs/lora-memory.md` from the models' published
configs, built on the meta device (nothing downloaded); LoRA counts are peft's own at each rank.

- **LoRA params**: trainable adapter parameters (A and B of every targeted Linear), with vembed's
  target resolution: the guide's default list reduces to the names the model has. On Qwen3-VL the
  vision tower's attention is one fused `qkv`, so `q_proj`/`v_proj` adapt the language model only.
- **adapter file**: `adapter_model.safetensors`; vembed keeps LoRA weights in fp32.
- **LoRA training state**: fp32 LoRA weights + gradients + AdamW's two moments, 16 bytes per
  trainable parameter. **Frozen base in bf16**: the base weights (2 bytes per parameter).
  **Full fine-tuning state**: the same 16 bytes for every parameter (fp32 master weights with
  bf16 autocast, as vembed trains).
- Activations come on top of all of these and usually dominate LoRA training: they grow with
  batch size x sequence length (and image tokens). Gradient checkpointing keeps only each layer's input
  and recomputes the rest during the backward pass: less memory, but training gets *slower*, not faster.
  GradCache bounds them by its chunk size instead of the batch size.

The guide's "Qwen3-VL-2B with LoRA (rank=16): ~100M LoRA params" is off by ~30x: rank 16 on
`q_proj`/`v_proj` is about 3.2M parameters (a 12 MiB adapter), and the memory saved by LoRA is the optimizer
state of the frozen weights (compare the last two columns), not the weights themselves.

"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write the markdown here instead of printing it")
    args = parser.parse_args(argv)
    text = HEADER + markdown(rows())
    if args.output:
        args.output.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
