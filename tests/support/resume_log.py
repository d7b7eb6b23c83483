"""The check every resume test makes: the run resumed, rather than restarted and reached the same weights.

Training is seeded, so a run that ignored `resume_from_checkpoint` and started again from step 0 would
end with the same adapter; only the log tells the two apart."""

from __future__ import annotations

import re
from pathlib import Path

_RESUMED = re.compile(r" resumed from checkpoint-(\d+) at step=(\d+)$")
_STEP = re.compile(r"^step=(\d+) ")


def assert_resumed(log: str | Path, checkpoint: int | None = None) -> tuple[int, list[int]]:
    """The (last) "resumed from checkpoint-N" line is there, and the steps logged after it are N+1, N+2, ...
    with no fresh start in between (logging_steps must be 1). Returns N and those steps."""
    lines = (log.read_text() if isinstance(log, Path) else log).splitlines()
    marks = [i for i, line in enumerate(lines) if _RESUMED.search(line)]
    assert marks, "no 'resumed from checkpoint-N' line in the training log: the run did not resume"
    n, at = (int(g) for g in _RESUMED.search(lines[marks[-1]]).groups())
    assert n == at, lines[marks[-1]]
    if checkpoint is not None:
        assert n == checkpoint, f"resumed from checkpoint-{n}, expected checkpoint-{checkpoint}"
    rest = lines[marks[-1] + 1 :]
    assert not [line for line in rest if " start model=" in line], "a fresh start was logged after the resume"
    steps = [int(m.group(1)) for line in rest if (m := _STEP.match(line))]
    assert steps and steps[0] == n + 1, f"first step logged after resuming from checkpoint-{n}: {steps[:1]}"
    assert steps == list(range(n + 1, n + 1 + len(steps))), steps
    return n, steps
