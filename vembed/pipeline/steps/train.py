"""Pipeline step: fine-tune on a prepared dataset directory.

The dataset directory is what `vembed.pipeline.steps.prepare` writes: `train.jsonl`, `eval.jsonl` and a manifest.
The step resolves the config (defaults < optional YAML < overrides < the paths this step owns), trains,
and returns a JSON-friendly summary; `render_report` turns that summary into an HTML page for the KFP UI.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vembed.errors import ConfigError, DataError

if TYPE_CHECKING:
    from vembed.config import TrainConfig

# Keys the step sets itself; an override of one of them would be silently replaced, so it is refused.
STEP_OWNED_KEYS = ("data_path", "eval_data_path", "output_dir")
# Where the images install the project (images/Dockerfile.*: WORKDIR /opt/vembed, COPY examples examples).
IMAGE_HOME_ENV = "VEMBED_HOME"
IMAGE_HOME = "/opt/vembed"


def resolve_config_path(config_path: str | os.PathLike[str] | None, home: str | None = None) -> str | None:
    """The config file a pipeline step should read for `config_path`. In a step's pod the working directory
    is not the project, so a relative `examples/x.yaml` (or a bare `x.yaml`) is also looked up under the
    image's project directory (`$VEMBED_HOME`, default /opt/vembed) and its `examples/`."""
    if not config_path:
        return None
    given = Path(config_path)
    if given.is_file():
        return str(given)
    root = Path(home or os.environ.get(IMAGE_HOME_ENV) or IMAGE_HOME)
    tried = [given]
    if not given.is_absolute():
        for candidate in (root / given, root / "examples" / given):
            tried.append(candidate)
            if candidate.is_file():
                return str(candidate)
    examples = sorted(p.name for p in (root / "examples").glob("*.yaml")) if (root / "examples").is_dir() else []
    known = f"; the image's examples: {', '.join(examples)}" if examples else f"; {root / 'examples'} has no configs"
    raise ConfigError(f"config_path {config_path}: not found (looked at {', '.join(map(str, tried))}){known}")


def dataset_files(dataset_dir: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """(train.jsonl, eval.jsonl or None) inside a prepared dataset directory."""
    root = Path(dataset_dir)
    train_path = root / "train.jsonl"
    if not train_path.is_file():
        raise DataError(f"{root}: no train.jsonl in the dataset directory (was it written by `vembed prepare`?)")
    eval_path = root / "eval.jsonl"
    return train_path, (eval_path if eval_path.is_file() else None)


def resolve_config(
    config_path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any],
    backend: str | None = None,
    job_image: str | None = None,
) -> TrainConfig:
    """`load_config`, with the trainer settings a pipeline was compiled for where the config leaves them unset.

    `backend`: the pipeline's train pod was shaped for it (with trainjob / pytorchjob it has no GPU),
    so a config that explicitly asks for another backend is an error rather than a silent CPU run.
    `job_image`: the image a cluster job runs when `trainer.image` is unset (the pipeline's train image).
    """
    from vembed.config import load_config

    cfg = load_config(config_path or None, overrides, trainer_defaults={"backend": backend, "image": job_image})
    if backend and cfg.trainer.backend != backend:  # the defaults fill only unset keys: the config set it
        raise ConfigError(
            f"trainer.backend is {cfg.trainer.backend!r} but this pipeline was compiled with --train-backend {backend} "
            "(its train pod is shaped for that); remove the setting or recompile the pipeline"
        )
    return cfg


def train(
    dataset_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    base_model: str | None = None,
    config_overrides: Sequence[str] | None = None,
    config_path: str | os.PathLike[str] | None = None,
    output_uri: str | None = None,
    task_config: Mapping[str, Any] | None = None,
    backend: str | None = None,
    job_image: str | None = None,
) -> dict[str, Any]:
    """Train on `dataset_dir`, writing checkpoints under `output_dir`; returns the step's summary.

    A cluster job or several local GPUs go through `train_via_launcher` (`output_uri`, `task_config`);
    `backend` and `job_image` are the pipeline's defaults (see `resolve_config`).
    """
    from vembed.config import parse_overrides
    from vembed.training import train as run_training

    if isinstance(config_overrides, str):
        raise ConfigError(f"config_overrides: expected a list of key=value strings, got the string {config_overrides!r}")
    overrides = parse_overrides(config_overrides or [])
    for key in STEP_OWNED_KEYS:
        if key in overrides:
            raise ConfigError(f"config_overrides: {key!r} is set by the train step from its inputs; remove it")
    train_path, eval_path = dataset_files(dataset_dir)
    if base_model:
        # The override would be silently replaced (and evaluate compares against base_model): refuse it.
        if overrides.get("model_name") not in (None, base_model):
            raise ConfigError(
                f"config_overrides: model_name={overrides['model_name']} conflicts with base_model {base_model}; "
                "set the model once, with base_model"
            )
        overrides["model_name"] = base_model
    overrides.update(
        data_path=str(train_path),
        eval_data_path=str(eval_path) if eval_path else None,
        output_dir=str(output_dir),
    )
    cfg = resolve_config(resolve_config_path(config_path), overrides, backend, job_image)
    from vembed.pipeline.steps.launch import needs_launcher, train_via_launcher

    if needs_launcher(cfg):  # more than this process: accelerate launch or a cluster job (docs/multinode.md)
        return train_via_launcher(cfg, output_dir, output_uri=output_uri, task_config=task_config)
    result = run_training(cfg)
    return {
        "checkpoint_dir": str(result.checkpoint_dir),
        "final_loss": float(result.final_loss),
        "global_step": int(result.global_step),
        "history": list(result.history),
        "config": cfg.model_dump(),
        "log_path": str(result.log_path),
    }


def _loss_curve_png(history: Sequence[Mapping[str, Any]]) -> bytes | None:
    """The loss curve as PNG bytes (None when no loss was logged). A bare matplotlib Figure: no pyplot,
    so no display and no global figure state."""
    from matplotlib.figure import Figure

    if not (points := [(h["step"], h["loss"]) for h in history if "step" in h and "loss" in h]):
        return None
    ax = Figure(figsize=(6, 4), layout="tight").add_subplot()
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3)
    ax.plot(*zip(*points, strict=True), marker=".")
    buf = io.BytesIO()
    ax.figure.savefig(buf, format="png")
    return buf.getvalue()


REPORT_CONFIG_KEYS = (
    "model_name", "use_lora", "lora_r", "lora_alpha", "lora_target_modules", "batch_size",
    "learning_rate", "epochs", "max_steps", "use_mrl", "mrl_dims", "use_gradient_cache", "torch_dtype",
)  # fmt: skip


def render_report(summary: Mapping[str, Any]) -> str:
    """A self-contained HTML page (inline PNG) with the loss curve and the key settings."""
    esc = html.escape
    rows = [("final loss", f"{summary['final_loss']:.4f}"), ("optimizer steps", str(summary["global_step"]))]
    config = summary.get("config") or {}
    rows += [(k, str(config[k])) for k in REPORT_CONFIG_KEYS if k in config]
    table = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    png = _loss_curve_png(summary.get("history") or [])
    curve = (
        f'<img alt="training loss" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        if png
        else "<p>No loss was logged (fewer steps than logging_steps).</p>"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>vembed training</title>"
        "<style>body{font-family:sans-serif}th{text-align:left;padding-right:1em}</style></head><body>"
        f"<h2>Training</h2>{curve}<table>{table}</table></body></html>\n"
    )


def train_component(
    dataset: Any,
    model: Any,
    report: Any,
    task_config: Any = None,
    *,
    base_model: str = "",
    config_overrides: Sequence[str] = (),
    config_path: str = "",
    s3_endpoint_url: str = "",
    train_backend: str = "",
    job_image: str = "",
    job_output_uri: str = "",
    job_settings: Mapping[str, Any] | None = None,
) -> tuple[float, int]:
    """The body of both train components, given their KFP artifacts and other inputs by name: train next to
    `model.path` (same filesystem), move the final checkpoint and training_log.txt there, write the report
    and the model's metadata. `job_settings` (fixed at compile time for the job's pods) overlays the task's
    `dsl.TaskConfig`. A permanent failure becomes `SystemExit("error: ...")`: one line in the pod log.
    """
    from vembed.pipeline.steps import use_endpoints
    from vembed.pipeline.steps.launch import job_output_uri as default_job_output_uri
    from vembed.retry import run_step

    use_endpoints(s3_endpoint_url=s3_endpoint_url)
    task = {k: v for k, v in (dataclasses.asdict(task_config) if task_config else {}).items() if v is not None}
    task.update({k: v for k, v in dict(job_settings or {}).items() if v})
    out = Path(model.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".train-") as work:
        def attempt() -> dict[str, Any]:
            return train(
                dataset.path, work, base_model or None, list(config_overrides), config_path or None,
                output_uri=job_output_uri or default_job_output_uri(model.uri), task_config=task or None,
                backend=train_backend or None, job_image=job_image or None,
            )  # fmt: skip

        # Bad config or data fails at once with one line; a transient storage error is retried.
        summary = run_step(attempt)
        if out.exists():  # a retried attempt in the same place
            shutil.rmtree(out)
        shutil.move(summary["checkpoint_dir"], out)
        shutil.copy2(summary["log_path"], out / "training_log.txt")
    Path(report.path).write_text(render_report(summary), encoding="utf-8")
    model.metadata.update(
        base_model=summary["config"]["model_name"], final_loss=summary["final_loss"], global_step=summary["global_step"]
    )
    return summary["final_loss"], summary["global_step"]
