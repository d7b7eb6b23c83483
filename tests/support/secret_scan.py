"""Look for secret values everywhere a run could have written them: files, S3 objects, MLflow records.

Substring search on raw bytes (a secret inside a longer value or a log line counts), so a leak is found
in whatever form it took: a config file, a log, a JSON executor output, a sqlite page, an artifact.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def hits(data: bytes, secrets: Iterable[str]) -> list[str]:
    return [s for s in secrets if s.encode() in data]


def scan_files(root: Path, secrets: Iterable[str]) -> tuple[list[str], int]:
    """(["path: secret", ...], number of files read) for every file under `root`."""
    secrets = list(secrets)
    found, n = [], 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            n += 1
            found += [f"{path}: {s}" for s in hits(path.read_bytes(), secrets)]
    return found, n


def s3_keys(client, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


def scan_s3(client, bucket: str, keys: Iterable[str], secrets: Iterable[str]) -> list[str]:
    secrets = list(secrets)
    found = []
    for key in sorted(keys):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        found += [f"s3://{bucket}/{key}: {s}" for s in hits(body, secrets)]
    return found


def mlflow_run_ids(uri: str) -> set[str]:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return {r.info.run_id for r in client.search_runs(ids, run_view_type=ViewType.ALL, max_results=50000)}


def mlflow_records(uri: str, run_ids: Iterable[str], model_names: Iterable[str]) -> dict[str, Any]:
    """Everything the tracking server keeps about these runs and registered models, as plain data:
    runs (params, tags, metric names, inputs), their logged models, registered models and versions."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    out: dict[str, Any] = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        out[f"run {run_id}"] = run.to_dictionary()
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
        out[f"logged models of {run_id}"] = [m.to_dictionary() for m in models if m.source_run_id == run_id]
    for name in model_names:
        registered = client.get_registered_model(name)
        out[f"model {name}"] = {"tags": registered.tags, "aliases": registered.aliases,
                                "description": registered.description}  # fmt: skip
        out[f"versions of {name}"] = [dict(v) for v in client.search_model_versions(f"name = '{name}'")]
    return out


def scan_records(records: Mapping[str, Any], secrets: Iterable[str]) -> list[str]:
    secrets = list(secrets)
    return [f"MLflow {where}: {s}" for where, value in records.items()
            for s in hits(json.dumps(value, default=str).encode(), secrets)]  # fmt: skip
