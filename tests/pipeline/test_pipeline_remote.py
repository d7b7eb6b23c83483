"""`vembed pipeline submit` and `schedule` against a recording stand-in for the KFP API.

No KFP API server can run here (it needs Kubernetes, MySQL and object storage), so a small HTTP server on
loopback plays its v2beta1 REST endpoints: it records every request kfp.Client makes and answers with
the JSON shapes of the real API. The tests check what reaches the wire: paths, the pipeline spec, run
parameters, the cron trigger, max_concurrency and no_catchup. For pipeline versions it keeps what a real
server keeps (pipelines, versions with their specs, recurring runs) so that upload -> schedule -> upload
-> schedule --update can be followed end to end.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from pipelines.cli import main
from pipelines.compile import COMPILED_PATH


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class FakeKfpApi:
    url: str
    requests: list[Recorded] = field(default_factory=list)
    experiments: dict[str, str] = field(default_factory=dict)  # display name -> id
    fail_runs_with: int | None = None
    fail_recurring_with: int | None = None
    pipelines: dict[str, str] = field(default_factory=dict)  # display name -> id
    versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # pipeline id -> versions, oldest first
    recurring: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> stored recurring run
    next_recurring_id: int = 456

    def calls(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]


def _handler(api: FakeKfpApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> Recorded:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            rec = Recorded(self.command, url.path, parse_qs(url.query), json.loads(raw) if raw else None)
            api.requests.append(rec)
            return rec

        def _read_upload(self) -> tuple[Recorded, str]:
            """A multipart upload: record the query, return the uploaded file's text."""
            from email.parser import BytesParser

            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            message = BytesParser().parsebytes(
                f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw
            )
            (part,) = [m for m in message.walk() if m.get_filename()]
            rec = Recorded(self.command, url.path, parse_qs(url.query), None)
            api.requests.append(rec)
            return rec, part.get_payload(decode=True).decode()

        def _new_version(self, pipeline_id: str, name: str, text: str) -> dict[str, Any]:
            import yaml

            docs = list(yaml.safe_load_all(text))
            spec = {"pipeline_spec": docs[0], "platform_spec": docs[1]} if len(docs) > 1 else docs[0]
            versions = api.versions.setdefault(pipeline_id, [])
            version = {
                "pipeline_id": pipeline_id,
                "pipeline_version_id": f"{pipeline_id}-v{len(versions) + 1}",
                "display_name": name,
                "created_at": f"2025-01-01T00:00:{len(versions):02d}Z",
                "pipeline_spec": spec,
            }
            versions.append(version)
            return version

        def _filter_value(self, rec: Recorded) -> str | None:
            if "filter" not in rec.query:
                return None
            predicate = json.loads(rec.query["filter"][0])["predicates"][0]
            return predicate.get("stringValue", predicate.get("string_value"))

        def do_DELETE(self) -> None:
            rec = self._record()
            rr_id = rec.path.removeprefix("/apis/v2beta1/recurringruns/")
            if rec.path.startswith("/apis/v2beta1/recurringruns/") and rr_id in api.recurring:
                del api.recurring[rr_id]
                self._reply(200, {})
            else:
                self._reply(404, {"error": f"no route {rec.path}", "code": 5})

        def do_GET(self) -> None:
            rec = self._record()
            parts = rec.path.removeprefix("/apis/v2beta1/").split("/")
            if rec.path == "/apis/v2beta1/pipelines":
                wanted = self._filter_value(rec)
                found = [{"pipeline_id": i, "display_name": n} for n, i in api.pipelines.items() if n == wanted]
                self._reply(200, {"pipelines": found, "total_size": len(found)} if found else {})
            elif parts[0] == "pipelines" and len(parts) == 3 and parts[2] == "versions":
                versions = list(api.versions.get(parts[1], []))
                wanted = self._filter_value(rec)
                if wanted is not None:
                    versions = [v for v in versions if v["display_name"] == wanted]
                if rec.query.get("sort_by") == ["created_at desc"]:
                    versions = versions[::-1]
                versions = versions[: int(rec.query.get("page_size", ["100"])[0])]
                self._reply(200, {"pipeline_versions": versions, "total_size": len(versions)} if versions else {})
            elif parts[0] == "pipelines" and len(parts) == 4 and parts[2] == "versions":
                found = [v for v in api.versions.get(parts[1], []) if v["pipeline_version_id"] == parts[3]]
                if found:
                    self._reply(200, found[0])
                else:
                    self._reply(404, {"error": f"no pipeline version {parts[3]}", "code": 5})
            elif rec.path == "/apis/v2beta1/recurringruns":
                wanted = self._filter_value(rec)
                found = [
                    r for r in api.recurring.values()
                    if r["display_name"] == wanted and r["experiment_id"] == rec.query.get("experiment_id", [""])[0]
                ]  # fmt: skip
                self._reply(200, {"recurringRuns": found, "total_size": len(found)} if found else {})
            elif rec.path == "/apis/v2beta1/healthz":
                self._reply(200, {"multi_user": False})
            elif rec.path == "/apis/v2beta1/experiments":
                predicate = json.loads(rec.query["filter"][0])["predicates"][0]
                wanted = predicate.get("stringValue", predicate.get("string_value"))
                found = [
                    {"experiment_id": eid, "display_name": name}
                    for name, eid in api.experiments.items()
                    if name == wanted
                ]
                self._reply(200, {"experiments": found, "total_size": len(found)} if found else {})
            else:
                self._reply(404, {"error": f"no route {rec.path}", "code": 5})

        def do_POST(self) -> None:
            if self.path.startswith("/apis/v2beta1/pipelines/upload"):
                rec, text = self._read_upload()
                name = rec.query["name"][0]
                if rec.path == "/apis/v2beta1/pipelines/upload":
                    pid = f"pl-{len(api.pipelines) + 1}"
                    api.pipelines[name] = pid
                    self._new_version(pid, name, text)  # the server's first version, named like the pipeline
                    self._reply(200, {"pipeline_id": pid, "display_name": name})
                else:
                    self._reply(200, self._new_version(rec.query["pipelineid"][0], name, text))
                return
            rec = self._record()
            body = rec.body or {}
            rr_action = rec.path.removeprefix("/apis/v2beta1/recurringruns/")
            if rec.path.startswith("/apis/v2beta1/recurringruns/") and ":" in rr_action:
                rr_id, action = rr_action.split(":")
                api.recurring[rr_id]["status"] = "ENABLED" if action == "enable" else "DISABLED"
                self._reply(200, {})
                return
            if rec.path == "/apis/v2beta1/experiments":
                eid = f"exp-{len(api.experiments) + 1}"
                api.experiments[body["display_name"]] = eid
                self._reply(200, {**body, "experiment_id": eid})
            elif rec.path == "/apis/v2beta1/runs":
                if api.fail_runs_with:
                    self._reply(api.fail_runs_with, {"error": "pipeline spec rejected", "code": 3})
                    return
                self._reply(200, {**body, "run_id": "run-123", "state": "PENDING"})
            elif rec.path == "/apis/v2beta1/recurringruns":
                if api.fail_recurring_with:
                    self._reply(api.fail_recurring_with, {"error": "recurring run rejected", "code": 3})
                    return
                rr_id = f"rr-{api.next_recurring_id}"
                api.next_recurring_id += 1
                stored = {**body, "recurring_run_id": rr_id, "status": "ENABLED"}
                api.recurring[rr_id] = stored
                self._reply(200, stored)
            else:
                self._reply(404, {"error": f"no route {rec.path}", "code": 5})

    return Handler


@pytest.fixture
def kfp_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeKfpApi]:
    # kfp.Client reads ~/.config/kfp/context.json; keep a developer's real one out of the test.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)  # handler bound below, once the api exists
    api = FakeKfpApi(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


def test_submit_creates_experiment_and_run_with_typed_params(kfp_api: FakeKfpApi, capsys) -> None:
    rc = main([
        "submit", "--host", kfp_api.url, "--experiment", "retrieval",
        "--param", "data_uri=s3://bucket/data/latest", "--param", "min_delta=0.01",
        "--param", "registered_model_name=docs-search", "--config-override", "lora_r=32", "epochs=2",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (create_exp,) = kfp_api.calls("POST", "/apis/v2beta1/experiments")
    assert create_exp.body["display_name"] == "retrieval"
    (run,) = kfp_api.calls("POST", "/apis/v2beta1/runs")
    assert run.body["experiment_id"] == kfp_api.experiments["retrieval"]
    committed = COMPILED_PATH.read_text()
    assert run.body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "lora-finetune"
    assert "platform_spec" in run.body["pipeline_spec"], "kubernetes settings (secrets, shm) must be sent"
    assert run.body["pipeline_spec"]["pipeline_spec"]["sdkVersion"] in committed
    params = run.body["runtime_config"]["parameters"]
    assert params == {
        "data_uri": "s3://bucket/data/latest",
        "min_delta": 0.01,
        "registered_model_name": "docs-search",
        "config_overrides": ["lora_r=32", "epochs=2"],
    }
    assert "run-123" in capsys.readouterr().out


def test_submit_reuses_an_existing_experiment(kfp_api: FakeKfpApi) -> None:
    kfp_api.experiments["vembed"] = "exp-existing"
    assert main(["submit", "--host", kfp_api.url, "--param", "data_uri=/data/raw.jsonl"]) == 0
    assert kfp_api.calls("POST", "/apis/v2beta1/experiments") == []
    (run,) = kfp_api.calls("POST", "/apis/v2beta1/runs")
    assert run.body["experiment_id"] == "exp-existing"


def test_schedule_sends_six_field_cron_one_at_a_time_without_catchup(kfp_api: FakeKfpApi, capsys) -> None:
    rc = main([
        "schedule", "--host", kfp_api.url, "--cron", "0 0 3 * * *", "--name", "nightly",
        "--param", "data_uri=s3://bucket/data/latest",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (job,) = kfp_api.calls("POST", "/apis/v2beta1/recurringruns")
    body = job.body
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["display_name"] == "nightly"
    assert body["runtime_config"]["parameters"] == {"data_uri": "s3://bucket/data/latest"}
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "lora-finetune"
    assert "rr-456" in capsys.readouterr().out


def test_schedule_twice_under_one_name_keeps_one_recurring_run(kfp_api: FakeKfpApi, capsys) -> None:
    argv = ["schedule", "--host", kfp_api.url, "--cron", "0 0 3 * * *", "--name", "nightly", "--param", "data_uri=s3://b/d/latest"]
    assert main(argv) == 0
    assert main(argv) == 2  # a repeated command (a CI re-run) must not train twice a night
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "'nightly' already exists" in err and "--update" in err
    assert len(kfp_api.recurring) == 1 and len(kfp_api.calls("POST", "/apis/v2beta1/recurringruns")) == 1


def test_schedule_refuses_five_field_cron_before_calling_the_api(kfp_api: FakeKfpApi, capsys) -> None:
    rc = main(["schedule", "--host", kfp_api.url, "--cron", "0 3 * * *", "--param", "data_uri=s3://b/d/latest"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "5 fields" in err and "'0 0 3 * * *'" in err
    assert kfp_api.requests == []


def test_schedule_warns_when_data_uri_pins_one_snapshot(kfp_api: FakeKfpApi, capsys) -> None:
    rc = main(["schedule", "--host", kfp_api.url, "--cron", "0 0 3 * * *", "--param", "data_uri=s3://b/data/dt=2024-01-01/"])
    assert rc == 0
    assert "same data" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--param", "min_delta=0.1"], "missing required pipeline parameter(s): --param data_uri"),
        (["--param", "data_uri=x", "--param", "min_detla=0.1"], "did you mean min_delta?"),
        (["--param", "data_uri=x", "--param", "min_delta=lots"], "min_delta=lots: expected a number"),
        (["--param", "data_uri=x", "--param", "config_overrides=[oops"], "expected a JSON list"),
    ],
)
def test_bad_params_are_one_line_errors_and_send_nothing(kfp_api: FakeKfpApi, capsys, argv, message) -> None:
    assert main(["submit", "--host", kfp_api.url, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert kfp_api.calls("POST", "/apis/v2beta1/runs") == []


def test_api_error_is_one_line(kfp_api: FakeKfpApi, capsys) -> None:
    kfp_api.fail_runs_with = 400
    assert main(["submit", "--host", kfp_api.url, "--param", "data_uri=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: creating the run on") and "HTTP 400" in err
    assert len(err.splitlines()) == 1


def test_unreachable_host_fails_fast_with_one_line(capsys) -> None:
    from tests.conftest import free_port

    assert main(["submit", "--host", f"http://127.0.0.1:{free_port()}", "--param", "data_uri=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach the KFP API" in err and len(err.splitlines()) == 1


# -- pipeline versions: upload, run a version, schedule on a version, re-point a schedule ------------------


def changed_package(tmp_path: Path, tag: str) -> Path:
    """The committed pipeline with another default CPU image: a new build, as a new version would be."""
    text = COMPILED_PATH.read_text()
    spec = yaml.safe_load_all(text).__next__()
    old_image = spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"]
    out = tmp_path / f"lora_finetune-{tag}.yaml"
    out.write_text(text.replace(old_image, f"registry.example/vembed:{tag}-cpu"))
    return out


def upload(kfp_api: FakeKfpApi, package: Path, capsys) -> str:
    assert main(["upload", "--host", kfp_api.url, "--package", str(package)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_upload_creates_the_pipeline_then_adds_versions_and_is_idempotent(kfp_api: FakeKfpApi, tmp_path, capsys) -> None:
    out = upload(kfp_api, COMPILED_PATH, capsys)
    assert out.startswith("created pipeline lora-finetune (pl-1)") and "Pipeline details" not in out
    (created,) = kfp_api.calls("POST", "/apis/v2beta1/pipelines/upload")
    assert created.query["name"] == ["lora-finetune"]

    new = changed_package(tmp_path, "2")
    out = upload(kfp_api, new, capsys)
    assert out.startswith("added version to lora-finetune (pl-1)")
    (added,) = kfp_api.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    assert added.query["pipelineid"] == ["pl-1"]
    from pipelines.remote import default_version_name

    assert added.query["name"] == [default_version_name(new)]
    stored = kfp_api.versions["pl-1"][-1]["pipeline_spec"]
    assert stored["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == (
        "registry.example/vembed:2-cpu"
    )
    # The same package again: the existing version, nothing uploaded.
    out = upload(kfp_api, new, capsys)
    assert out.startswith("already uploaded: lora-finetune") and "pl-1-v2" in out
    assert len(kfp_api.calls("POST", "/apis/v2beta1/pipelines/upload_version")) == 1


def test_submit_runs_an_uploaded_version_without_sending_the_spec(kfp_api: FakeKfpApi, tmp_path, capsys) -> None:
    upload(kfp_api, COMPILED_PATH, capsys)
    upload(kfp_api, changed_package(tmp_path, "2"), capsys)
    rc = main([
        "submit", "--host", kfp_api.url, "--pipeline-version-id", "latest",
        "--param", "data_uri=s3://bucket/data/latest", "--param", "min_delta=0.5",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (run,) = kfp_api.calls("POST", "/apis/v2beta1/runs")
    assert run.body["pipeline_version_reference"] == {"pipeline_id": "pl-1", "pipeline_version_id": "pl-1-v2"}
    assert "pipeline_spec" not in run.body
    assert run.body["runtime_config"]["parameters"] == {"data_uri": "s3://bucket/data/latest", "min_delta": 0.5}
    # Parameters are checked against the version's own spec, before anything is created.
    assert main(["submit", "--host", kfp_api.url, "--pipeline-version-id", "pl-1-v1", "--param", "min_detla=1"]) == 2
    assert "did you mean min_delta?" in capsys.readouterr().err
    assert len(kfp_api.calls("POST", "/apis/v2beta1/runs")) == 1


def test_a_schedule_survives_a_pipeline_update(kfp_api: FakeKfpApi, tmp_path, capsys) -> None:
    """upload -> schedule on that version -> upload a new build -> `schedule --update`: the recurring run
    now starts the new version, with its cron and parameters unchanged, in one command."""
    upload(kfp_api, COMPILED_PATH, capsys)
    rc = main([
        "schedule", "--host", kfp_api.url, "--pipeline-version-id", "latest", "--cron", "0 0 3 * * *",
        "--name", "nightly", "--param", "data_uri=s3://bucket/data/latest", "--param", "min_delta=0.01",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (first,) = kfp_api.recurring.values()
    assert first["pipeline_version_reference"] == {"pipeline_id": "pl-1", "pipeline_version_id": "pl-1-v1"}
    assert "pipeline_spec" not in first
    assert (first["trigger"]["cron_schedule"]["cron"], int(first["max_concurrency"]), first["no_catchup"]) == (
        "0 0 3 * * *", 1, True,
    )  # fmt: skip
    capsys.readouterr()

    # A second schedule under the same name is refused rather than doubling the runs.
    rc = main(["schedule", "--host", kfp_api.url, "--pipeline-version-id", "latest", "--cron", "0 0 4 * * *",
               "--name", "nightly", "--param", "data_uri=x"])  # fmt: skip
    assert rc == 2 and "--update" in capsys.readouterr().err
    assert len(kfp_api.recurring) == 1

    new = changed_package(tmp_path, "2")
    rc = main(["schedule", "--host", kfp_api.url, "--update", "--name", "nightly", "--package", str(new)])
    assert rc == 0, capsys.readouterr().err
    assert "re-pointed recurring run" in capsys.readouterr().out
    (current,) = kfp_api.recurring.values()
    assert current["recurring_run_id"] != first["recurring_run_id"]
    assert current["display_name"] == "nightly" and current["status"] == "ENABLED"
    assert current["pipeline_version_reference"] == {"pipeline_id": "pl-1", "pipeline_version_id": "pl-1-v2"}
    assert current["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert current["runtime_config"]["parameters"] == {"data_uri": "s3://bucket/data/latest", "min_delta": 0.01}
    # The order that never leaves two schedules running, nor none if creating fails: disable, create, delete.
    old = first["recurring_run_id"]
    calls = [(r.method, r.path) for r in kfp_api.requests if "recurringruns" in r.path and r.method != "GET"]
    assert calls[-3:] == [
        ("POST", f"/apis/v2beta1/recurringruns/{old}:disable"),
        ("POST", "/apis/v2beta1/recurringruns"),
        ("DELETE", f"/apis/v2beta1/recurringruns/{old}"),
    ]


def test_update_that_fails_leaves_the_old_schedule_enabled(kfp_api: FakeKfpApi, tmp_path, capsys) -> None:
    upload(kfp_api, COMPILED_PATH, capsys)
    assert main(["schedule", "--host", kfp_api.url, "--pipeline-version-id", "latest", "--cron", "0 0 3 * * *",
                 "--name", "nightly", "--param", "data_uri=s3://b/d/latest"]) == 0  # fmt: skip
    kfp_api.fail_recurring_with = 400
    assert main(["schedule", "--host", kfp_api.url, "--update", "--name", "nightly",
                 "--package", str(changed_package(tmp_path, "3"))]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "creating the recurring run" in err and len(err.splitlines()) == 1
    (kept,) = kfp_api.recurring.values()
    assert kept["status"] == "ENABLED" and kept["pipeline_version_reference"]["pipeline_version_id"] == "pl-1-v1"


def test_follow_latest_references_the_pipeline_without_a_version(kfp_api: FakeKfpApi, capsys) -> None:
    rc = main(["schedule", "--host", kfp_api.url, "--follow-latest", "--cron", "@daily",
               "--param", "data_uri=s3://b/d/latest"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "the newest version at each run" in capsys.readouterr().out
    (rr,) = kfp_api.recurring.values()
    assert rr["pipeline_version_reference"] == {"pipeline_id": "pl-1"}  # KFP 2.5+: newest version per run
    assert kfp_api.calls("POST", "/apis/v2beta1/pipelines/upload")  # the package was uploaded first
