"""`vembed registry show|promote|rollback`: inspect and move the champion alias by hand."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from vembed.errors import VembedError, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vembed registry",
        description="Show, promote or roll back models in the MLflow registry "
        "(MLFLOW_TRACKING_URI, else the sqlite store under --output-dir).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output-dir", default="output", help="where the embedded store lives")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("name")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("show", parents=[common], help="versions, aliases and metrics of a registered model")
    sub.add_parser("promote", parents=[common], help="make VERSION the champion (no gate)").add_argument("version")
    p = sub.add_parser(
        "rollback", parents=[common], help="move champion back to the previous champion (and its InferenceService)"
    )
    p.add_argument("--no-serving", action="store_true", help="move only the alias, leave the InferenceService")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the service to be Ready")
    return parser


def _format_show(info: dict) -> str:
    lines = [f"model {info['name']}"]
    for v in info["versions"]:
        score = f"{v['score']:.4f}" if v["score"] is not None else "-"
        ids = f"eval set {(v['eval_set_sha256'] or '-')[:12]}  run {(v['run_id'] or '-')[:12]}"
        lines.append(f"  v{v['version']:<4} {','.join(v['aliases']) or '-':<21} {v['metric'] or '-'} {score:<7} {ids}")
    return "\n".join([*lines, f"champion history: {' -> '.join(f'v{v}' for v in info['champion_history']) or 'none'}"])


def _run(args: argparse.Namespace) -> int:
    from vembed.artifacts.mlflow_store import resolve_tracking_uri
    from vembed.artifacts.registry import Registry

    # Every command here needs a model that is already registered: never create a store.
    registry = Registry(resolve_tracking_uri(args.output_dir, create=False))
    if args.command == "show":
        info = registry.show(args.name)
        print(json.dumps(info, indent=2) if args.json else _format_show(info))
        return 0
    decision = registry.promote(args.name, args.version) if args.command == "promote" else registry.rollback(args.name)
    text = f"{decision.model_name}: champion is now v{decision.version} ({decision.reason})"
    print(json.dumps(dataclasses.asdict(decision), indent=2) if args.json else text)
    if args.command == "rollback" and not args.no_serving:
        return _rollback_serving(registry, args)
    return 0


def _rollback_serving(registry, args: argparse.Namespace) -> int:
    """Point the InferenceService the last deploy recorded back at the (rolled back) champion.
    When the cluster cannot be reached, print the exact command that does it."""
    from vembed.pipeline.steps.deploy import deploy, deploy_command, last_deployment

    if (where := last_deployment(registry, args.name)) is None:
        return 0  # never deployed: only the alias to move
    opts = {k: where.get(k) for k in ("service_account", "mlflow_artifacts_destination")}
    svc, ns, image = where["service"], where["namespace"], where["image"]
    try:
        result = deploy(args.name, image, service_name=svc, namespace=ns, timeout_s=args.timeout, output_dir=args.output_dir, **opts)
    except VembedError as e:
        print(f"error: InferenceService {ns}/{svc} not updated: {e}", file=sys.stderr)
        print(f"to point it at the champion, run: {deploy_command(args.name, svc, ns, image, **opts)}", file=sys.stderr)
        return 2
    print(f"InferenceService {result['namespace']}/{result['service']} serves v{result['version']} ({result['revision']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    return run_command(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
