"""Run the compiled pipeline end to end on this machine with `kfp.local` (no cluster, no network).

The same IR YAML a cluster runs is compiled (without the GPU request, which has no local meaning), loaded
back and executed by `kfp.local.SubprocessRunner(use_venv=False)`: every step is a subprocess of this
Python, artifacts go under `<output_dir>/kfp`. Embedded defaults: the demo data set, all-MiniLM-L6-v2, a
local folder for storage and a sqlite MLflow store in `<output_dir>`. When `MLFLOW_TRACKING_URI` or
`AWS_ENDPOINT_URL` is set, the steps use that MLflow server / S3 endpoint instead (`--data s3://...`).

What kfp.local does with the cluster settings (kfp 2.17): `dsl.If`/`dsl.Else`, `dsl.OneOf`, retries
and the `{{$.pipeline_job_*}}` placeholders work as on a cluster; the Kubernetes platform config
(secrets, /dev/shm, PVC, node selector, tolerations) is ignored, since the steps inherit this process's
environment; images, cpu/memory requests and accelerators have no effect (kfp.local warns, we silence it).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipelines.lora_finetune import PipelineOptions
from vembed.errors import ConfigError, DataError, VembedError

LOCAL_YAML_NAME = "lora_finetune.local.yaml"
# The demo's training settings (MiniLM, LoRA on query/value); used when no data and no config are given.
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "minilm_demo.yaml"


class LocalRunError(VembedError):
    """A step of the local pipeline run failed; the message points at the log."""


@dataclass
class LocalRunResult:
    registration: dict[str, Any]
    metrics_report: str
    output_dir: Path
    log_path: Path


def build_demo_raw_data(out_dir: Path) -> Path:
    """The demo data set as one raw JSONL file, for prepare to validate and split."""
    from vembed.data.demo_data import build_demo_dataset

    paths = build_demo_dataset(out_dir / "demo-data")
    raw = out_dir / "demo-data" / "raw.jsonl"  # the splits are JSONL, each line ending in a newline
    raw.write_text("".join(Path(paths[k]).read_text(encoding="utf-8") for k in ("train", "eval")), encoding="utf-8")
    return raw


def _absolute_if_local(uri: str) -> str:
    """Steps may run elsewhere than this working directory: pin relative local paths."""
    return uri if "://" in uri or not Path(uri).exists() else str(Path(uri).resolve())


def _check_local_inputs(data_uri: str | None, config_path: str | None) -> None:
    if data_uri and "://" not in data_uri:
        path = Path(data_uri)
        # `<prefix>/latest` names the newest dt= snapshot under the prefix, not a real folder.
        if not (path.parent.is_dir() if path.name == "latest" else path.exists()):
            raise DataError(f"{data_uri}: raw data does not exist")
    if config_path and not Path(config_path).is_file():
        raise ConfigError(f"{config_path}: config file does not exist")


strip_ansi: Callable[[str], str] = functools.partial(re.compile(r"\x1b\[[0-9;]*m").sub, "")  # kfp.local's colours


class _StepLog(io.TextIOBase):
    """Stand-in for stdout during the run: everything goes to the log file; kfp.local's "Executing
    task" / "finished with status" lines are echoed to the terminal, and on a terminal the training
    progress bar is shown on one line that keeps being overwritten."""

    _STATUS = re.compile(r"(Executing task|Task '[^']+' finished with status|Pipeline '[^']+' finished)")
    _TASK = re.compile(r"Executing task '([^']+)'")
    _ERROR = re.compile(r"^\s*error: (.+)$")  # what a step prints when it fails (vembed.retry)
    _EXCEPTION = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit)): (.+)$")  # a traceback's last line
    _TRAINING = re.compile(r"^\s*(training:\s+\d+%.*)$")

    def __init__(self, log: TextIO, terminal: TextIO) -> None:
        self.log, self.terminal, self._pending = log, terminal, ""
        self._live = terminal.isatty()
        self._bar_shown = False
        self.task: str | None = None  # the step running now (the failing one, after a failure)
        self.reason: str | None = None  # that step's one-line error, if it printed one

    def write(self, text: str) -> int:
        self.log.write(strip_ansi(text))  # kfp.local colours its lines; a log file wants plain text
        self._pending += text
        *lines, self._pending = re.split(r"[\r\n]", self._pending)
        for line in lines:
            plain = strip_ansi(line)
            if task := self._TASK.search(plain):
                self.task, self.reason = task.group(1), None
            elif err := self._ERROR.match(plain):
                self.reason = err.group(1).strip()
            elif (exc := self._EXCEPTION.match(plain)) and self.reason is None:
                self.reason = f"{exc.group(1)}: {exc.group(3).strip()}"
            if self._STATUS.search(plain):
                if self._bar_shown:
                    self.terminal.write("\n")
                    self._bar_shown = False
                print(re.split(r" - (?:INFO|WARNING|ERROR) - ", plain, maxsplit=1)[-1].strip(), file=self.terminal, flush=True)
            elif self._live and (bar := self._TRAINING.match(plain)):
                width = shutil.get_terminal_size().columns - 3
                self.terminal.write("\r  " + bar.group(1)[:width].ljust(width))
                self.terminal.flush()
                self._bar_shown = True
        return len(text)

    def flush(self) -> None:
        self.log.flush()


def run_local(
    output_dir: str | os.PathLike[str] = "output/pipeline",
    data_uri: str | None = None,
    config_path: str | None = None,
    params: Sequence[str] = (),
    verbose: bool = False,
    **arguments: Any,
) -> LocalRunResult:
    """Compile, then execute the whole pipeline through kfp.local. `arguments` are run parameters by name
    (base_model, config_overrides, registered_model_name, promotion_metric, min_delta, ...); `params`
    more of them as `name=value` strings. Step output goes to `<out>/pipeline.log` unless `verbose`."""
    from kfp import components, local

    from pipelines.compile import compile_pipeline
    from pipelines.params import parse_params, read_pipeline_parameters

    _check_local_inputs(data_uri, config_path)  # a missing file fails in a second, not after a compile
    out = Path(output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise LocalRunError(f"{output_dir}: exists and is not a directory")
    with tempfile.TemporaryDirectory(prefix="vembed-compile-") as tmp:
        # No accelerator request (kfp.local ignores it and would only warn); pipeline outputs need no exit handler.
        compiled = compile_pipeline(Path(tmp) / LOCAL_YAML_NAME, PipelineOptions(accelerator_limit=0, exit_handler=False))
        # Any other run parameter, typed and checked against the compiled pipeline before `out` is written.
        extra = parse_params(params, read_pipeline_parameters(compiled)) if params else {}
        out.mkdir(parents=True, exist_ok=True)
        package = Path(shutil.move(compiled, out / LOCAL_YAML_NAME))
    if config_path is None and data_uri is None and DEMO_CONFIG.is_file():
        config_path = str(DEMO_CONFIG)
    arguments.update(
        data_uri=_absolute_if_local(data_uri) if data_uri else str(build_demo_raw_data(out)),
        base_model=_absolute_if_local(base) if (base := arguments.get("base_model")) else "",
        config_path=str(Path(config_path).resolve()) if config_path else "",
        mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}",
        s3_endpoint_url=os.environ.get("AWS_ENDPOINT_URL", ""),
        # No cluster to deploy to: the run ends by printing the `vembed serve` command instead.
        deploy=False,
    )
    arguments.update(extra)

    log_path = out / "pipeline.log"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp"), raise_on_error=True)
    pipeline = components.load_component_from_file(str(package))
    with warnings.catch_warnings(), log_path.open("w", encoding="utf-8") as log:
        # Image names and pod settings mean nothing to a subprocess; kfp.local says so once per task.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        # kfp.local prints its progress and every step's output to stdout: keep the progress on the
        # terminal, send the rest to the log file.
        step_log = _StepLog(log, sys.stderr)
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(step_log)
        try:
            with sink:
                task = pipeline(**arguments)
        except RuntimeError as e:
            # The failing step and its one-line reason, plain text (kfp.local colours its message).
            step, reason = (None, None) if verbose else (step_log.task, step_log.reason)
            if step and reason:
                raise LocalRunError(f"step {step} failed: {reason} (step output: {log_path})") from None
            detail = strip_ansi(str(e).splitlines()[0]) if str(e) else "a step failed"
            raise LocalRunError(f"local pipeline run failed: {detail} (step output: {log_path})") from None
    registration = json.loads(task.outputs["registration"])
    report = Path(task.outputs["metrics_report"].path).read_text(encoding="utf-8")
    return LocalRunResult(registration=registration, metrics_report=report, output_dir=out, log_path=log_path)


def print_result(result: LocalRunResult, stream=None) -> None:
    """Metrics table, then the registered version and its aliases."""
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console(file=stream or sys.stdout, soft_wrap=True)  # long commands stay copy-pasteable
    console.print(Markdown(result.metrics_report))
    reg = result.registration
    aliases = ", ".join(reg.get("aliases") or []) or "none"
    name, version = reg.get("model_name"), reg.get("version")
    console.print(f"\nregistered [bold]{name}[/bold] version [bold]{version}[/bold] (aliases: {aliases})")
    if reg.get("reason"):
        console.print(f"promotion: {reg['reason']}", markup=False)
    uri = f"models:/{name}@champion" if "champion" in (reg.get("aliases") or []) else f"models:/{name}/{version}"
    env = f"MLFLOW_TRACKING_URI={shlex.quote(str(reg.get('tracking_uri')))}"
    console.print(f"try it:    {env} vembed encode {shlex.quote(uri)} --text 'sort a list'", markup=False)
    if "champion" in (reg.get("aliases") or []):
        from vembed.inference.serve import serve_command

        # The same OpenAI-compatible API the cluster's InferenceService serves.
        console.print(f"serve it:  {env} {serve_command(uri)}", markup=False)
    console.print(f"artifacts: {result.output_dir / 'kfp'}\nstep log:  {result.log_path}", markup=False)
