"""Upload a compiled pipeline to a KFP API server and start it once or on a schedule.

KFP keeps uploaded pipelines with their versions. A run or recurring run can reference a version instead
of embedding the whole spec, and a recurring run that references only the pipeline (no version) starts
each run from the newest version (KFP backend 2.5+, kubeflow/pipelines#11560).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import operator
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any

from pipelines.cron import validate_cron
from pipelines.params import parameters_from_spec
from vembed import __version__
from vembed.artifacts.integrity import sha256_file
from vembed.errors import VembedError

PREFLIGHT_TIMEOUT_S = 15
RETRAINING = "lora-finetune retraining"  # default recurring run name


class SubmitError(VembedError):
    """The KFP API server refused or could not be reached."""


@dataclass
class Submitted:
    id: str
    name: str
    experiment_id: str
    url: str


@dataclass
class VersionRef:
    pipeline_id: str
    version_id: str | None  # None: the newest version when each run starts (recurring runs only)
    pipeline_name: str = ""
    version_name: str = ""


@dataclass
class Uploaded(VersionRef):
    created_pipeline: bool = False  # False: a version was added to an existing pipeline
    reused: bool = False  # True: this very package was uploaded before, under the same version name
    url: str = ""


def default_version_name(package: str | os.PathLike[str]) -> str:
    """`<vembed version>-<12 hex of the package's sha256>`: the same package always gets the same name."""
    return f"{__version__}-{sha256_file(package)[:12]}"


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
        raise SubmitError(f"cannot reach the KFP API at {host}: {getattr(e, 'reason', e)}") from None


def _filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


class Kfp:
    """A `kfp.Client` for one API server; every failed call becomes one line naming what it was doing."""

    def __init__(self, host: str, namespace: str | None = None) -> None:
        import kfp

        if not host.startswith(("http://", "https://")):
            raise SubmitError(f"--host {host!r}: expected an http(s):// URL of the KFP API, e.g. http://localhost:8080")
        parts = urllib.parse.urlsplit(host)
        if "@" in parts.netloc:  # never echoed: every message below names the host
            shown = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
            raise SubmitError(f"--host {shown}: credentials in the URL are not supported; set KFP_TOKEN to a bearer token")
        self.host, self.namespace = host.rstrip("/"), namespace
        token = os.environ.get("KFP_TOKEN")  # e.g. a service-account or OIDC token; never a flag, never logged
        _preflight(self.host, token)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline v2")
            self.client = kfp.Client(host=self.host, namespace=namespace or "kubeflow", existing_token=token)

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """`kfp.Client.<method>(...)`; transport and API errors become one SubmitError line."""
        try:
            # The upload calls print a link to stdout; the CLI prints its own line instead.
            with contextlib.redirect_stdout(io.StringIO()):
                return operator.attrgetter(method)(self.client)(*args, **kwargs)
        except Exception as e:  # urllib3 / kfp_server_api raise many types; all mean "the server said no"
            status = getattr(e, "status", None)
            reason = getattr(e, "reason", None) or str(e).splitlines()[0]
            raise SubmitError(f"{what} on {self.host} failed: {f'HTTP {status} {reason}' if status else reason}") from None

    def _experiment(self, name: str) -> str:
        return self.call("creating the experiment", "create_experiment", name=name, namespace=self.namespace).experiment_id

    def _recurring(self, job: Any, name: str, experiment_id: str) -> Submitted:
        rid = job.recurring_run_id
        return Submitted(rid, name, experiment_id, f"{self.host}/#/recurringrun/details/{rid}")

    def submit(self, target: str | os.PathLike[str] | VersionRef, arguments: dict[str, Any], experiment: str = "vembed",
               run_name: str | None = None, service_account: str | None = None) -> Submitted:  # fmt: skip
        """One run of a compiled package (sent whole) or of an uploaded pipeline version."""
        exp_id = self._experiment(experiment)
        name = run_name or f"lora-finetune {datetime.datetime.now().strftime('%Y-%m-%d %H-%M-%S')}"
        source = (
            {"pipeline_id": target.pipeline_id, "version_id": target.version_id}
            if isinstance(target, VersionRef)
            else {"pipeline_package_path": str(target)}
        )
        run = self.call(
            "creating the run", "run_pipeline", exp_id, name, params=arguments, service_account=service_account, **source
        )
        return Submitted(run.run_id, name, exp_id, f"{self.host}/#/runs/details/{run.run_id}")

    def _named_recurring(self, exp_id: str, experiment: str, job_name: str, update: bool) -> list:
        """The recurring runs named `job_name` in the experiment; without `update` there must be none."""
        listed = self.call(
            "listing recurring runs", "list_recurring_runs", experiment_id=exp_id, page_size=100,
            filter=_filter("display_name", job_name),
        )  # fmt: skip
        old = [r for r in (listed.recurring_runs or []) if r.display_name == job_name]
        if old and not update:
            raise SubmitError(
                f"a recurring run named {job_name!r} already exists in experiment {experiment!r}; "
                "pass --update to point it at this pipeline version, or choose another --name"
            )
        return old

    def schedule(self, package: str | os.PathLike[str], arguments: dict[str, Any], cron: str, experiment: str = "vembed",
                 name: str | None = None, service_account: str | None = None) -> Submitted:  # fmt: skip
        """A recurring run: one at a time (max_concurrency=1), no backfill of missed slots (no_catchup).
        Refused when one of the same name exists (a repeated command would otherwise train twice per slot)."""
        cron = validate_cron(cron)
        exp_id, job_name = self._experiment(experiment), name or RETRAINING
        self._named_recurring(exp_id, experiment, job_name, update=False)
        job = self.call(
            "creating the recurring run", "create_recurring_run", experiment_id=exp_id, job_name=job_name,
            cron_expression=cron, max_concurrency=1, no_catchup=True, params=arguments,
            pipeline_package_path=str(package), enabled=True, service_account=service_account,
        )  # fmt: skip
        return self._recurring(job, job_name, exp_id)

    # --- uploaded pipeline versions ----------------------------------------------------------------------

    def _versions(self, pipeline_id: str, **query: Any) -> list:
        listed = self.call("listing pipeline versions", "list_pipeline_versions", pipeline_id, page_size=1, **query)
        return listed.pipeline_versions or []

    def _newest_version(self, pipeline_id: str) -> Any:
        versions = self._versions(pipeline_id, sort_by="created_at desc")
        if not versions:
            raise SubmitError(
                f"pipeline {pipeline_id} on {self.host} has no versions; upload one with `vembed pipeline upload`"
            )
        return versions[0]

    def upload(self, package: str | os.PathLike[str], pipeline_name: str = "lora-finetune",
               version_name: str | None = None, description: str | None = None) -> Uploaded:  # fmt: skip
        """Create the pipeline `pipeline_name` from `package`, or add `package` to it as a new version.

        Uploading the same package again returns the existing version (the default version name is
        derived from the package's content), so `upload` is safe to repeat in CI."""
        version_name = version_name or default_version_name(package)
        pipeline_id = self.call(f"looking up pipeline {pipeline_name!r}", "get_pipeline_id", pipeline_name)
        created = reused = False
        if pipeline_id is None:  # creating a pipeline also creates its first version (named like the pipeline)
            pipeline_id = self.call(
                "uploading the pipeline", "upload_pipeline", str(package), pipeline_name=pipeline_name,
                description=description, namespace=self.namespace,
            ).pipeline_id  # fmt: skip
            version, created = self._newest_version(pipeline_id), True
            version_name = version.display_name
        elif existing := self._versions(pipeline_id, filter=_filter("display_name", version_name)):
            version, reused = existing[0], True  # same content (default name) or an explicit name given twice
        else:
            version = self.call(
                "uploading the pipeline version", "upload_pipeline_version", str(package), version_name,
                pipeline_id=pipeline_id, description=description,
            )  # fmt: skip
        vid = version.pipeline_version_id
        url = f"{self.host}/#/pipelines/details/{pipeline_id}/version/{vid}"
        return Uploaded(pipeline_id, vid, pipeline_name, version_name, created, reused, url)

    def resolve_version(self, pipeline_name: str, version_id: str | None) -> VersionRef:
        """A version of the pipeline: `version_id`, or the newest for "latest"."""
        pid = self.call(f"looking up pipeline {pipeline_name!r}", "get_pipeline_id", pipeline_name)
        if not pid:
            raise SubmitError(f"no pipeline named {pipeline_name!r} on {self.host}; create it with `vembed pipeline upload`")
        if version_id in (None, "", "latest"):
            version = self._newest_version(pid)
        else:
            version = self.call(f"reading pipeline version {version_id}", "get_pipeline_version", pid, version_id)
        return VersionRef(pid, version.pipeline_version_id, pipeline_name, version.display_name or "")

    def version_parameters(self, ref: VersionRef) -> dict:
        """The run parameters (`read_pipeline_parameters` format) of an uploaded version."""
        what = f"pipeline version {ref.version_id}"
        spec = self.call(f"reading {what}", "get_pipeline_version", ref.pipeline_id, ref.version_id).pipeline_spec or {}
        return parameters_from_spec(spec.get("pipeline_spec", spec), f"{what} on {self.host}")  # may be wrapped

    def schedule_version(self, ref: VersionRef, arguments: dict[str, Any], cron: str | None, experiment: str = "vembed",
                         name: str | None = None, service_account: str | None = None, update: bool = False) -> Submitted:  # fmt: skip
        """A recurring run on an uploaded version (`ref.version_id`), or on the newest version at each run
        (`ref.version_id` None). Same policy as `schedule`: one at a time, no backfill.

        `update`: re-point the recurring run(s) named `name` in `experiment` at `ref`. The KFP v2beta1 API
        has no update call for recurring runs (RecurringRunService: Create, Get, List, Enable, Disable,
        Delete), so this takes three: disable the old one, create the new one (cron and parameters default
        to the old one's), delete the old one. If creating fails, the old one is enabled again.
        """
        import kfp_server_api as api

        job_name, exp_id = name or RETRAINING, self._experiment(experiment)
        old = self._named_recurring(exp_id, experiment, job_name, update)
        if old:
            previous = old[0]
            if cron is None and previous.trigger and previous.trigger.cron_schedule:
                cron = previous.trigger.cron_schedule.cron
            carried = (previous.runtime_config.parameters or {}) if previous.runtime_config else {}
            arguments = {**carried, **arguments}
            service_account = service_account or previous.service_account
        if not cron:
            raise SubmitError("--cron is required (no existing recurring run to take it from)")
        # POST /recurringruns with a pipeline_version_reference; without a version id it follows the newest.
        body = api.V2beta1RecurringRun(
            display_name=job_name, experiment_id=exp_id,
            pipeline_version_reference=api.V2beta1PipelineVersionReference(
                pipeline_id=ref.pipeline_id, pipeline_version_id=ref.version_id
            ),
            runtime_config=api.V2beta1RuntimeConfig(parameters=arguments),
            trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=validate_cron(cron))),
            max_concurrency=1, no_catchup=True, mode=api.RecurringRunMode.ENABLE, service_account=service_account,
        )  # fmt: skip
        for rr in old:
            self.call(f"disabling recurring run {rr.recurring_run_id}", "disable_recurring_run", rr.recurring_run_id)
        try:
            # kfp.Client.create_recurring_run insists on both ids, so the request goes to the API it wraps.
            job = self.call("creating the recurring run", "_recurring_run_api.recurring_run_service_create_recurring_run", body)
        except SubmitError:
            for rr in old:  # leave the schedule as it was
                if rr.status == "ENABLED":
                    self.call(f"re-enabling recurring run {rr.recurring_run_id}", "enable_recurring_run", rr.recurring_run_id)
            raise
        for rr in old:
            self.call(f"deleting recurring run {rr.recurring_run_id}", "delete_recurring_run", rr.recurring_run_id)
        return self._recurring(job, job_name, exp_id)

