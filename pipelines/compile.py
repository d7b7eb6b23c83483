"""Compile the pipeline to KFP IR YAML. The committed copy lives at `pipelines/compiled/lora_finetune.yaml`."""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.lora_finetune import PipelineOptions, build_pipeline

COMPILED_PATH = Path(__file__).parent / "compiled" / "lora_finetune.yaml"


def compile_pipeline(output: str | os.PathLike[str] = COMPILED_PATH, options: PipelineOptions | None = None) -> Path:
    """Write the IR YAML for `options` (default: the committed settings) to `output`, atomically. An
    existing `output` is replaced only when it is an earlier compiled pipeline."""
    from kfp import compiler

    from vembed.artifacts.atomic_dir import check_output_file
    from vembed.errors import ConfigError

    out = Path(output)
    check_output_file(out, overwrite=True)  # a directory: refused before the temp file is written beside it
    if out.is_file():  # an earlier compile's output is replaced; any other file is the user's
        with out.open(encoding="utf-8", errors="replace") as fh:
            if fh.readline().rstrip() != "# PIPELINE DEFINITION":  # kfp's first line
                raise ConfigError(f"{out}: exists and is not a compiled pipeline; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.yaml")  # kfp insists on a .yaml suffix
    compiler.Compiler().compile(pipeline_func=build_pipeline(options), package_path=str(tmp))
    os.replace(tmp, out)
    return out
