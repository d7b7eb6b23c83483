"""backend: local: `accelerate launch` on the GPUs of this pod, one process per GPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vembed.config import TrainConfig
from vembed.pipeline.launchers.command import local_command
from vembed.pipeline.launchers.wait import TrainingJobError, sigterm_raises


def run_local(cfg: TrainConfig, config_path: str | Path) -> None:
    """Run the training entrypoint under `accelerate launch`; its output goes to this process's log."""
    cmd = local_command(cfg, config_path)
    print(f"[vembed] {' '.join(cmd)}", flush=True)
    try:
        # On SIGTERM subprocess.run kills the launcher before the error propagates.
        with sigterm_raises("training with accelerate launch"):
            rc = subprocess.run(cmd, check=False).returncode
    except OSError as e:
        raise TrainingJobError(f"cannot start {cmd[0]}: {e.strerror}") from None
    if rc != 0:
        raise TrainingJobError(f"accelerate launch exited with code {rc}; the training log above says why")
