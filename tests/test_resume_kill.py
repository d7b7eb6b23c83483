"""A run killed with SIGKILL after a checkpoint and resumed ends with exactly the
adapter of an uninterrupted run (CPU, fixed seed). Real subprocesses, real kill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, model: str, data: str, out: Path) -> Path:
    cfg = {
        "model_name": model,
        "data_path": data,
        "output_dir": str(out),
        "batch_size": 4,
        "max_seq_length": 32,
        "learning_rate": 1e-3,
        "lora_dropout": 0.1,
        "epochs": 2,  # 12 batches per epoch: the kill and the resume cross an epoch boundary
        "max_steps": 24,
        "save_steps": 2,
        "save_total_limit": 3,
        "logging_steps": 2,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every run: same float results
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), str(config), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    return proc


def test_sigkill_then_resume_equals_uninterrupted(tiny_bert, pairs_file, tmp_path):
    ref = run(write_config(tmp_path / "ref.yaml", tiny_bert, pairs_file, tmp_path / "ref"))
    assert ref.returncode == 0

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yaml", tiny_bert, pairs_file, out)
    proc = run(cfg, wait=False)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-6").is_dir():
        assert proc.poll() is None, "training finished before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint-24").exists()

    run(cfg, "--config_override", "resume_from_checkpoint=latest")
    a = load_file(str(tmp_path / "ref" / "checkpoint-24" / "adapter_model.safetensors"))
    b = load_file(str(out / "checkpoint-24" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = (out / "training_log.txt").read_text()
    assert "step=24" in log and not list(out.glob(".tmp-*"))
