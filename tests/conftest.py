"""Shared fixtures. Servers are real processes/threads on loopback, started here."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never reach a hub: models are built from configs or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    access_key: str = "testing-access-key"
    secret_key: str = "testing-secret-key-do-not-log"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on loopback; boto3 talks to it over real HTTP."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point boto3 (and anything it starts) at the test S3 server for one test."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on loopback (sqlite backend, artifacts proxied to `s3_server`), started once."""
    from tests.support.mlflow_server import MlflowServer

    bucket = "mlflow-artifacts"
    s3_server.client().create_bucket(Bucket=bucket)
    server = MlflowServer(
        workdir=tmp_path_factory.mktemp("mlflow-server"), port=free_port(), s3_env=s3_server.env(), bucket=bucket
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.support.tiny_models import make_tiny_bert

    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.support.tiny_models import make_tiny_qwen3

    return str(make_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "qwen3"))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from vembed.models.resolve import resolve_model_path

    return resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")


def write_pairs(path, n: int = 48, seed: int = 0, negatives: bool = True) -> str:
    """Small synthetic query/positive pairs (word permutations) for mechanics tests."""
    import json
    import random

    rng = random.Random(seed)
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
             "sigma tau upsilon phi chi psi omega").split()
    with open(path, "w") as fh:
        for _ in range(n):
            w = rng.sample(words, 3)
            rec = {"query": " ".join(w), "positive": "about " + " and ".join(reversed(w))}
            if negatives:
                rec["negatives"] = [" ".join(rng.sample(words, 3))]
            fh.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.fixture
def pairs_file(tmp_path) -> str:
    return write_pairs(tmp_path / "train.jsonl")


def put_object(uri: str, data: bytes | str) -> None:
    """Write one s3:// object with plain boto3 (test setup; vembed.artifacts.storage only writes directories)."""
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data.encode() if isinstance(data, str) else data)


def assert_manifest_covers(local_dir: str | Path) -> None:
    """The directory's manifest.json lists exactly its files, with their sizes and sha256."""
    import json

    from vembed.artifacts.storage import MANIFEST, build_manifest

    assert json.loads((Path(local_dir) / MANIFEST).read_text()) == build_manifest(local_dir)
