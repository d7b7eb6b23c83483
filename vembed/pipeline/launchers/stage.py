"""Inside a job pod: `python -m vembed.pipeline.launchers.stage in` before training, `... out` after it (node 0).

`in`  writes the config from $VEMBED_CONFIG to <trainer.work_dir>/config.yaml, with s3:// data files
      made local and output_dir pointing at <trainer.work_dir>/output when the output goes to S3.
`out` publishes the final checkpoint (plus training_log.txt and config.yaml) to $VEMBED_OUTPUT_URI as a
      complete directory: every file first, manifest.json last, so a half-published output is never read.
With a shared-PVC output (a plain path), training writes there directly and `out` has nothing to do.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from vembed.artifacts import storage
from vembed.config import TrainConfig
from vembed.errors import CheckpointError, ConfigError, run_command
from vembed.pipeline.launchers.command import CONFIG_ENV, OUTPUT_URI_ENV, job_config_path, job_output_dir

DATA_KEYS = ("data_path", "eval_data_path", "corpus_path")
OUTPUT_EXTRAS = ("training_log.txt", "config.yaml")


def _required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name)
    if not value:
        raise ConfigError(f"${name} is not set; this command runs inside a job created by vembed.pipeline.launchers")
    return value


def localize(uri: str, dest_dir: Path) -> Path:
    """A local copy of an s3:// data file; its whole directory when that is a complete (manifest) one,
    so image paths relative to the data file keep working."""
    parent, name = posixpath.split(uri)
    if storage.exists(storage.join(parent, storage.MANIFEST)):
        return storage.materialize(parent, dest_dir / "cache") / name
    return storage.download_file(uri, dest_dir / "files" / name)


def job_config(environ: Mapping[str, str]) -> TrainConfig:
    """The resolved config the launcher put in $VEMBED_CONFIG."""
    try:
        return TrainConfig(**(yaml.safe_load(_required(environ, CONFIG_ENV)) or {}))
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"${CONFIG_ENV}: not a valid vembed config: {e}") from None


def stage_in(environ: Mapping[str, str], workdir: str | None = None) -> Path:
    """Write the job's config file (under `workdir`, default trainer.work_dir); returns its path."""
    cfg = job_config(environ)
    output_uri = _required(environ, OUTPUT_URI_ENV)
    workdir = workdir or cfg.trainer.work_dir
    updates = {"output_dir": job_output_dir(workdir) if storage.is_s3(output_uri) else output_uri}
    for key in DATA_KEYS:
        if (value := getattr(cfg, key)) and storage.is_s3(value):
            updates[key] = str(localize(value, Path(workdir) / "inputs"))
    config_path = Path(job_config_path(workdir))
    cfg.model_copy(update=updates).save(config_path)
    return config_path


def final_checkpoint(output_dir: str | os.PathLike[str]) -> Path:
    """The last checkpoint-N directory training wrote under `output_dir`."""
    from vembed.training.checkpoint import latest_checkpoint

    final = latest_checkpoint(output_dir)
    if final is None:
        raise CheckpointError(f"{output_dir}: the training finished but left no checkpoint-N directory")
    return final


def stage_out(environ: Mapping[str, str], output_dir: str | None = None) -> str | None:
    """Publish the final checkpoint to an s3:// output; returns the URI, or None for a shared path.
    `output_dir` defaults to the one stage_in chose (under trainer.work_dir)."""
    output_uri = _required(environ, OUTPUT_URI_ENV)
    if not storage.is_s3(output_uri):
        return None
    output_dir = output_dir or job_output_dir(job_config(environ).trainer.work_dir)
    final = final_checkpoint(output_dir)
    with storage.staging_dir(output_uri) as tmp:
        shutil.copytree(final, tmp / final.name)
        for name in OUTPUT_EXTRAS:
            if (Path(output_dir) / name).is_file():
                shutil.copy2(Path(output_dir) / name, tmp / name)
    print(f"[vembed] published {final.name} to {output_uri}", flush=True)
    return output_uri


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["in"], ["out"]):
        print("usage: python -m vembed.pipeline.launchers.stage in|out", file=sys.stderr)
        return 2
    stage = stage_in if args == ["in"] else stage_out
    return run_command(lambda: stage(os.environ) and None)  # a failure: one `error: ...` line, exit 2


if __name__ == "__main__":
    sys.exit(main())
