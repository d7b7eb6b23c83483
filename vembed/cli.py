"""The `vembed` command. Heavy imports (torch, mlflow, kfp) happen inside handlers
so that `vembed --help` and `vembed config show` stay instant."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vembed.errors import StorageError, VembedError, run_command


def _cmd_train(args: argparse.Namespace) -> int:
    from vembed.config import load_config
    from vembed.training import train

    cfg = load_config(args.config, args.config_override)
    result = train(cfg)
    print(f"final checkpoint: {result.checkpoint_dir}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from vembed.config import load_config

    print(load_config(args.config, args.config_override).to_yaml(), end="")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np
    from transformers.utils import logging as hf_logging

    from vembed.artifacts.atomic_dir import check_output_file, staged_file
    from vembed.inference.predictor import Predictor

    if not args.text and not args.image:
        raise VembedError("encode: give --text and/or --image")
    out = Path(args.output) if args.output else None
    if out:  # checked before the model loads
        if not out.is_dir() and not args.output.endswith(".npy"):
            out = out.with_name(out.name + ".npy")  # the name np.save writes
        check_output_file(out, args.overwrite)
        if not out.parent.is_dir():
            raise StorageError(f"{out}: folder {out.parent} does not exist")
    # Weight-loading and download bars are noise around a few lines of output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    pred = Predictor(args.model)
    parts = []
    if args.text:
        parts.append(pred.encode_text(args.text, dim=args.dim))
    if args.image:
        parts.append(pred.encode_image(args.image, dim=args.dim))
    emb = np.concatenate(parts)
    if out:
        with staged_file(out) as tmp, open(tmp, "wb") as fh:  # a crash never leaves half a file
            np.save(fh, emb)
        print(f"{emb.shape[0]} embeddings of dim {emb.shape[1]} written to {out}")
    elif args.json:
        print(json.dumps(emb.tolist()))
    else:
        print(summarize_embeddings(emb, [*args.text, *args.image]))
    return 0


def summarize_embeddings(emb, labels: Sequence[str], first: int = 5, rows: int = 10) -> str:
    """A few lines a person can read: shape, and per input its norm and first values."""
    lines = [f"{emb.shape[0]} embedding{'s' if emb.shape[0] != 1 else ''} of dim {emb.shape[1]} (float32)"]
    width = min(max((len(label) for label in labels[:rows]), default=0), 40)
    for label, row in list(zip(labels, emb, strict=False))[:rows]:
        shown = label if len(label) <= width else label[: width - 1] + "…"
        values = ", ".join(f"{v:+.4f}" for v in row[:first])
        lines.append(f"  {shown:<{width}}  norm {float((row**2).sum() ** 0.5):.4f}  [{values}, ...]")
    if emb.shape[0] > rows:
        lines.append(f"  ... {emb.shape[0] - rows} more")
    lines.append("(--output FILE.npy saves them, --json prints every value)")
    return "\n".join(lines)


def _calling(target: str, report: Callable[[Any], str] | None = None) -> Callable[[argparse.Namespace], int]:
    """A handler that calls `module:function` with the parsed arguments named like its parameters (all
    of them when it takes **kwargs) and prints `report(result)`; without `report` the result is the exit code."""

    def handler(args: argparse.Namespace) -> int:
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        result = fn(**{k: v for k, v in vars(args).items() if k in params or (takes_any and k not in ("command", "func"))})
        if report is None:
            return int(result or 0)
        print(report(result))
        return 0

    return handler


def _as_json(result: Any) -> str:
    return json.dumps(result, indent=2, default=str)


def _positive_int(text: str) -> int:
    """An argparse type: a count of at least 1, refused when the arguments are parsed (a batch size of 0
    would otherwise fail with a traceback deep inside, after the model has loaded)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vembed", description="Fine-tune embedding models with LoRA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    config_args = argparse.ArgumentParser(add_help=False)  # the arguments of `train` and `config show`
    config_args.add_argument("config", help="YAML config file")
    config_args.add_argument("--config_override", "--config-override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                             help="override config keys, e.g. lora_r=32 mrl_dims=[256,128]")

    p = sub.add_parser("train", parents=[config_args], help="fine-tune a model (same as `python run.py CONFIG`)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="retrieval metrics (Recall@k, MRR@10, nDCG@10), base vs tuned")
    p.add_argument("model", help="adapter checkpoint, merged or plain model directory")
    p.add_argument("--data", required=True, help="eval JSONL (query/positive records)")
    p.add_argument("--base", help="also evaluate this base model side by side (default: adapter's base)")
    p.add_argument("--no-base", action="store_true", help="skip the base-model column")
    p.add_argument("--corpus", help='extra corpus JSONL of {"text": ...} lines')
    p.add_argument("--dims", help="comma-separated MRL dims to report, e.g. 384,256,128")
    p.add_argument("--output", help="write metrics JSON here (a new file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--retrieval-mode", choices=["auto", "t2t", "t2i", "i2t", "i2i"], default="auto",
                   help="record fields used as query and document (auto: every field present)")
    p.set_defaults(func=_calling("vembed.inference.evaluation:evaluate_cli"))

    p = sub.add_parser("merge", help="merge_and_unload an adapter into a standalone model")
    p.add_argument("checkpoint_dir", metavar="checkpoint", help="adapter checkpoint directory")
    p.add_argument("output_dir", help="a new or empty directory")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge output in output_dir")
    p.set_defaults(func=_calling("vembed.inference.export:merge_adapter", lambda out: f"merged model written to {out}"))

    p = sub.add_parser("encode", help="embed texts or images")
    p.add_argument("model")
    p.add_argument("--text", nargs="+", default=[])
    p.add_argument("--image", nargs="+", default=[])
    p.add_argument("--dim", type=int, help="MRL truncation dim")
    p.add_argument("--output", help=".npy file (must not exist); default prints a short summary")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--json", action="store_true", help="print every value as JSON instead of a summary")
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("serve", help="OpenAI-compatible /v1/embeddings server for a model")
    p.add_argument("model_uri", metavar="model", help="model directory, s3:// URI or models:/NAME@alias")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=_calling("vembed.inference.serve:serve"))

    p = sub.add_parser("deploy", help="serve models:/NAME@alias as a KServe InferenceService (vembed serve)")
    p.add_argument("model_name", help="registered model name")
    p.add_argument("--image", required=True, help="the vembed image the predictor runs")
    p.add_argument("--alias", default="champion")
    p.add_argument("--service", dest="service_name", metavar="SERVICE", default="",
                   help="InferenceService name (default: from the model name)")
    p.add_argument("--namespace", default="", help="default: this pod's namespace, else default")
    p.add_argument("--service-account", default="", help="predictor's service account (S3 credentials)")
    p.add_argument("--canary-traffic-percent", type=int, default=100)
    p.add_argument("--timeout", dest="timeout_s", metavar="TIMEOUT", type=float, default=900.0,
                   help="seconds to wait for Ready")
    p.add_argument("--mlflow-artifacts-destination", default="",
                   help="the MLflow server's --artifacts-destination, when it proxies artifacts")
    p.add_argument("--output-dir", default="output", help="where the embedded MLflow store lives")
    p.set_defaults(func=_calling("vembed.pipeline.steps.deploy:deploy", _as_json))

    p = sub.add_parser("prepare", help="validate, dedup and split raw JSONL into a dataset directory")
    p.add_argument("raw_uri", metavar="raw", help="JSONL file, directory, or s3:// URI/prefix")
    p.add_argument("output_uri", metavar="output", help="dataset directory (local or s3://)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error")
    p.add_argument("--mine-negatives", metavar="MODEL", help="mine hard negatives into the train split with MODEL")
    p.set_defaults(func=_calling("vembed.pipeline.steps.prepare:prepare", _as_json))

    p = sub.add_parser("mine", help="mine hard negatives into a JSONL dataset with a given model")
    p.add_argument("data_path", metavar="data", help="JSONL records (query, positive, ...)")
    p.add_argument("output_path", metavar="output", help="JSONL file to write (must not exist)")
    p.add_argument("--model", required=True, help="model to mine with: HF id, directory, checkpoint or merged model")
    p.add_argument("--rank-start", type=int, default=10, help="first rank (0-based) a negative may come from")
    p.add_argument("--rank-end", type=int, default=50, help="ranks from --rank-end on are not candidates")
    p.add_argument("--num-negatives", type=int, default=1, help="negatives added per query")
    p.add_argument("--margin", type=float, default=0.95, help="skip candidates scoring above margin * positive score")
    p.add_argument("--corpus", help='extra candidate passages, JSONL of {"text": ...}')
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.set_defaults(func=_calling("vembed.data.mining:mine_file", _as_json))

    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    csub.add_parser("show", parents=[config_args], help="print the resolved config").set_defaults(func=_cmd_config_show)

    p = sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 on built-in data and print before/after metrics")
    p.add_argument("--output-dir", default="output/demo")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    p.set_defaults(func=_calling("vembed.demo:run_demo"))

    # Listed for --help only: `main` hands them their arguments before parsing.
    sub.add_parser("pipeline", help="compile, run locally, upload, submit or schedule the Kubeflow pipeline; render its RBAC")
    sub.add_parser("registry", help="show, promote or roll back models in the MLflow registry")
    return parser


# Subcommands with their own parser, handed every argument (an argparse REMAINDER would drop a
# leading option such as `vembed pipeline --help`).
DELEGATED = {"pipeline": "pipelines.cli", "registry": "vembed.registry_cli"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        args = argparse.Namespace(func=lambda _: importlib.import_module(DELEGATED[argv[0]]).main(argv[1:]))
    else:
        args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
