"""`vembed serve`: a real uvicorn server on loopback, queried with the official `openai` client."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

TEXTS = ["how do I open a file", "parse a JSON string", "sort a list in place"]


@pytest.fixture(scope="module")
def model_dir(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A text model with a query instruction, so `input_type=query` has something to change."""
    from vembed.inference.predictor import Predictor

    d = tmp_path_factory.mktemp("serve") / "model"
    shutil.copytree(tiny_bert, d)
    spec = Predictor(tiny_bert).spec.to_dict() | {"query_instruction": "query: "}
    (d / "embedder.json").write_text(json.dumps(spec))
    return str(d)


@pytest.fixture(scope="module")
def base_url(model_dir: str) -> Iterator[str]:
    from vembed.inference.serve import make_server

    server = make_server(model_dir, port=0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60  # bounded wait for the socket
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_openai_client_gets_predictor_embeddings(base_url: str, model_dir: str):
    from openai import OpenAI

    from vembed.inference.predictor import Predictor

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    pred = Predictor(model_dir)
    # The client's default asks for base64 (float32 bytes); the explicit float format is tested too.
    got = client.embeddings.create(model="m", input=TEXTS)
    np.testing.assert_allclose([d.embedding for d in got.data], pred.encode_text(TEXTS), atol=1e-5)
    assert [d.index for d in got.data] == [0, 1, 2] and got.usage.prompt_tokens > len(TEXTS)
    one = client.embeddings.create(model="m", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, pred.encode_text(TEXTS[:1])[0], atol=1e-5)

    small = client.embeddings.create(model="m", input=TEXTS, dimensions=16)
    np.testing.assert_allclose([d.embedding for d in small.data], pred.encode_text(TEXTS, dim=16), atol=1e-5)
    queries = client.embeddings.create(model="m", input=TEXTS, extra_body={"input_type": "query"})
    expected_q = pred.encode_text(TEXTS, is_query=True)
    np.testing.assert_allclose([d.embedding for d in queries.data], expected_q, atol=1e-5)
    assert not np.allclose(expected_q, pred.encode_text(TEXTS), atol=1e-3)  # the instruction matters


def test_health_models_and_bad_requests(base_url: str, model_dir: str):
    import httpx
    from openai import BadRequestError, OpenAI

    health = httpx.get(f"{base_url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == model_dir and health["dim"] == 32
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [model_dir]
    with pytest.raises(BadRequestError, match="dimensions"):
        client.embeddings.create(model="m", input=TEXTS, dimensions=999)
    with pytest.raises(BadRequestError, match="input"):
        client.embeddings.create(model="m", input=[])


def test_serve_command_and_cli_refuses_a_missing_model(tmp_path: Path, capsys):
    from vembed.cli import main
    from vembed.inference.serve import serve_command

    assert serve_command("models:/emb@champion") == "vembed serve models:/emb@champion"
    assert serve_command("/a b/m", port=9000) == "vembed serve '/a b/m' --port 9000"
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing" in err and "\n" not in err


def test_local_pipeline_run_prints_the_serve_command_for_a_new_champion(tmp_path: Path):
    import io

    from pipelines.local_run import LocalRunResult, print_result

    reg = {"model_name": "emb", "version": "2", "aliases": ["challenger", "champion"], "tracking_uri": "sqlite:///o/mlflow.db"}
    out = io.StringIO()
    print_result(LocalRunResult(reg, "| metric |", tmp_path, tmp_path / "log"), stream=out)
    assert "serve it:  MLFLOW_TRACKING_URI=sqlite:///o/mlflow.db vembed serve models:/emb@champion\n" in out.getvalue()
    out = io.StringIO()
    print_result(LocalRunResult(reg | {"aliases": ["challenger"]}, "", tmp_path, tmp_path / "log"), stream=out)
    assert "vembed serve" not in out.getvalue()  # not promoted: nothing new to serve


def test_serve_refuses_a_port_in_use_in_one_line(tiny_bert: str, capsys):
    import socket

    from vembed.cli import main

    with socket.create_server(("127.0.0.1", 0)) as taken:  # another process already listens there
        port = taken.getsockname()[1]
        assert main(["serve", tiny_bert, "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    last = err.strip().split("\n")[-1]  # after the weight-loading progress bar
    assert last.startswith("error: cannot listen on ") and f"127.0.0.1:{port}" in last and "Traceback" not in err
    assert "serving" not in out  # no claim that it serves
    assert main(["serve", tiny_bert, "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip().split("\n")[-1] == "error: cannot listen on 127.0.0.1:70000: bind(): port must be 0-65535."


@pytest.mark.parametrize("env_uri", [None, "sqlite:///{tmp}/none.db"])
def test_serve_models_uri_without_a_store_creates_no_database(env_uri, tmp_path: Path, monkeypatch, capsys):
    from vembed.cli import main

    monkeypatch.chdir(tmp_path)  # MLflow's default store is ./mlflow.db
    monkeypatch.setenv("VEMBED_CACHE_DIR", str(tmp_path / "cache"))
    if env_uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri.format(tmp=tmp_path))
    assert main(["serve", "models:/emb@champion"]) == 2
    err = capsys.readouterr().err.strip().split("\n")[-1]
    assert err.startswith("error: ") and "no MLflow store" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # reading never creates an empty store


@pytest.mark.parametrize("uri", ["foo://bar", "file:{tmp}/mlruns"])  # unsupported; MLflow 3's deprecated file store
def test_serve_models_uri_with_an_unusable_tracking_uri_is_one_line(uri, tmp_path: Path, monkeypatch, capsys):
    from vembed.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    monkeypatch.setenv("VEMBED_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["serve", "models:/emb@champion"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {uri.format(tmp=tmp_path)}: ") and "\n" not in err


@pytest.mark.parametrize("device, reason", [("foo", "is not a torch device"), ("cuda:99", "CUDA device(s)")])
def test_serve_refuses_a_device_the_machine_lacks_in_one_line(device, reason, tiny_bert: str, capsys):
    from vembed.cli import main

    assert main(["serve", tiny_bert, "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: device: {device!r}") and reason in err and "\n" not in err  # before loading


@pytest.mark.parametrize("uri", ["gs://bucket/model", "https://example.com/model"])
def test_serve_names_an_unsupported_model_location_as_given(uri, capsys):
    from vembed.cli import main

    assert main(["serve", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {uri}: unsupported location") and "models:/" in err and "\n" not in err
