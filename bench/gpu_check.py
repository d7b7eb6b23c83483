"""GPU check: a short, prepared set of training measurements on real-size, randomly initialised models.

    bench/gpu_check.sh [--out DIR] [--budget-s 420] [--sections lora,grad_cache,full,fsdp,vl]
    bench/gpu_check.sh --dry-run      # CPU, tiny shapes: the same code paths in seconds (make test)

Sections (in this order; each is skipped once the time budget is spent, and a failing section is
recorded and does not stop the others):
  lora        bf16 LoRA steps on a Qwen3-0.6B-shaped model (weights from the config, random)
  grad_cache  the same with GradCache at 8x the batch (chunk = the lora batch)
  full        full fine-tuning of the same model (fp32 master weights, bf16 autocast), vs lora
  fsdp        FSDP (FULL_SHARD, LoRA) over every GPU of the machine, through `accelerate launch`,
              with GradCache, then the collective full-adapter and optimizer-state gathers
  vl          bf16 LoRA steps on a Qwen3-VL-2B-shaped model: text queries vs image+text documents

Every step goes through vembed's own code: build_accelerator, apply_lora, make_step (plain or
GradCache), the loss, AdamW. Reported per section: samples/s, tokens/s (non-padding tokens
embedded per second), peak GPU memory (torch.cuda.max_memory_allocated), and MFU.

MFU = model FLOPs per second / the GPU's dense bf16 peak. Model FLOPs per token: forward
2 x (weights of every Linear) + 4 x layers x seq x attention width (QK^T and AV); training
adds the backward: activation gradients (= forward) always, weight gradients (= forward) only
for full fine-tuning; LoRA's own weight gradients are counted exactly. GradCache's extra no-graph
forward is recomputation and is not counted (as with activation checkpointing).
Writes DIR/gpu_check.json and DIR/gpu_check.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import REPO, md_table

SECTIONS = ("lora", "grad_cache", "full", "fsdp", "vl")

QWEN3_06B = {
    "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}  # fmt: skip
QWEN3_VL_2B = {
    "text": {**QWEN3_06B, "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 262144},
    "vision": {
        "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2048,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "deepstack_visual_indexes": [5, 11, 17],
    },
}  # fmt: skip
TINY_QWEN3 = {
    "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}  # fmt: skip
TINY_VL = {
    "text": {**TINY_QWEN3, "max_position_embeddings": 4096},
    "vision": {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "deepstack_visual_indexes": [0],
    },
    # Special tokens inside the tiny vocabulary (the real ids are above 151000).
    "tokens": {"image_token_id": 1000, "vision_start_token_id": 1001, "vision_end_token_id": 1002},
}  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Dense bf16 tensor-core peak (FLOP/s) by device name; override with GPU_PEAK_TFLOPS.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


# --- plan ---------------------------------------------------------------------------------


def plan(dry_run: bool) -> dict[str, Any]:
    """Shapes and sizes; the dry run keeps every code path and shrinks every number."""
    if dry_run:
        return {
            "text_shape": TINY_QWEN3, "text_name": "tiny-qwen3", "vl_shape": TINY_VL, "vl_name": "tiny-qwen3-vl",
            "batch": 4, "q_len": 12, "d_len": 24, "warmup": 1, "steps": 1, "vl_batch": 2, "image_side": 64,
            # bf16 matmuls are emulated (slow) on most CPUs; the dry run checks code paths, not precision.
            "dtype": "float32", "fsdp_dtype": "float32", "fsdp_processes": 2,
        }  # fmt: skip
    import torch

    return {
        "text_shape": QWEN3_06B, "text_name": "Qwen3-0.6B shape", "vl_shape": QWEN3_VL_2B,
        "vl_name": "Qwen3-VL-2B shape", "batch": 64, "q_len": 64, "d_len": 256, "warmup": 3, "steps": 10,
        "vl_batch": 16, "image_side": 448, "dtype": "bfloat16", "fsdp_dtype": "bfloat16",
        "fsdp_processes": max(torch.cuda.device_count(), 1),
    }  # fmt: skip


# --- models and batches -------------------------------------------------------------------


def random_backbone(model_class: Any, config: Any, dtype: Any, device: Any) -> Any:
    """`model_class(config)`, randomly initialised (seed 0) on `device`, with the training loop's attention."""
    import torch

    from vembed.models.attention import use_training_attention

    torch.manual_seed(0)
    with torch.device(device):
        backbone = model_class(config).to(dtype)
    use_training_attention(backbone)  # as the training loop does
    return backbone


def text_embedder(shape: dict[str, Any], name: str, dtype: Any, device: Any):
    from transformers import Qwen3Config, Qwen3Model

    from vembed.models.base import EmbedderSpec
    from vembed.models.text import TextEmbedder

    spec = EmbedderSpec(family="text", model_name=name, pooling="last_token", max_seq_length=512)
    return TextEmbedder(random_backbone(Qwen3Model, Qwen3Config(**shape), dtype, device), tokenizer=None, spec=spec)


def vl_embedder(shape: dict[str, Any], name: str, dtype: Any, device: Any):
    """vembed's qwen3_vl embedder around a randomly initialised Qwen3-VL model, and the model's config."""
    from types import SimpleNamespace

    from transformers import Qwen3VLConfig, Qwen3VLModel

    from vembed.models.base import EmbedderSpec
    from vembed.models.qwen_vl import QwenVLEmbedder

    config = Qwen3VLConfig(text_config=shape["text"], vision_config=shape["vision"], **shape.get("tokens", {}))
    backbone = random_backbone(Qwen3VLModel, config, dtype, device)
    spec = EmbedderSpec(family="qwen3_vl", model_name=name, pooling="last_token", max_seq_length=2048)
    # Batches are built here, not by the processor: the embedder only asks it for two numbers.
    processor = SimpleNamespace(
        tokenizer=SimpleNamespace(convert_tokens_to_ids=lambda token: config.image_token_id),
        image_processor=SimpleNamespace(merge_size=config.vision_config.spatial_merge_size),
    )
    return QwenVLEmbedder(backbone, processor, spec), config


def text_inputs(batch: int, length: int, vocab: int, device: Any, seed: int) -> dict[str, Any]:
    """Token ids with varied lengths (left padded, as for decoder embedders)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length).expand(batch, length) >= (length - lengths).unsqueeze(1)).long()
    return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}


def vl_batch(p: dict[str, Any], config: Any, batch: int, device: Any, seed: int) -> dict[str, Any]:
    """Text queries; documents are one image (image_side^2 pixels) followed by text."""
    import torch

    vision = config.vision_config
    side = p["image_side"] // vision.patch_size
    merged = (side // vision.spatial_merge_size) ** 2
    patch_dim = 3 * vision.temporal_patch_size * vision.patch_size**2
    g = torch.Generator().manual_seed(seed)
    text_len = p["d_len"] // 4
    ids = torch.randint(10, 1000, (batch, merged + 2 + text_len), generator=g)
    ids[:, 0] = config.vision_start_token_id
    ids[:, 1 : 1 + merged] = config.image_token_id
    ids[:, 1 + merged] = config.vision_end_token_id
    positive = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(batch, side * side, patch_dim, generator=g).to(device),  # row-aligned
        "image_grid_thw": torch.tensor([[1, side, side]] * batch).to(device),
        "mm_token_type_ids": (ids == config.image_token_id).int().to(device),  # 1 marks image tokens (M-RoPE)
    }
    query = text_inputs(batch, p["q_len"], 1000, device, seed + 2)
    query["mm_token_type_ids"] = torch.zeros_like(query["input_ids"]).int()  # text only
    return {"query": query, "positive": positive}


# --- measurement --------------------------------------------------------------------------


def model_flops_per_token(embedder: Any, shape: dict[str, Any], seq: float, full: bool) -> float:
    """Training FLOPs per token as the module docstring defines them."""
    from torch import nn

    weights = [m.weight for m in embedder.modules() if isinstance(m, nn.Linear)]
    text = shape.get("text", shape)
    attention = 4 * int(text["num_hidden_layers"]) * seq * int(text["num_attention_heads"] * text["head_dim"])
    forward = 2 * sum(w.numel() for w in weights) + attention
    weight_grads = forward if full else 2 * sum(w.numel() for w in weights if w.requires_grad)
    return 2 * forward + weight_grads


def peak_flops(device_name: str) -> float | None:
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def run_steps(p: dict[str, Any], cfg: Any, accelerator: Any, embedder: Any, batches: list, processes: int = 1):
    """vembed's own step function and AdamW over the prepared model: p["warmup"] untimed steps, then
    p["steps"] timed ones. Returns (model, optimizer, the figures every section reports); throughput
    counts `processes` alike processes."""
    import torch

    from vembed.training.losses import build_loss
    from vembed.training.step import make_step

    optimizer = torch.optim.AdamW([q for q in embedder.parameters() if q.requires_grad], lr=1e-5)
    model, optimizer = accelerator.prepare(embedder, optimizer)
    step = make_step(cfg, accelerator, model, build_loss(cfg, embedder.dim))
    model.train()
    cuda = accelerator.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(p["warmup"] + p["steps"]):
        if i == p["warmup"]:
            sync()
            start = time.perf_counter()
        losses.append(float(step(batches[i % len(batches)]).detach()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    elapsed = time.perf_counter() - start
    # Non-padding tokens embedded in the timed steps (queries and documents).
    tokens = sum(int(part["attention_mask"].sum()) for i in range(p["steps"]) for part in batches[i % len(batches)].values())
    return model, optimizer, {
        "model": embedder.spec.model_name,
        "batch": cfg.batch_size,
        "chunk": cfg.gradient_cache_chunk_size if cfg.use_gradient_cache else None,
        "steps": p["steps"],
        "step_s": elapsed / p["steps"],
        "samples_per_s": cfg.batch_size * p["steps"] * processes / elapsed,
        "tokens_per_s": tokens * processes / elapsed,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def train_config(p: dict[str, Any], **overrides: Any):
    from vembed.config import TrainConfig

    return TrainConfig(**{
        "model_name": "random", "torch_dtype": p["dtype"], "batch_size": p["batch"], "lora_r": 16,
        "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": LORA_TARGETS, "max_grad_norm": None,
        **overrides,
    })  # fmt: skip


def section(p: dict[str, Any], name: str) -> dict[str, Any]:
    """One section in this process: lora, grad_cache or full on the text model, or vl; fsdp runs it in
    every process of an `accelerate launch` (see section_fsdp)."""
    import torch

    from vembed.models.lora import apply_lora
    from vembed.training.fsdp import gather_full_backbone_state, gather_full_optimizer_state
    from vembed.training.loop import build_accelerator

    full, vl, fsdp = name == "full", name == "vl", name == "fsdp"
    batch = p["vl_batch"] if vl else p["batch"] * {"grad_cache": 8, "fsdp": 2}.get(name, 1)
    cfg = train_config(
        p, batch_size=batch, use_lora=not full, use_gradient_cache=name in ("grad_cache", "fsdp"),
        gradient_cache_chunk_size=p["batch"], use_fsdp=fsdp, torch_dtype=p["fsdp_dtype" if fsdp else "dtype"],
    )  # fmt: skip
    accelerator, _ = build_accelerator(cfg)
    # As the loop loads them: a frozen base in the training dtype under LoRA, fp32 master weights otherwise;
    # under FSDP one uniform dtype: fp32 parameters (LoRA included), bf16 compute from the plugin.
    dtype = torch.float32 if full or fsdp else getattr(torch, p["dtype"])
    device, seed = accelerator.device, 100 + accelerator.process_index * 7 if fsdp else 0
    if vl:
        embedder, config = vl_embedder(p["vl_shape"], p["vl_name"], dtype, device)
        batches = [vl_batch(p, config, batch, device, seed + s) for s in range(2)]
    else:
        embedder = text_embedder(p["text_shape"], p["text_name"], dtype, device)
        vocab = p["text_shape"]["vocab_size"]
        batches = [{"query": text_inputs(batch, p["q_len"], vocab, device, seed + s),
                    "positive": text_inputs(batch, p["d_len"], vocab, device, seed + s + 1)} for s in range(2)]  # fmt: skip
    if not full:
        apply_lora(embedder, cfg)
    model, optimizer, figures = run_steps(p, cfg, accelerator, embedder, batches, accelerator.num_processes)
    if fsdp:
        sharded = accelerator.distributed_type == "FSDP"
        model_state = gather_full_backbone_state(accelerator, model) if sharded else None  # collective
        optim_state = gather_full_optimizer_state(accelerator, model, optimizer) if sharded else None  # collective
        result = {
            "section": name,
            "processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            **figures,
            "adapter_tensors_gathered": len(model_state or {}),
            "adapter_tensors_expected": sum(q.requires_grad for q in embedder.parameters()),
            "optimizer_states_gathered": len((optim_state or {}).get("state", {})),
        }
    else:
        # FLOPs per second = FLOPs per token x tokens per second; seq: tokens per sequence (query + document).
        seq = figures["tokens_per_s"] / (2 * figures["samples_per_s"])
        shape = p["vl_shape" if vl else "text_shape"]
        flops = model_flops_per_token(accelerator.unwrap_model(model), shape, seq, full) * figures["tokens_per_s"]
        peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
        result = {
            "section": name,
            **figures,
            "trainable_params": sum(q.numel() for q in embedder.parameters() if q.requires_grad),
            "params": sum(q.numel() for q in embedder.parameters()),
            "model_tflops_per_s": flops / 1e12,
            "mfu": flops / peak if peak else None,
        }
    accelerator.free_memory()  # drop the accelerator's references so the next section starts empty
    return result


# --- FSDP: a separate `accelerate launch` over the machine's GPUs ----------------------------


def section_fsdp(p: dict[str, Any], dry_run: bool, timeout: float) -> dict[str, Any]:
    config = "cpu_2proc.yaml" if dry_run else "fsdp.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(REPO / "examples" / "accelerate" / config),
            "--num_processes", str(p["fsdp_processes"]),
            "--module", "bench.gpu_check", "--fsdp-worker", str(out),
        ] + (["--dry-run"] if dry_run else [])  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if dry_run else None
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"FSDP launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(out.read_text())


def fsdp_worker(out: str, dry_run: bool) -> None:
    """One process of section_fsdp's launch; the main process writes the section's figures to `out`."""
    from accelerate import PartialState

    result = section(plan(dry_run), "fsdp")
    if PartialState().is_main_process:
        Path(out).write_text(json.dumps(result))
    PartialState().wait_for_everyone()


# --- report -------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    def cell(v: Any, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    rows = [
        [name, r.get("error") or r.get("skipped"), "", "", "", "", "", ""] if "error" in r or "skipped" in r
        else [name, r.get("model", ""), r["batch"], r.get("chunk") or "-", cell(r["samples_per_s"]),
              cell(r["tokens_per_s"], "{:.0f}"), cell(r.get("peak_mem_gib"), "{:.2f}"), cell(r.get("mfu"), "{:.1%}")]
        for name, r in report["sections"].items()
    ]  # fmt: skip
    lines = [
        f"GPU check on {report['device']} ({report['gpus']} GPU), torch {report['torch']}"
        + (" (dry run: CPU, tiny shapes)" if report["dry_run"] else ""),
        "",
        md_table(["section", "model", "batch", "chunk", "samples/s", "tokens/s", "peak GiB", "MFU"], rows),
    ]
    lora, full = report["sections"].get("lora", {}), report["sections"].get("full", {})
    if "samples_per_s" in lora and "samples_per_s" in full:
        speed = lora["samples_per_s"] / full["samples_per_s"]
        line = f"LoRA vs full fine-tuning: {speed:.2f}x the samples/s"
        if lora.get("peak_mem_gib") and full.get("peak_mem_gib"):
            line += f", {1 - lora['peak_mem_gib'] / full['peak_mem_gib']:.0%} less peak memory"
        lines += ["", line + " (the guide claims 1.5-2x faster and 40-50% less memory)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--budget-s", type=float, default=420, help="start no section after this many seconds")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--fsdp-worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fsdp_worker:
        fsdp_worker(args.fsdp_worker, args.dry_run)
        return 0

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to exercise the code on CPU", file=sys.stderr)
        return 2
    p = plan(args.dry_run)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        print(f"gpu_check: unknown sections {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "plan": {k: v for k, v in p.items() if not k.endswith("_shape")},
        "sections": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every section, so a hard stop still leaves the figures so far
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.md").write_text(markdown(report))

    start = time.perf_counter()
    for name in wanted:
        spent = time.perf_counter() - start
        if spent > args.budget_s:
            report["sections"][name] = {"skipped": f"time budget spent ({spent:.0f}s)"}
            continue
        t0 = time.perf_counter()
        try:
            if name == "fsdp":
                result = section_fsdp(p, args.dry_run, timeout=max(args.budget_s - spent, 60) + 120)
            else:
                result = section(p, name)
        except Exception as e:  # one failing section must not hide the others' figures
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
        result["wall_s"] = time.perf_counter() - t0
        report["sections"][name] = result
        print(f"[gpu_check] {name}: {json.dumps(result)}", flush=True)
        write()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - start
    write()
    print(markdown(report))
    return int(any("error" in r for r in report["sections"].values()))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
