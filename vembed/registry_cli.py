"""`vembed registry show|promote|rollback`: inspect and move the champion alias by hand."""

from __future__ import annotations

import argparse
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("show", parents=[common], help="versions, aliases and metrics of a registered model")
    p.add_argument("name")
    p = sub.add_parser("promote", parents=[common], help="make VERSION the champion (no gate)")
    p.add_argument("name")
    p.add_argument("version")
    p = sub.add_parser(
        "rollback", parents=[common], help="move champion back to the previous champion (and its InferenceService)"
    )
    p.add_argument("name")
    p.add_argument("--no-serving", action="store_true", help="move only the alias, leave the InferenceService")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the service to be Ready")
    return parser


def _format_show(info: dict) -> str:
    lines = [f"model {info['name']}"]
    rows = [("version", "aliases", "metric", "score", "eval set", "run")]
    for v in info["versions"]:
        rows.append(
            (
                v["version"],
                ",".join(v["aliases"]) or "-",
                v["metric"] or "-",
                f"{v['score']:.4f}" if v["score"] is not None else "-",
                (v["eval_set_sha256"] or "-")[:12],
                (v["run_id"] or "-")[:12],
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines += [
        "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    history = " -> ".join(f"v{v}" for v in info["champion_history"]) or "none"
    lines.append(f"champion history: {history}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)

    def run() -> int:
        from vembed.registry import Registry, require_existing_store, resolve_tracking_uri

        # Every command here needs a model that is already registered: never create a store.
        uri = resolve_tracking_uri(args.output_dir, create=False)
        require_existing_store(uri)
        registry = Registry(uri)
        if args.command == "show":
            info = registry.show(args.name)
            print(json.dumps(info, indent=2) if args.json else _format_show(info))
            return 0
        if args.command == "promote":
            decision = registry.promote(args.name, args.version)
        else:
            decision = registry.rollback(args.name)
        if args.json:
            print(json.dumps(decision.to_dict(), indent=2))
        else:
            print(f"{decision.model_name}: champion is now v{decision.version} ({decision.reason})")
        if args.command == "rollback" and not args.no_serving:
            return _rollback_serving(registry, args)
        return 0

    return run_command(run)


def _rollback_serving(registry, args: argparse.Namespace) -> int:
    """Point the InferenceService the last deploy recorded back at the (rolled back) champion.
    When the cluster cannot be reached, print the exact command that does it."""
    from vembed.steps.deploy import deploy, deploy_command, last_deployment

    where = last_deployment(registry, args.name)
    if where is None:
        return 0  # never deployed: only the alias to move
    options = {
        "service_account": where.get("service_account"),
        "mlflow_artifacts_destination": where.get("mlflow_artifacts_destination"),
    }
    try:
        result = deploy(
            args.name,
            where["image"],
            service_name=where["service"],
            namespace=where["namespace"],
            timeout_s=args.timeout,
            output_dir=args.output_dir,
            **options,
        )
    except VembedError as e:
        command = deploy_command(args.name, where["service"], where["namespace"], where["image"], **options)
        print(f"error: InferenceService {where['namespace']}/{where['service']} not updated: {e}", file=sys.stderr)
        print(f"to point it at the champion, run: {command}", file=sys.stderr)
        return 2
    print(f"InferenceService {result['namespace']}/{result['service']} serves v{result['version']} ({result['revision']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
