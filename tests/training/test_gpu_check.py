"""bench/gpu_check.py in its CPU dry run: every section's code path, tiny shapes, no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.scaleout_helpers import REPO, subprocess_env

pytestmark = pytest.mark.slow  # real multi-process launches


def test_gpu_check_dry_run_runs_every_section(tmp_path):
    proc = subprocess.run(
        [str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        env={**subprocess_env(), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    sections = report["sections"]
    assert list(sections) == ["lora", "grad_cache", "full", "fsdp", "vl"]
    for name, r in sections.items():
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0, name
    assert sections["grad_cache"]["batch"] == 8 * sections["lora"]["batch"]
    assert sections["full"]["trainable_params"] == sections["full"]["params"]
    assert sections["lora"]["trainable_params"] < sections["lora"]["params"] / 4
    fsdp = sections["fsdp"]
    assert fsdp["processes"] == 2 and fsdp["distributed_type"].endswith("FSDP")
    assert fsdp["adapter_tensors_gathered"] == fsdp["adapter_tensors_expected"] > 0
    assert fsdp["optimizer_states_gathered"] == fsdp["adapter_tensors_expected"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| grad_cache |" in table and "LoRA vs full fine-tuning" in table
