"""The `vembed` command. Heavy imports (torch, mlflow, kfp) happen inside handlers
so that `vembed --help` and `vembed config show` stay instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vembed.errors import VembedError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--config_override",
        "--config-override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. lora_r=32 mrl_dims=[256,128]",
    )


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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from vembed.evaluation import evaluate_cli

    return evaluate_cli(args)


def _cmd_merge(args: argparse.Namespace) -> int:
    from vembed.export import merge_adapter

    out = merge_adapter(args.checkpoint, args.output_dir)
    print(f"merged model written to {out}")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from vembed.predictor import Predictor

    if not args.text and not args.image:
        raise VembedError("encode: give --text and/or --image")
    pred = Predictor(args.model)
    parts = []
    if args.text:
        parts.append(pred.encode_text(args.text, dim=args.dim))
    if args.image:
        parts.append(pred.encode_image(args.image, dim=args.dim))
    emb = np.concatenate(parts)
    if args.output:
        np.save(args.output, emb)
        print(f"{emb.shape[0]} embeddings of dim {emb.shape[1]} written to {args.output}")
    else:
        json.dump(emb.tolist(), sys.stdout)
        print()
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from vembed.steps.prepare import prepare

    summary = prepare(
        args.raw,
        args.output,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        on_bad_record=args.on_bad_record,
        mine_negatives=args.mine_negatives,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_mine(args: argparse.Namespace) -> int:
    from vembed.data.mining import mine_file

    summary = mine_file(
        args.data,
        args.output,
        args.model,
        rank_start=args.rank_start,
        rank_end=args.rank_end,
        num_negatives=args.num_negatives,
        margin=args.margin,
        corpus=args.corpus,
        batch_size=args.batch_size,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vembed.demo import run_demo

    return run_demo(args.output_dir, minutes=args.minutes)


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vembed", description="Fine-tune embedding models with LoRA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="fine-tune a model (same as `python run.py CONFIG`)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="retrieval metrics (Recall@k, MRR@10, nDCG@10), base vs tuned")
    p.add_argument("model", help="adapter checkpoint, merged or plain model directory")
    p.add_argument("--data", required=True, help="eval JSONL (query/positive records)")
    p.add_argument("--base", help="also evaluate this base model side by side (default: adapter's base)")
    p.add_argument("--no-base", action="store_true", help="skip the base-model column")
    p.add_argument("--corpus", help='extra corpus JSONL of {"text": ...} lines')
    p.add_argument("--dims", help="comma-separated MRL dims to report, e.g. 384,256,128")
    p.add_argument("--output", help="write metrics JSON here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--retrieval-mode", choices=["auto", "t2t", "t2i", "i2t", "i2i"], default="auto",
                   help="record fields used as query and document (auto: every field present)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("merge", help="merge_and_unload an adapter into a standalone model")
    p.add_argument("checkpoint", help="adapter checkpoint directory")
    p.add_argument("output_dir")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("encode", help="embed texts or images")
    p.add_argument("model")
    p.add_argument("--text", nargs="+", default=[])
    p.add_argument("--image", nargs="+", default=[])
    p.add_argument("--dim", type=int, help="MRL truncation dim")
    p.add_argument("--output", help=".npy file; default prints JSON")
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("prepare", help="validate, dedup and split raw JSONL into a dataset directory")
    p.add_argument("raw", help="JSONL file, directory, or s3:// URI/prefix")
    p.add_argument("output", help="dataset directory (local or s3://)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error")
    p.add_argument("--mine-negatives", metavar="MODEL", help="mine hard negatives into the train split with MODEL")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("mine", help="mine hard negatives into a JSONL dataset with a given model")
    p.add_argument("data", help="JSONL records (query, positive, ...)")
    p.add_argument("output", help="JSONL file to write (must not exist)")
    p.add_argument("--model", required=True, help="model to mine with: HF id, directory, checkpoint or merged model")
    p.add_argument("--rank-start", type=int, default=10, help="first rank (0-based) a negative may come from")
    p.add_argument("--rank-end", type=int, default=50, help="ranks from --rank-end on are not candidates")
    p.add_argument("--num-negatives", type=int, default=1, help="negatives added per query")
    p.add_argument("--margin", type=float, default=0.95, help="skip candidates scoring above margin * positive score")
    p.add_argument("--corpus", help='extra candidate passages, JSONL of {"text": ...}')
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_cmd_mine)

    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    _add_config_args(show)
    show.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 on built-in data and print before/after metrics")
    p.add_argument("--output-dir", default="output/demo")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pipeline", help="compile, run locally, submit or schedule the Kubeflow pipeline", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: _delegate("pipelines.cli", a.args))

    p = sub.add_parser("registry", help="show, promote or roll back models in the MLflow registry", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: _delegate("vembed.registry_cli", a.args))
    return parser


# Subcommands with their own parser. argparse's REMAINDER drops a leading option
# (`vembed pipeline --help`), so these are handed over before parsing.
DELEGATED = {"pipeline": "pipelines.cli", "registry": "vembed.registry_cli"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module, rest = DELEGATED[argv[0]], argv[1:]
        args = argparse.Namespace(func=lambda _: _delegate(module, rest))
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VembedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
