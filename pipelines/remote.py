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


# --- pipeline versions ------------------------------------------------------------------------------
# KFP keeps uploaded pipelines with their versions. A run or recurring run can then reference a version
# instead of embedding the whole spec, and a recurring run that references only the pipeline (no
# version) starts each run from the newest version (KFP backend 2.5+, kubeflow/pipelines#11560).


@dataclass
class VersionRef:
    pipeline_id: str
    version_id: str | None  # None: the newest version when each run starts (recurring runs only)
    pipeline_name: str = ""
    version_name: str = ""


@dataclass
class Uploaded:
    pipeline_id: str
    pipeline_name: str
    version_id: str
    version_name: str
    created_pipeline: bool  # False: a version was added to an existing pipeline
    reused: bool  # True: this very package was uploaded before, under the same version name
    url: str


def default_version_name(package: str | os.PathLike[str]) -> str:
    """`<vembed version>-<12 hex of the package's sha256>`: the same package always gets the same name."""
    import hashlib

    from vembed import __version__

    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]
    return f"{__version__}-{digest}"


def _filter(key: str, value: str) -> str:
    import json

    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


def _quiet(fn, *args, **kwargs):
    """kfp.Client's upload calls print a link to stdout; the CLI prints its own line instead."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _find_version(client, host: str, pipeline_id: str, name: str):
    listed = _call(
        "listing pipeline versions", host, client.list_pipeline_versions, pipeline_id,
        page_size=1, filter=_filter("display_name", name),
    )  # fmt: skip
    versions = listed.pipeline_versions or []
    return versions[0] if versions else None


def _newest_version(client, host: str, pipeline_id: str):
    listed = _call(
        "listing pipeline versions", host, client.list_pipeline_versions, pipeline_id,
        page_size=1, sort_by="created_at desc",
    )  # fmt: skip
    versions = listed.pipeline_versions or []
    if not versions:
        raise SubmitError(f"pipeline {pipeline_id} on {host} has no versions; upload one with `vembed pipeline upload`")
    return versions[0]


def _pipeline_id(client, host: str, pipeline_name: str) -> str | None:
    return _call(f"looking up pipeline {pipeline_name!r}", host, client.get_pipeline_id, pipeline_name)


def _upload(client, host: str, package: str | os.PathLike[str], pipeline_name: str, version_name: str | None,
            description: str | None, namespace: str | None) -> Uploaded:  # fmt: skip
    version_name = version_name or default_version_name(package)
    base = host.rstrip("/")
    pipeline_id = _pipeline_id(client, host, pipeline_name)
    if pipeline_id is None:
        # Creating a pipeline also creates its first version (named like the pipeline).
        pipeline = _quiet(
            _call, "uploading the pipeline", host, client.upload_pipeline, str(Path(package)),
            pipeline_name=pipeline_name, description=description, namespace=namespace,
        )  # fmt: skip
        version = _newest_version(client, host, pipeline.pipeline_id)
        return Uploaded(
            pipeline.pipeline_id, pipeline_name, version.pipeline_version_id, version.display_name, True, False,
            f"{base}/#/pipelines/details/{pipeline.pipeline_id}/version/{version.pipeline_version_id}",
        )  # fmt: skip
    existing = _find_version(client, host, pipeline_id, version_name)
    if existing is not None:  # same content (default name) or an explicit name given twice
        return Uploaded(
            pipeline_id, pipeline_name, existing.pipeline_version_id, version_name, False, True,
            f"{base}/#/pipelines/details/{pipeline_id}/version/{existing.pipeline_version_id}",
        )  # fmt: skip
    version = _quiet(
        _call, "uploading the pipeline version", host, client.upload_pipeline_version, str(Path(package)),
        version_name, pipeline_id=pipeline_id, description=description,
    )  # fmt: skip
    return Uploaded(
        pipeline_id, pipeline_name, version.pipeline_version_id, version_name, False, False,
        f"{base}/#/pipelines/details/{pipeline_id}/version/{version.pipeline_version_id}",
    )  # fmt: skip


def upload(
    host: str,
    package: str | os.PathLike[str],
    pipeline_name: str = "lora-finetune",
    version_name: str | None = None,
    description: str | None = None,
    namespace: str | None = None,
) -> Uploaded:
    """Create the pipeline `pipeline_name` from `package`, or add `package` to it as a new version.

    Uploading the same package again returns the existing version (the default version name is
    derived from the package's content), so `upload` is safe to repeat in CI."""
    client = _client(host, namespace)
    return _upload(client, host, package, pipeline_name, version_name, description, namespace)


def resolve_version(
    client, host: str, pipeline_name: str, version_id: str | None, pipeline_id: str | None = None
) -> VersionRef:
    """A version of the pipeline: `version_id`, or the newest for "latest"."""
    pid = pipeline_id or _pipeline_id(client, host, pipeline_name)
    if not pid:
        raise SubmitError(f"no pipeline named {pipeline_name!r} on {host}; create it with `vembed pipeline upload`")
    if version_id in (None, "", "latest"):
        version = _newest_version(client, host, pid)
    else:
        version = _call(f"reading pipeline version {version_id}", host, client.get_pipeline_version, pid, version_id)
    return VersionRef(pid, version.pipeline_version_id, pipeline_name, version.display_name or "")


def version_parameters(client, host: str, ref: VersionRef) -> dict:
    """The run parameters (`read_pipeline_parameters` format) of an uploaded version."""
    from pipelines.params import parameters_from_spec

    version = _call(
        f"reading pipeline version {ref.version_id}", host, client.get_pipeline_version, ref.pipeline_id, ref.version_id
    )
    spec = version.pipeline_spec or {}
    spec = spec.get("pipeline_spec", spec)  # a spec with a platform spec is wrapped
    return parameters_from_spec(spec, f"pipeline version {ref.version_id} on {host}")


def submit_version(
    host: str,
    ref: VersionRef,
    arguments: dict[str, Any],
    experiment: str = "vembed",
    run_name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    client=None,
) -> Submitted:
    """One run of an uploaded pipeline version."""
    client = client or _client(host, namespace)
    exp = _call("creating the experiment", host, client.create_experiment, name=experiment, namespace=namespace)
    name = run_name or _default_name("lora-finetune")
    run = _call(
        "creating the run", host, client.run_pipeline, exp.experiment_id, name, params=arguments,
        pipeline_id=ref.pipeline_id, version_id=ref.version_id, service_account=service_account,
    )  # fmt: skip
    return Submitted("run", run.run_id, name, exp.experiment_id, f"{host.rstrip('/')}/#/runs/details/{run.run_id}")


def find_recurring_runs(client, host: str, experiment_id: str, name: str) -> list:
    listed = _call(
        "listing recurring runs", host, client.list_recurring_runs, experiment_id=experiment_id,
        page_size=100, filter=_filter("display_name", name),
    )  # fmt: skip
    return [r for r in (listed.recurring_runs or []) if r.display_name == name]


def _create_recurring_run_on_version(
    client, host: str, experiment_id: str, name: str, cron: str, ref: VersionRef, arguments: dict[str, Any],
    service_account: str | None,
):  # fmt: skip
    """POST /recurringruns with a pipeline_version_reference; without a version id it follows the newest.

    kfp.Client.create_recurring_run insists on both ids, so the request is built here from the
    kfp_server_api models that client uses."""
    import kfp_server_api as api

    body = api.V2beta1RecurringRun(
        display_name=name,
        experiment_id=experiment_id,
        pipeline_version_reference=api.V2beta1PipelineVersionReference(
            pipeline_id=ref.pipeline_id, pipeline_version_id=ref.version_id
        ),
        runtime_config=api.V2beta1RuntimeConfig(parameters=arguments),
        trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=cron)),
        max_concurrency=1,
        no_catchup=True,
        mode=api.RecurringRunMode.ENABLE,
        service_account=service_account,
    )
    return _call(
        "creating the recurring run", host, client._recurring_run_api.recurring_run_service_create_recurring_run, body
    )


def schedule_version(
    host: str,
    ref: VersionRef,
    arguments: dict[str, Any],
    cron: str | None,
    experiment: str = "vembed",
    name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    update: bool = False,
    client=None,
) -> Submitted:
    """A recurring run on an uploaded version (`ref.version_id`), or on the newest version at each run
    (`ref.version_id` None). Same policy as `schedule`: one at a time, no backfill.

    `update`: re-point the recurring run(s) named `name` in `experiment` at `ref`. The KFP v2beta1 API
    has no update call for recurring runs (RecurringRunService: Create, Get, List, Enable, Disable,
    Delete), so this takes three: disable the old one, create the new one (cron and parameters default
    to the old one's), delete the old one. If creating fails, the old one is enabled again.
    """
    client = client or _client(host, namespace)
    job_name = name or "lora-finetune retraining"
    exp = _call("creating the experiment", host, client.create_experiment, name=experiment, namespace=namespace)
    old = find_recurring_runs(client, host, exp.experiment_id, job_name)
    if old and not update:
        raise SubmitError(
            f"a recurring run named {job_name!r} already exists in experiment {experiment!r}; "
            "pass --update to point it at this pipeline version, or choose another --name"
        )
    if old:
        previous = old[0]
        if cron is None and previous.trigger and previous.trigger.cron_schedule:
            cron = previous.trigger.cron_schedule.cron
        carried = dict((previous.runtime_config.parameters or {}) if previous.runtime_config else {})
        arguments = {**carried, **arguments}
        service_account = service_account or previous.service_account
    if not cron:
        raise SubmitError("--cron is required (no existing recurring run to take it from)")
    cron = validate_cron(cron)
    for rr in old:
        _call(f"disabling recurring run {rr.recurring_run_id}", host, client.disable_recurring_run, rr.recurring_run_id)
    try:
        job = _create_recurring_run_on_version(
            client, host, exp.experiment_id, job_name, cron, ref, arguments, service_account
        )
    except SubmitError:
        for rr in old:  # leave the schedule as it was
            if rr.status == "ENABLED":
                _call(f"re-enabling recurring run {rr.recurring_run_id}", host, client.enable_recurring_run,
                      rr.recurring_run_id)  # fmt: skip
        raise
    for rr in old:
        _call(f"deleting recurring run {rr.recurring_run_id}", host, client.delete_recurring_run, rr.recurring_run_id)
    return Submitted(
        "recurring run",
        job.recurring_run_id,
        job_name,
        exp.experiment_id,
        f"{host.rstrip('/')}/#/recurringrun/details/{job.recurring_run_id}",
    )
