"""`vembed pipeline submit` and `schedule` against a recording stand-in for the KFP API.

No KFP API server can run here (it needs Kubernetes, MySQL and object storage), so a small HTTP server on
loopback plays its v2beta1 REST endpoints: it records every request kfp.Client makes and answers with
the JSON shapes of the real API. The tests check what reaches the wire: paths, the pipeline spec, run
parameters, the cron trigger, max_concurrency and no_catchup.
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

        def do_GET(self) -> None:
            rec = self._record()
            if rec.path == "/apis/v2beta1/healthz":
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
            rec = self._record()
            body = rec.body or {}
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
                self._reply(200, {**body, "recurring_run_id": "rr-456", "status": "ENABLED"})
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
