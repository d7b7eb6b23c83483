"""Helpers shared by the GradCache, DDP and FSDP tests: tiny models, data, launches, comparisons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.support.tiny_models import make_tiny_bert

REPO = Path(__file__).resolve().parents[2]
CPU_2PROC_CONFIG = REPO / "examples" / "accelerate" / "cpu_2proc.yaml"
WORKER = Path(__file__).with_name("scaleout_worker.py")

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega red green blue cyan magenta yellow black white river mountain forest "
    "desert ocean island valley canyon glacier meadow"
).split()


def tiny_bert(path: Path, dropout: float, seed: int = 0) -> Path:
    """A tiny random BERT whose hidden and attention dropout are `dropout`."""
    make_tiny_bert(path, seed=seed)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["hidden_dropout_prob"] = dropout
    cfg["attention_probs_dropout_prob"] = dropout
    cfg_file.write_text(json.dumps(cfg, indent=1))
    return path


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def write_pairs(path: Path, n: int, negatives_every: int = 3) -> Path:
    """n records of varied length; every `negatives_every`-th record has one or two hard negatives,
    so batches (and ranks) differ in their number of negatives, some having none."""
    lines = []
    for i in range(n):
        rec: dict[str, Any] = {"query": f"{i} {sentence(i, 3 + i % 5)}", "positive": sentence(i + 1, 6 + i % 7)}
        if negatives_every and i % negatives_every == 0:
            rec["negatives"] = [sentence(i + 2 + k, 5 + k) for k in range(1 + i % 2)]
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def base_config(model: Path, data: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_name": str(model),
        "data_path": str(data),
        "output_dir": str(out),
        "torch_dtype": "float32",
        "max_seq_length": 32,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["query", "value"],
        "batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        "epochs": 1,
        "max_steps": 3,
        "logging_steps": 1,
        "save_steps": 1000,
        "seed": 7,
        # Length grouping sorts rows into batches by the batch size, so 2 x 4 rows would not be the
        # same global batches as 1 x 8; the equality tests need plain shuffled batches.
        "group_by_length": False,
    }
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # two ranks on two cores: one thread each
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def accelerate_launch(args: list[str], timeout: float = 240, extra: list[str] | None = None) -> str:
    """`accelerate launch` with the repo's CPU two-process config; returns the output, fails loudly."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CPU_2PROC_CONFIG), *(extra or []), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{out[-6000:]}")
    return out


def adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "adapter_model.safetensors"))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|b|: a scale-free distance that ignores nothing."""
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert x.shape == y.shape, k
        scale = y.abs().max().item()
        diff = (x - y).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def perturb_lora_b(model: torch.nn.Module, seed: int = 123) -> None:
    """LoRA B starts at zero, which leaves LoRA A without gradient; give it small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
