"""Submit a compiled pipeline to a KFP API server, once or on a schedule."""

from __future__ import annotations

import datetime
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.cron import validate_cron
from vembed.errors import VembedError

PREFLIGHT_TIMEOUT_S = 15


class SubmitError(VembedError):
    """The KFP API server refused or could not be reached."""


@dataclass
class Submitted:
    kind: str  # "run" or "recurring run"
    id: str
    name: str
    experiment_id: str
    url: str


def _preflight(host: str, token: str | None) -> None:
    """One quick health check, so a wrong host fails in seconds with one line (kfp.Client would retry
    its own health check for ~25 s and log tracebacks)."""
    request = urllib.request.Request(f"{host}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=PREFLIGHT_TIMEOUT_S):
            return
    except urllib.error.HTTPError as e:
        hint = " (set KFP_TOKEN to a bearer token the API accepts)" if e.code in (401, 403) else ""
        raise SubmitError(f"KFP API at {host} answered HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SubmitError(f"cannot reach the KFP API at {host}: {reason}") from None


def _client(host: str, namespace: str | None):
    import kfp

    if not host.startswith(("http://", "https://")):
        raise SubmitError(f"--host {host!r}: expected an http(s):// URL of the KFP API, e.g. http://localhost:8080")
    host = host.rstrip("/")
    token = os.environ.get("KFP_TOKEN")  # e.g. a service-account or OIDC token; never a flag, never logged
    _preflight(host, token)
    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if token:
        kwargs["existing_token"] = token
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline v2")
        return kfp.Client(**kwargs)


def _call(what: str, host: str, fn, *args, **kwargs):
    """Run a kfp.Client call, turning transport and API errors into one line."""
    try:
        return fn(*args, **kwargs)
    except VembedError:
        raise
    except Exception as e:  # urllib3 / kfp_server_api raise many types; all mean "the server said no"
        status = getattr(e, "status", None)
        reason = getattr(e, "reason", None) or str(e).splitlines()[0]
        detail = f"HTTP {status} {reason}" if status else reason
        raise SubmitError(f"{what} on {host} failed: {detail}") from None


def _default_name(prefix: str) -> str:
    return f"{prefix} {datetime.datetime.now().strftime('%Y-%m-%d %H-%M-%S')}"


def submit(
    host: str,
    package: str | os.PathLike[str],
    arguments: dict[str, Any],
    experiment: str = "vembed",
    run_name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> Submitted:
    """One run of `package` via `kfp.Client.create_run_from_pipeline_package`."""
    client = _client(host, namespace)
    name = run_name or _default_name("lora-finetune")
    result = _call(
        "creating the run",
        host,
        client.create_run_from_pipeline_package,
        str(Path(package)),
        arguments=arguments,
        run_name=name,
        experiment_name=experiment,
        namespace=namespace,
        service_account=service_account,
    )
    run = result.run_info
    return Submitted("run", run.run_id, name, run.experiment_id, f"{host.rstrip('/')}/#/runs/details/{run.run_id}")


def schedule(
    host: str,
    package: str | os.PathLike[str],
    arguments: dict[str, Any],
    cron: str,
    experiment: str = "vembed",
    name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> Submitted:
    """A recurring run: one at a time (max_concurrency=1), no backfill of missed slots (no_catchup)."""
    cron = validate_cron(cron)
    client = _client(host, namespace)
    exp = _call("creating the experiment", host, client.create_experiment, name=experiment, namespace=namespace)
    job_name = name or "lora-finetune retraining"
    job = _call(
        "creating the recurring run",
        host,
        client.create_recurring_run,
        experiment_id=exp.experiment_id,
        job_name=job_name,
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=arguments,
        pipeline_package_path=str(Path(package)),
        enabled=True,
        service_account=service_account,
    )
    return Submitted(
        "recurring run",
        job.recurring_run_id,
        job_name,
        exp.experiment_id,
        f"{host.rstrip('/')}/#/recurringrun/details/{job.recurring_run_id}",
    )
