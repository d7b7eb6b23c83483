"""Runs `vembed train` under `accelerate launch` (two CPU processes, FSDP) for
tests/training/test_fsdp_loading.py, records each rank's host memory around model loading, and stops once
FSDP has wrapped the model (training itself is what tests/training/test_fsdp.py checks).

Writes OUT/rank<R>.json: resident memory before loading, parameter bytes held right after loading
(before FSDP shards anything), and the peak resident memory once FSDP has wrapped, synced and
sharded the model. `--every-rank-loads` is the control: every rank reads the checkpoint itself.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

from vembed.cli import main as cli
from vembed.training import loop


def materialised_bytes(module) -> tuple[int, int]:
    """(bytes of parameters this process holds in memory, bytes of all parameters): a rank that
    starts on the meta device holds none before sharding."""
    held = sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)
    return held, sum(p.numel() * p.element_size() for p in module.parameters())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(config: str, out: str, control: bool = False) -> int:
    record: dict[str, int] = {}
    if control:  # every rank reads the weights, as without RAM-efficient loading
        import vembed.models.base as base

        base._loads_on_meta = lambda: False
    build = loop.build_embedder

    def measured_build(cfg, dtype):
        # accelerate imports the optional `datasets` package (when installed) inside prepare() on
        # multi-process runs; importing it first keeps that out of what loading is measured by.
        from accelerate.utils import is_datasets_available

        if is_datasets_available():
            import datasets  # noqa: F401
        record["rss_before_load"] = peak_rss_bytes()
        embedder = build(cfg, dtype)
        record["held_after_load"], record["full_bytes"] = materialised_bytes(embedder)
        return embedder

    def after_prepare(*args, **kwargs):  # the loop calls make_step right after accelerator.prepare
        record["peak_rss_after_prepare"] = peak_rss_bytes()
        Path(out, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
        raise SystemExit(0)

    loop.build_embedder, loop.make_step = measured_build, after_prepare
    return cli(["train", config])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], "--every-rank-loads" in sys.argv[3:]))
