"""`vembed pipeline compile | run --local | upload | submit | schedule | rbac`.

`vembed/cli.py` hands everything after `vembed pipeline` to `main(argv)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

from vembed.errors import ConfigError, run_command


def _run_arguments(args: argparse.Namespace, spec: dict | None = None, required: bool = True) -> dict:
    """--param and --config-override as typed run arguments of `spec` (default: --package's parameters);
    `required`: every parameter without a default must be given."""
    from pipelines.params import check_required, parse_params, read_pipeline_parameters
    from vembed.config import parse_overrides

    spec = spec or read_pipeline_parameters(args.package)
    arguments = parse_params(args.param, spec)
    if args.config_override:
        if "config_overrides" in arguments:
            raise ConfigError("give training overrides either with --config-override or --param config_overrides")
        parse_overrides(args.config_override)  # a bad key fails here, not on the cluster after prepare has run
        arguments["config_overrides"] = list(args.config_override)
    if required:
        check_required(arguments, spec)
    return arguments


def _cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.compile import COMPILED_PATH, compile_pipeline
    from pipelines.lora_finetune import PipelineOptions
    from vembed.config import parse_pairs

    if args.accelerator_limit and args.train_backend not in (None, "local"):
        raise ConfigError(
            f"--gpus sets the train pod's GPUs; with --train-backend {args.train_backend} that pod only launches "
            "the job, whose GPUs come from trainer.gpus_per_node in the training config"
        )
    # The flags' dests are PipelineOptions fields; None (not given) keeps the VEMBED_* variable or the default.
    given = {f.name: getattr(args, f.name, None) for f in fields(PipelineOptions)}
    given["node_selector"] = parse_pairs(args.node_selector, "--node-selector", lambda _, v: v, lambda _: None, "label")
    given["tolerations"] = [_json_object("--toleration", text) for text in args.toleration]
    opts = PipelineOptions.from_env(**{k: v for k, v in given.items() if v not in ([], {})})
    out = compile_pipeline(args.output or COMPILED_PATH, PipelineOptions() if args.defaults else opts)
    print(f"compiled pipeline written to {out}")
    return 0


def _json_object(flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):  # `[1]` or `"x"` parse, then fail deep inside the compiler
        raise ConfigError(f"{flag}: expected a JSON object, got {text!r}")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.local_run import print_result, run_local
    from vembed.config import parse_overrides

    if not args.local:
        raise ConfigError("`vembed pipeline run` runs on this machine and needs --local; use `submit --host` for a cluster")
    parse_overrides(args.config_override)  # a bad key fails now, not in the train step after prepare has run
    result = run_local(
        output_dir=args.output_dir,
        data_uri=args.data,
        config_path=args.config,
        params=args.param,
        verbose=args.verbose,
        base_model=args.base_model,
        config_overrides=args.config_override,
        registered_model_name=args.model_name,
        promotion_metric=args.promotion_metric,
        min_delta=args.min_delta,
    )
    print_result(result)
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    from pipelines.remote import Kfp

    up = Kfp(args.host, args.namespace).upload(args.package, args.pipeline, args.version_name, args.description)
    what = "created pipeline" if up.created_pipeline else ("already uploaded:" if up.reused else "added version to")
    print(f"{what} {up.pipeline_name} ({up.pipeline_id}); version {up.version_name} id {up.version_id}: {up.url}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.remote import Kfp

    ref = None
    if args.pipeline_version_id:
        kfp = Kfp(args.host, args.namespace)
        ref = kfp.resolve_version(args.pipeline, args.pipeline_version_id)
        arguments = _run_arguments(args, kfp.version_parameters(ref))
    else:
        arguments = _run_arguments(args)  # checked before any request
        kfp = Kfp(args.host, args.namespace)
    sub = kfp.submit(ref or args.package, arguments, args.experiment, args.run_name, args.service_account)
    what = f"of {ref.pipeline_name} version {ref.version_id}" if ref else f"in experiment {sub.experiment_id}"
    print(f"submitted run {sub.id} ({sub.name}) {what}: {sub.url}")
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.cron import validate_cron
    from pipelines.remote import Kfp

    if args.cron:
        validate_cron(args.cron)  # before any request
    if args.follow_latest and args.pipeline_version_id:
        raise ConfigError("--follow-latest and --pipeline-version-id exclude each other")
    versioned = args.pipeline_version_id or args.follow_latest or args.update
    if not versioned and not args.cron:
        raise ConfigError("--cron is required")
    # With --update, parameters left out keep the existing recurring run's values.
    arguments = _run_arguments(args, required=not args.update)
    data_uri = str(arguments.get("data_uri", ""))
    if "dt=" in data_uri and not data_uri.rstrip("/").endswith("latest"):
        print(
            f"warning: data_uri {data_uri} names one snapshot, so every scheduled run retrains on the same data; "
            "point it at the prefix's /latest to pick up new snapshots",
            file=sys.stderr,
        )
    kfp = Kfp(args.host, args.namespace)
    if not versioned:
        sub = kfp.schedule(args.package, arguments, args.cron, args.experiment, args.name, args.service_account)
        print(f"scheduled recurring run {sub.id} ({sub.name}, cron '{args.cron}'): {sub.url}")
        return 0
    if args.pipeline_version_id:
        ref = kfp.resolve_version(args.pipeline, args.pipeline_version_id)
    else:  # upload --package (a no-op when this exact package is there already)
        up = kfp.upload(args.package, args.pipeline)
        print(f"pipeline {up.pipeline_name} version {up.version_name} ({up.version_id})"
              f"{' was already uploaded' if up.reused else ' uploaded'}")  # fmt: skip
        ref = replace(up, version_id=None) if args.follow_latest else up
    sub = kfp.schedule_version(
        ref, arguments, args.cron, args.experiment, args.name, args.service_account, update=args.update
    )
    target = "the newest version at each run" if ref.version_id is None else f"version {ref.version_id}"
    verb = "re-pointed" if args.update else "scheduled"
    print(f"{verb} recurring run {sub.id} ({sub.name}) on {ref.pipeline_name} {target}: {sub.url}")
    return 0


def _cmd_rbac(args: argparse.Namespace) -> int:
    from pipelines.rbac_render import BACKEND_GROUPS, render_rbac_yaml
    from vembed.artifacts.atomic_dir import check_output_file

    text = render_rbac_yaml(args.namespace, args.service_account, args.backend or tuple(BACKEND_GROUPS))
    if args.output:
        check_output_file(Path(args.output), args.overwrite)  # never replace a file of the user's unasked
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"RBAC for namespace {args.namespace} written to {args.output}")
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pipelines.compile import COMPILED_PATH
    from pipelines.lora_finetune import DEFAULT_MODEL_NAME, PIPELINE_NAME, TRAIN_BACKENDS
    from pipelines.rbac_render import BACKEND_GROUPS

    server = argparse.ArgumentParser(add_help=False)  # the arguments of upload, submit and schedule
    server.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    server.add_argument("--namespace", help="Kubernetes namespace (multi-user KFP)")
    server.add_argument("--package", default=str(COMPILED_PATH), help="compiled pipeline YAML (default: committed)")
    server.add_argument("--pipeline", default=PIPELINE_NAME, help="the uploaded pipeline's name")
    params = argparse.ArgumentParser(add_help=False)  # the arguments of run, submit and schedule
    params.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="pipeline run parameter, repeatable (e.g. --param data_uri=s3://bucket/data/latest)",
    )  # fmt: skip
    params.add_argument(
        "--config-override", "--config_override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="training config overrides, e.g. lora_r=32 epochs=2 (sets the config_overrides parameter)",
    )  # fmt: skip
    remote = argparse.ArgumentParser(add_help=False, parents=[server, params])  # the arguments of submit and schedule
    remote.add_argument("--experiment", default="vembed", help="experiment name (created if missing)")
    remote.add_argument("--service-account", help="Kubernetes service account for the run's pods")
    remote.add_argument(
        "--pipeline-version-id", metavar="ID",
        help="run an uploaded pipeline version (`vembed pipeline upload`) instead of sending --package; "
        "'latest' picks the newest",
    )  # fmt: skip

    parser = argparse.ArgumentParser(prog="vembed pipeline", description="The lora-finetune Kubeflow pipeline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("compile", help="write the KFP IR YAML (default: pipelines/compiled/lora_finetune.yaml)")
    p.add_argument("--output", help="where to write the YAML")
    p.add_argument("--image", help="default image of the CPU steps (env VEMBED_IMAGE)")
    p.add_argument("--train-image", help="default image of train/evaluate/merge (env VEMBED_TRAIN_IMAGE)")
    p.add_argument("--gpus", type=int, dest="accelerator_limit", help="GPUs for the train step, 0 for none (env VEMBED_GPUS; default 1)")
    p.add_argument("--gpu-type", dest="accelerator_type", help="accelerator resource (env VEMBED_GPU_TYPE; default nvidia.com/gpu)")
    p.add_argument("--node-selector", action="append", default=[], metavar="LABEL=VALUE", help="train pod")
    p.add_argument("--toleration", action="append", default=[], metavar="JSON", help="train pod, e.g. "
                   '\'{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}\'')
    p.add_argument("--model-cache-pvc", help="PVC mounted as the Hugging Face cache (env VEMBED_MODEL_CACHE_PVC)")
    p.add_argument(
        "--train-backend", choices=TRAIN_BACKENDS,
        help="local: train in the train pod (default); trainjob / pytorchjob: the train pod launches a Kubeflow "
        "job and requests no GPU; resources, --node-selector and --toleration go to the job's nodes "
        "(env VEMBED_TRAIN_BACKEND; docs/multinode.md)",
    )  # fmt: skip
    p.add_argument("--evaluate-gpus", type=int, dest="evaluate_accelerator_limit", help="GPUs for the evaluate step (env VEMBED_EVALUATE_GPUS; default 0)")
    p.add_argument(
        "--image-pull-secret", action="append", default=[], metavar="NAME", dest="image_pull_secrets",
        help="docker-registry secret for every pod and the cluster job's pods, repeatable "
        "(env VEMBED_IMAGE_PULL_SECRETS, comma-separated)",
    )  # fmt: skip
    p.add_argument("--no-exit-handler", action="store_false", dest="exit_handler", default=None,
                   help="no on-exit cleanup/failure task: for KFP backends before 2.14 (docs/compatibility.md)")
    p.add_argument("--no-security-context", action="store_false", dest="security_context", default=None,
                   help="no securityContext in the platform spec: for KFP backends that predate it (docs/compatibility.md)")
    p.add_argument("--defaults", action="store_true", help="ignore flags and env: the committed settings")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("run", parents=[params], help="run the whole pipeline on this machine (kfp.local)")
    p.add_argument("--local", action="store_true", help="required: run with kfp.local subprocesses")
    p.add_argument("--output-dir", default="output/pipeline", help="artifacts, MLflow store and logs")
    p.add_argument("--data", help="raw JSONL file, folder or s3:// URI (default: the built-in demo data)")
    p.add_argument("--base-model", help="model id or directory (default: the training config's model_name)")
    p.add_argument("--config", help="training config YAML (default with the demo data: examples/minilm_demo.yaml)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="registered model name")
    p.add_argument("--promotion-metric", default="ndcg@10")
    p.add_argument("--min-delta", type=float, default=0.0)
    p.add_argument("--verbose", action="store_true", help="stream every step's output")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("upload", parents=[server], help="create the pipeline on a KFP cluster, or add --package as a new version")
    p.add_argument("--version-name", help="default: <vembed version>-<sha256 of the package, 12 hex>")
    p.add_argument("--description")
    p.set_defaults(func=_cmd_upload)

    p = sub.add_parser("submit", parents=[remote], help="start one run on a KFP cluster")
    p.add_argument("--run-name")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("schedule", parents=[remote], help="create a recurring run (retraining) on a KFP cluster")
    p.add_argument("--cron", help="KFP cron, 6 fields with seconds first: '0 0 3 * * *' (kept by --update)")
    p.add_argument("--name", help="recurring run name")
    p.add_argument(
        "--follow-latest", action="store_true",
        help="upload --package and reference the pipeline without a version: every run starts from the "
        "newest uploaded version (KFP backend 2.5+)",
    )  # fmt: skip
    p.add_argument(
        "--update", action="store_true",
        help="re-point the recurring run --name at --pipeline-version-id (default: upload --package as a "
        "new version); cron and parameters not given are kept",
    )  # fmt: skip
    p.set_defaults(func=_cmd_schedule)

    p = sub.add_parser("rbac", help="print the RBAC a cluster train backend needs, for one namespace")
    p.add_argument("--namespace", required=True, help="where the pipeline runs")
    p.add_argument("--service-account", default="pipeline-runner",
                   help="the pipeline pods' service account (multi-user Kubeflow profiles: default-editor)")
    p.add_argument("--backend", action="append", choices=tuple(BACKEND_GROUPS),
                   help="only this backend's rights (repeatable; default both)")
    p.add_argument("--output", help="write to this file instead of stdout (then `kubectl apply -f FILE`); a new file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=_cmd_rbac)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))
