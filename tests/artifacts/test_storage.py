"""vembed.artifacts.storage against a real S3 server (moto's ThreadedMotoServer over HTTP) and local paths."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3Server, assert_manifest_covers, free_port, put_object
from vembed.artifacts import storage
from vembed.errors import StorageError

MiB = 1024 * 1024


def make_tree(root: Path, seed: str = "v1", n: int = 4, size: int = 10_000) -> dict[str, bytes]:
    """A small directory with nested files; returns {relative path: content}."""
    files = {}
    for i in range(n):
        rel = f"part-{i}.bin" if i % 2 == 0 else f"sub/dir/part-{i}.bin"
        data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32 + 1)
        files[rel] = data[: size + i]
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def one_line_naming(exc: pytest.ExceptionInfo[StorageError], uri: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    assert uri in message, message
    return message


@pytest.fixture
def bucket(s3_env: S3Server) -> str:
    # All moto servers in this process share one backend, so every test gets its own bucket.
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def on_s3_event() -> Iterator[Callable[[str, Callable[..., Any]], None]]:
    """Hook botocore events of the shared S3 client; the hooks are removed after the test (the client outlives it)."""
    client = storage.Storage().client
    hooks: list[tuple[str, Callable[..., Any]]] = []

    def register(event: str, handler: Callable[..., Any]) -> None:
        client.meta.events.register(event, handler)
        hooks.append((event, handler))

    yield register
    for event, handler in hooks:
        client.meta.events.unregister(event, handler)


# --------------------------------------------------------------------------- round trips


def test_local_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "a" / "note.txt"
    f.parent.mkdir()
    f.write_text("héllo")
    assert storage.read_bytes(f) == "héllo".encode()
    assert storage.exists(f) and not storage.exists(tmp_path / "missing")

    src = tmp_path / "src"
    files = make_tree(src)
    manifest = storage.upload_dir(src, str(tmp_path / "dst"))
    assert sorted(e["path"] for e in manifest["files"]) == sorted(files)
    assert read_tree(tmp_path / "dst") == {**files, "manifest.json": (tmp_path / "dst" / "manifest.json").read_bytes()}
    assert_manifest_covers(tmp_path / "dst")
    assert json.loads((tmp_path / "dst" / "manifest.json").read_text()) == manifest
    assert storage.list(tmp_path / "dst") == sorted(str(tmp_path / "dst" / p) for p in [*files, "manifest.json"])

    out = storage.download_dir(str(tmp_path / "dst"), tmp_path / "copy")
    assert {k: v for k, v in read_tree(out).items() if k != "manifest.json"} == files
    assert storage.materialize(str(tmp_path / "dst")) == tmp_path / "dst"  # local paths pass through
    # Only the published directories are visible: no hidden temp dirs left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "copy", "dst", "src"]


def test_local_reupload_replaces_the_whole_directory(tmp_path: Path) -> None:
    make_tree(tmp_path / "v1", "v1", n=4)
    v2 = make_tree(tmp_path / "v2", "v2", n=2)
    storage.upload_dir(tmp_path / "v1", str(tmp_path / "dst"))
    storage.upload_dir(tmp_path / "v2", str(tmp_path / "dst"))
    assert {k: v for k, v in read_tree(tmp_path / "dst").items() if k != "manifest.json"} == v2


def test_s3_round_trip(bucket: str, tmp_path: Path) -> None:
    base = f"s3://{bucket}"
    put_object(f"{base}/notes/a.txt", "héllo")
    put_object(f"{base}/notes/b.bin", b"\x00\x01")
    assert storage.read_bytes(f"{base}/notes/a.txt") == "héllo".encode()
    assert storage.read_bytes(f"{base}/notes/b.bin") == b"\x00\x01"
    assert storage.exists(f"{base}/notes/a.txt")
    assert storage.exists(f"{base}/notes")  # a prefix with objects
    assert not storage.exists(f"{base}/notes/missing.txt")
    assert not storage.exists(f"{base}/not")  # prefix semantics are directory semantics
    assert storage.list(f"{base}/notes") == [f"{base}/notes/a.txt", f"{base}/notes/b.bin"]

    src = tmp_path / "src"
    files = make_tree(src)
    storage.upload_dir(src, f"{base}/models/m1")
    assert storage.list_dirs(f"{base}/models") == ["m1"]
    listed = storage.list(f"{base}/models/m1")
    assert listed == sorted(f"{base}/models/m1/{p}" for p in [*files, "manifest.json"])

    out = storage.download_dir(f"{base}/models/m1", tmp_path / "dl")
    assert {k: v for k, v in read_tree(out).items() if k != "manifest.json"} == files
    assert_manifest_covers(out)

    cache = tmp_path / "cache"
    first = storage.materialize(f"{base}/models/m1", cache_dir=cache)
    assert {k: v for k, v in read_tree(first).items() if k != "manifest.json"} == files
    inode = first.stat().st_ino
    assert storage.materialize(f"{base}/models/m1", cache_dir=cache).stat().st_ino == inode  # cache hit: no new copy
    # A changed remote directory (new manifest) is fetched again, into the same place.
    files2 = make_tree(tmp_path / "src2", "v2")
    storage.upload_dir(tmp_path / "src2", f"{base}/models/m1")
    second = storage.materialize(f"{base}/models/m1", cache_dir=cache)
    assert second == first
    assert {k: v for k, v in read_tree(second).items() if k != "manifest.json"} == files2


def test_multipart_upload_and_download(bucket: str, tmp_path: Path) -> None:
    # S3 parts are at least 5 MiB (s3transfer enforces it), so 6 MiB + a bit makes two parts.
    src = tmp_path / "src"
    src.mkdir()
    big = hashlib.sha256(b"big").digest() * ((6 * MiB) // 32 + 100)
    (src / "weights.safetensors").write_bytes(big)
    small_threshold = storage.Storage(multipart_threshold=1 * MiB, multipart_chunksize=5 * MiB)
    small_threshold.upload_dir(src, f"s3://{bucket}/multi")
    etag = small_threshold.client.head_object(Bucket=bucket, Key="multi/weights.safetensors")["ETag"]
    assert etag.strip('"').endswith("-2"), etag  # a multipart ETag carries the part count

    # The default threshold (64 MiB) uploads the same file as one PUT: the setting is what made it multipart.
    storage.upload_dir(src, f"s3://{bucket}/single")
    etag = small_threshold.client.head_object(Bucket=bucket, Key="single/weights.safetensors")["ETag"]
    assert "-" not in etag

    out = small_threshold.download_dir(f"s3://{bucket}/multi", tmp_path / "dl")
    assert (out / "weights.safetensors").read_bytes() == big


# --------------------------------------------------------------------------- manifest contract


def test_manifest_is_written_last_and_stale_manifest_deleted_first(bucket: str, tmp_path: Path, on_s3_event) -> None:
    make_tree(tmp_path / "v1", "v1")
    storage.upload_dir(tmp_path / "v1", f"s3://{bucket}/m")
    make_tree(tmp_path / "v2", "v2")

    st = storage.Storage()
    calls: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def record(when: str):
        def hook(model, context, params=None, **kwargs):  # botocore passes keywords; API params only "before"
            if params is not None:
                context["test_key"] = params.get("Key", "")
            with lock:
                calls.append((when, model.name, context.get("test_key", "")))

        return hook

    on_s3_event("before-parameter-build.s3", record("before"))
    on_s3_event("after-call.s3", record("after"))
    st.upload_dir(tmp_path / "v2", f"s3://{bucket}/m")

    changes = [c[1:] for c in calls if c[0] == "before" and c[1] in ("PutObject", "DeleteObject")]
    assert changes[0] == ("PutObject", f"m/{storage.UPLOADING}")  # marks the prefix as an upload of ours
    assert changes[1] == ("DeleteObject", "m/manifest.json")  # the old version stops being readable first
    writes = [c for c in calls if c[1] == "PutObject"]
    assert writes[-1][2] == "m/manifest.json"
    manifest_start = calls.index(("before", "PutObject", "m/manifest.json"))
    last_file_done = max(i for i, c in enumerate(calls) if c[0] == "after" and c[1] == "PutObject" and c[2] != "m/manifest.json")
    assert last_file_done < manifest_start


def test_tampered_object_is_detected(bucket: str, s3_env: S3Server, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    uri = f"s3://{bucket}/m"
    storage.upload_dir(tmp_path / "src", uri)
    client = s3_env.client()
    name = sorted(files)[0]

    same_size = bytes(len(files[name]))
    client.put_object(Bucket=bucket, Key=f"m/{name}", Body=same_size)
    with pytest.raises(StorageError) as exc:
        storage.download_dir(uri, tmp_path / "dl")
    assert "sha256 does not match manifest" in one_line_naming(exc, f"{uri}/{name}")
    assert not (tmp_path / "dl").exists()  # nothing half-downloaded is left visible

    client.put_object(Bucket=bucket, Key=f"m/{name}", Body=b"short")
    with pytest.raises(StorageError) as exc:
        storage.materialize(uri, cache_dir=tmp_path / "cache")
    assert "does not match manifest" in one_line_naming(exc, f"{uri}/{name}")

    # Local directories get the same check.
    storage.upload_dir(tmp_path / "src", str(tmp_path / "local"))
    (tmp_path / "local" / name).write_bytes(same_size)
    with pytest.raises(StorageError) as exc:
        storage.download_dir(str(tmp_path / "local"), tmp_path / "copy")
    assert "sha256" in one_line_naming(exc, name)


def test_directory_without_manifest_is_refused(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/half"
    put_object(f"{uri}/adapter_model.safetensors", b"partial")
    for read in (lambda: storage.download_dir(uri, tmp_path / "dl"), lambda: storage.materialize(uri, tmp_path / "c")):
        with pytest.raises(StorageError) as exc:
            read()
        assert "incomplete" in one_line_naming(exc, uri)
    assert not (tmp_path / "dl").exists()

    (tmp_path / "localhalf").mkdir()
    (tmp_path / "localhalf" / "train.jsonl").write_text("{}\n")
    with pytest.raises(StorageError) as exc:
        storage.download_dir(str(tmp_path / "localhalf"), tmp_path / "copy")
    assert "incomplete" in one_line_naming(exc, str(tmp_path / "localhalf"))


def test_never_replaces_a_foreign_directory(bucket: str, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    storage.upload_dir(tmp_path / "src", f"s3://{bucket}/m")
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    for op in (lambda: storage.download_dir(f"s3://{bucket}/m", home), lambda: storage.upload_dir(tmp_path / "src", str(home))):
        with pytest.raises(StorageError) as exc:
            op()
        assert "refusing to replace it" in one_line_naming(exc, str(home))
    assert read_tree(home) == {"thesis.tex": b"years of work"}
    (tmp_path / "empty").mkdir()  # an empty directory (e.g. pre-created by a pipeline runner) is fine
    storage.download_dir(f"s3://{bucket}/m", tmp_path / "empty")
    assert_manifest_covers(tmp_path / "empty")


def test_never_uploads_over_a_foreign_prefix(bucket: str, tmp_path: Path) -> None:
    """S3 keeps the local rule: only an empty prefix, an earlier complete directory, or an upload of
    vembed's own that did not finish is written over."""
    make_tree(tmp_path / "src")
    uri = f"s3://{bucket}/data"
    put_object(f"{uri}/raw.jsonl", b"the user's raw data")
    with pytest.raises(StorageError) as exc:
        storage.upload_dir(tmp_path / "src", uri)
    assert "refusing to replace it" in one_line_naming(exc, uri)
    ran = []
    with pytest.raises(StorageError) as exc, storage.staging_dir(uri) as tmp:
        ran.append(tmp)  # a step's work: refused before it starts, as staged_dir does locally
    assert "refusing to replace it" in one_line_naming(exc, uri)
    assert ran == [] and storage.list(uri) == [f"{uri}/raw.jsonl"]
    assert storage.read_bytes(f"{uri}/raw.jsonl") == b"the user's raw data"


def test_concurrent_materialize_of_one_uri(bucket: str, tmp_path: Path, on_s3_event) -> None:
    files = make_tree(tmp_path / "src", n=6, size=200_000)
    storage.upload_dir(tmp_path / "src", f"s3://{bucket}/m")
    results: list[Path | Exception] = []
    st = storage.Storage()
    file_gets: list[str] = []
    on_s3_event(
        "before-parameter-build.s3.GetObject",
        lambda params, **kwargs: file_gets.append(params["Key"]) if not params["Key"].endswith("manifest.json") else None,
    )

    def fetch() -> None:
        try:
            results.append(st.materialize(f"s3://{bucket}/m", cache_dir=tmp_path / "cache"))
        except Exception as e:  # collected and asserted on below
            results.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]  # like the ranks of one launch
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, Path) for r in results), results
    assert len(set(results)) == 1
    assert {k: v for k, v in read_tree(results[0]).items() if k != "manifest.json"} == files
    assert sorted(file_gets) == sorted(f"m/{p}" for p in files)  # one download; the others waited and reused it


def test_staging_dir_publishes_only_on_success(bucket: str, tmp_path: Path) -> None:
    for uri in (str(tmp_path / "out"), f"s3://{bucket}/out"):
        with pytest.raises(RuntimeError), storage.staging_dir(uri) as stage:
            (stage / "train.jsonl").write_text("x\n")
            raise RuntimeError("crash while writing")
        assert not storage.exists(uri)
        with storage.staging_dir(uri) as stage:
            (stage / "train.jsonl").write_text("x\n")
        assert [e["path"] for e in storage.Storage().read_manifest(uri)["files"]] == ["train.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------- one-line errors


def test_missing_bucket(s3_env: S3Server, tmp_path: Path) -> None:
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/data/x.jsonl"
    make_tree(tmp_path / "src")
    for op in (
        lambda: storage.read_bytes(uri),
        lambda: storage.exists(uri),
        lambda: storage.download_file(uri, tmp_path / "x"),
        lambda: storage.list(uri),
        lambda: storage.upload_dir(tmp_path / "src", uri),
        lambda: storage.download_dir(uri, tmp_path / "dl"),
    ):
        with pytest.raises(StorageError) as exc:
            op()
        assert "does not exist" in one_line_naming(exc, uri)


def test_missing_object_is_404(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/nope.jsonl"
    for op in (lambda: storage.read_bytes(uri), lambda: storage.download_file(uri, tmp_path / "x")):
        with pytest.raises(StorageError) as exc:
            op()
        assert "not found (HTTP 404)" in one_line_naming(exc, uri)


def test_a_key_with_dotdot_is_never_cached_outside_the_cache(bucket: str, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", n=2, size=100)
    uri = f"s3://{bucket}/a/../../../../escaped"  # S3 stores the key as it is
    storage.upload_dir(tmp_path / "src", uri)
    with pytest.raises(StorageError) as exc:
        storage.materialize(uri, tmp_path / "outer" / "cache")
    assert "'..'" in one_line_naming(exc, uri)
    assert not (tmp_path / "outer").exists()


def test_missing_directory_is_not_found_not_incomplete(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/no-such-model"  # a typo, not a crashed upload
    for read in (lambda: storage.download_dir(uri, tmp_path / "dl"), lambda: storage.materialize(uri, tmp_path / "c"),
                 lambda: storage.manifest_sha256(uri)):  # fmt: skip
        with pytest.raises(StorageError) as exc:
            read()
        line = one_line_naming(exc, uri)
        assert line.endswith(": not found") and "incomplete" not in line
    assert not (tmp_path / "dl").exists()


def test_missing_credentials(bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    # Close every other link of the AWS chain so the test is hermetic (no instance metadata lookups).
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    make_tree(tmp_path / "src")
    for uri, op in (
        (f"s3://{bucket}/x", lambda: storage.read_bytes(f"s3://{bucket}/x")),
        (f"s3://{bucket}/d", lambda: storage.upload_dir(tmp_path / "src", f"s3://{bucket}/d")),
    ):
        with pytest.raises(StorageError) as exc:
            op()
        assert "no AWS credentials" in one_line_naming(exc, uri)


@pytest.fixture
def iam_auth(s3_env: S3Server, bucket: str) -> Iterator[dict[str, str]]:
    """Turn on moto's IAM checks (off by default) and yield keys of a user with no permissions.

    The switch is moto's documented /moto-api/reset-auth endpoint; it is process-wide, so it is
    always switched back off.
    """
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_env.endpoint, region_name=s3_env.region)
    user = f"nobody-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def set_auth(count: str) -> None:
        request = urllib.request.Request(
            f"{s3_env.endpoint}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(request, timeout=10).read()

    set_auth("0")  # every request from now on must be authenticated and authorised
    try:
        yield {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        set_auth("inf")


def test_access_denied_is_403(bucket: str, iam_auth: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k, v in iam_auth.items():
        monkeypatch.setenv(k, v)
    make_tree(tmp_path / "src")
    for uri, op in (
        (f"s3://{bucket}/x", lambda: storage.read_bytes(f"s3://{bucket}/x")),
        (f"s3://{bucket}/x", lambda: storage.exists(f"s3://{bucket}/x")),
        (f"s3://{bucket}/d", lambda: storage.upload_dir(tmp_path / "src", f"s3://{bucket}/d")),
    ):
        with pytest.raises(StorageError) as exc:
            op()
        message = one_line_naming(exc, uri)
        assert "access denied (HTTP 403" in message
        assert iam_auth["AWS_SECRET_ACCESS_KEY"] not in message

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key-id")
    with pytest.raises(StorageError) as exc:
        storage.read_bytes(f"s3://{bucket}/x")
    assert "rejected the credentials (InvalidAccessKeyId, HTTP 403)" in one_line_naming(exc, f"s3://{bucket}/x")


# --------------------------------------------------------------------------- fault: server stops mid-upload


class RestartableS3:
    """A private moto server that the test can stop and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def restartable_s3(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[RestartableS3]:
    s3 = RestartableS3()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # same credentials as s3_env, other server
    try:
        yield s3
    finally:
        s3.stop()


def test_server_stops_during_directory_upload(restartable_s3: RestartableS3, tmp_path: Path) -> None:
    bucket = f"fault-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{bucket}/model"
    fast_fail = {"max_attempts": 2, "max_concurrency": 2}  # standard retries, but do not wait long for a dead server
    storage.Storage(**fast_fail).client.create_bucket(Bucket=bucket)
    make_tree(tmp_path / "v1", "v1", n=4)
    storage.upload_dir(tmp_path / "v1", uri)  # a complete older version is in place
    v2 = make_tree(tmp_path / "v2", "v2", n=16, size=256 * 1024)
    total = sum(len(b) for b in v2.values())

    sent = 0
    stopped = threading.Event()
    lock = threading.Lock()

    def stop_server_at_a_quarter(n: int) -> None:
        nonlocal sent
        # Under the lock, so other transfers make no progress until the server is gone.
        with lock:
            sent += n
            if sent > total // 4 and not stopped.is_set():
                restartable_s3.stop()
                stopped.set()

    with pytest.raises(StorageError) as exc:
        storage.Storage(**fast_fail).upload_dir(tmp_path / "v2", uri, progress=stop_server_at_a_quarter)
    assert "cannot reach S3" in one_line_naming(exc, uri)
    assert stopped.is_set()

    restartable_s3.start()
    st = storage.Storage(**fast_fail)
    # moto keeps its state in the process (not in the server thread), so a restart on the same
    # port keeps the bucket and the objects of the interrupted upload, like a real server would.
    assert bucket in [b["Name"] for b in st.client.list_buckets()["Buckets"]]
    left = st.list(uri)
    assert f"{uri}/manifest.json" not in left  # the old manifest went first, the new one never came
    v2_landed = [p for p in v2 if f"{uri}/{p}" in left and st.read_bytes(f"{uri}/{p}") == v2[p]]
    assert 0 < len(v2_landed) < len(v2)  # a real partial upload: some new files, not all

    # Readers refuse the mix of old and new files.
    for read in (lambda: st.download_dir(uri, tmp_path / "reader"), lambda: st.materialize(uri, tmp_path / "cache")):
        with pytest.raises(StorageError) as exc:
            read()
        assert "incomplete" in one_line_naming(exc, uri)

    # The retry completes; a reader in the middle of it still sees an incomplete directory.
    mid_upload: list[str] = []

    def read_halfway(n: int) -> None:
        nonlocal sent
        with lock:
            sent += n
            check = sent > total // 2 and not mid_upload
            if check:
                try:
                    storage.Storage(**fast_fail).download_dir(uri, tmp_path / "mid-reader")
                    mid_upload.append("read a directory that was still being uploaded")
                except StorageError as e:
                    mid_upload.append(str(e))

    sent = 0
    st.upload_dir(tmp_path / "v2", uri, progress=read_halfway)
    assert len(mid_upload) == 1 and "incomplete" in mid_upload[0], mid_upload
    out = st.download_dir(uri, tmp_path / "final")
    assert {k: v for k, v in read_tree(out).items() if k != "manifest.json"} == v2
    assert json.loads((out / "manifest.json").read_text())["files"][0]["path"] == sorted(v2)[0]
