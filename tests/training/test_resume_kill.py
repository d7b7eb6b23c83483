"""A run killed with SIGKILL after a checkpoint and resumed ends with exactly the
adapter of an uninterrupted run (CPU, fixed seed). Real subprocesses, real kill.

Training is seeded, so equal weights alone would not show a resume (a restart from step 0 reaches
them too): the log must say "resumed from checkpoint-N" and continue at step N+1."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.support.resume_log import assert_resumed
from vembed.training.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]


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
        "logging_steps": 1,  # every step logged: the step after the resume point must be N+1
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every run: same float results
    # Output goes to a file: an unread pipe fills up and blocks the child mid-run.
    with (config.with_suffix(".out")).open("a") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), str(config), *extra],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if wait:
        proc.wait(timeout=300)
        assert proc.returncode == 0, config.with_suffix(".out").read_text()[-3000:]
    return proc


def logged_step(log: Path, step: int) -> bool:
    return log.is_file() and f"\nstep={step} " in "\n" + log.read_text()


def test_sigkill_then_resume_equals_uninterrupted(tiny_bert, pairs_file, tmp_path):
    ref = run(write_config(tmp_path / "ref.yaml", tiny_bert, pairs_file, tmp_path / "ref"))
    assert ref.returncode == 0

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yaml", tiny_bert, pairs_file, out)
    proc = run(cfg, wait=False)
    deadline = time.monotonic() + 240
    # Step 7 is logged after checkpoint-6 was committed; unlike a checkpoint (rotated away at step
    # 12), a log line cannot disappear, so this wait cannot miss its moment.
    while not logged_step(out / "training_log.txt", 7):
        assert proc.poll() is None, "training finished before it could be killed"
        assert time.monotonic() < deadline, "step 7 was never logged"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint-24").exists()
    survivor = int(latest_checkpoint(out).name.split("-")[1])
    assert 6 <= survivor < 24

    run(cfg, "--config_override", "resume_from_checkpoint=latest")
    assert assert_resumed(out / "training_log.txt", checkpoint=survivor) == (survivor, list(range(survivor + 1, 25)))
    a = load_file(str(tmp_path / "ref" / "checkpoint-24" / "adapter_model.safetensors"))
    b = load_file(str(out / "checkpoint-24" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = (out / "training_log.txt").read_text()
    assert "step=24" in log and not list(out.glob(".tmp-*"))
