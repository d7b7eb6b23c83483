"""Local paths and `s3://bucket/key` through one boto3 client per process.

boto3 does the work: its managed transfers (multipart, concurrent, retried), paginators,
endpoint resolution (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, read by botocore itself) and
the standard AWS credential chain. What is vembed's own:

- a directory is complete only when its `manifest.json` exists: it is written last, lists the
  size and sha256 of every file, and every download is verified against it;
- only an empty directory or an earlier complete one is ever replaced;
- `.../latest` snapshots are resolved by vembed.steps.prepare over `list_dirs`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vembed.atomic_dir import staged_dir
from vembed.errors import StorageError
from vembed.integrity import sha256_file
from vembed.redaction import redact

S3_SCHEME = "s3://"
MANIFEST = "manifest.json"
MiB = 1024 * 1024
# Called with the bytes moved since the last call (negative when a retried part is rewound).
ProgressCallback = Callable[[int], None]


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not is_s3(uri) or not bucket:
        raise StorageError(f"{uri}: not an s3://bucket/key URI")
    return bucket, key


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    if is_s3(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri).joinpath(*parts))


def _dir_key(key: str) -> str:
    """A prefix with directory semantics: `raw` lists `raw/...`, never `raw-old/...`."""
    return f"{key.strip('/')}/" if key.strip("/") else ""


# --------------------------------------------------------------------------- manifests


def build_manifest(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Size and sha256 of every file under `local_dir` (a top-level manifest.json excluded)."""
    root = Path(local_dir)
    files = [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    ]
    return {"version": 1, "files": files}


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        for entry in manifest["files"]:
            rel, _, _ = entry["path"], int(entry["size"]), str(entry["sha256"])
            # A manifest must never make us write outside the target directory.
            if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
                raise ValueError(f"unsafe path {rel!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{where}: invalid {MANIFEST} ({e})") from None
    return manifest


def _verify_file(path: Path, entry: dict[str, Any], where: str) -> None:
    if (size := path.stat().st_size) != entry["size"]:
        raise StorageError(f"{where}: size {size} does not match manifest ({entry['size']}); the copy is corrupt")
    if sha256_file(path) != entry["sha256"]:
        raise StorageError(f"{where}: sha256 does not match manifest; the copy is corrupt")


def _incomplete(uri: str) -> StorageError:
    return StorageError(
        f"{uri}: no {MANIFEST}, so the directory is incomplete (an upload crashed or is still running); refusing to read it"
    )


def _write_manifest_last(local_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = local_dir / f".{MANIFEST}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(_manifest_bytes(manifest))
    os.replace(tmp, local_dir / MANIFEST)


def _check_replaceable(dest: Path) -> None:
    """Only an empty directory or an earlier complete one (with a manifest) may be replaced."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise StorageError(f"{dest}: exists and is not a directory; refusing to replace it")
    if dest.is_dir() and not (dest / MANIFEST).is_file() and any(dest.iterdir()):
        raise StorageError(f"{dest}: exists, is not empty and has no {MANIFEST}; refusing to replace it")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (e.g. every rank of a launch fetching one model)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


# --------------------------------------------------------------------------- errors


def _storage_error(uri: str, exc: BaseException, endpoint: str | None = None) -> StorageError | None:
    """One line that names the URI for a boto/botocore/OS failure; None for anything else (a bug)."""
    import botocore.exceptions as bex

    # Transfer wrappers (S3UploadFailedError, RetriesExceededError) carry the real cause.
    while exc is not None and not isinstance(exc, (bex.BotoCoreError, bex.ClientError, OSError, StorageError)):
        exc = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if exc is None or isinstance(exc, StorageError):
        return exc
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return StorageError(
            f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or configure the standard AWS credential chain)"
        )
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ConnectTimeoutError)):
        where = redact(endpoint) if endpoint else "the default AWS endpoint"
        return _transient(StorageError(f"{uri}: cannot reach S3 at {where} ({type(exc).__name__}, after retries)"))
    if isinstance(exc, bex.ReadTimeoutError):
        return _transient(StorageError(f"{uri}: S3 read timed out (after retries)"))
    if isinstance(exc, bex.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: bucket {split_s3(uri)[0]!r} does not exist")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return StorageError(f"{uri}: the S3 server rejected the credentials ({code}, HTTP {status})")
        if code in ("AccessDenied", "AllAccessDisabled", "Forbidden") or status == 403:
            reason = code if code and not code.isdigit() else "Forbidden"
            return StorageError(f"{uri}: access denied (HTTP 403, {reason}); check the bucket policy and IAM permissions")
        if _is_404(exc):
            return StorageError(f"{uri}: not found (HTTP 404)")
        err = StorageError(f"{uri}: S3 error {code or 'unknown'} (HTTP {status})")
        throttled = code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests")
        return _transient(err) if throttled or status == 429 or (status or 0) >= 500 else err
    if isinstance(exc, bex.BotoCoreError):
        return StorageError(f"{uri}: S3 client error ({type(exc).__name__})")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{uri}: not found")
    return StorageError(f"{uri}: {getattr(exc, 'strerror', None) or type(exc).__name__}")


def _transient(err: StorageError) -> StorageError:
    """Network errors, 5xx and throttling: a later attempt may succeed (see vembed.retry)."""
    err.transient = True
    return err


def _is_404(exc: BaseException) -> bool:
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


@functools.lru_cache(maxsize=16)
def _client(endpoint_url: str | None, max_attempts: int, pool: int, aws_env: tuple[tuple[str, str], ...]) -> Any:
    """One client per endpoint and AWS environment (clients are thread-safe; building one is slow)."""
    import boto3
    from botocore.config import Config

    from vembed.endpoints import check_tcp

    # connect_timeout: the default 60 s, times every retry, is a hang to a user.
    config = Config(retries={"mode": "standard", "max_attempts": max_attempts}, connect_timeout=5, max_pool_connections=pool)
    session = boto3.session.Session()
    client = session.client("s3", endpoint_url=endpoint_url, config=config)  # None: botocore reads AWS_ENDPOINT_URL*
    endpoint = client.meta.endpoint_url
    if "amazonaws.com" not in endpoint:  # MinIO, SeaweedFS, moto: fail fast, and no bucket.host DNS names
        check_tcp(endpoint, "S3", StorageError)
        client = session.client("s3", endpoint_url=endpoint, config=config.merge(Config(s3={"addressing_style": "path"})))
    return client


# --------------------------------------------------------------------------- the API


class Storage:
    """Storage operations with one transfer/retry setting; the module functions use the defaults."""

    def __init__(
        self,
        endpoint_url: str | None = None,
        *,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 8,
        max_attempts: int = 5,
    ) -> None:
        self._client_args = (endpoint_url, max_attempts, max(10, max_concurrency + 2))
        self._transfer = dict(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency, preferred_transfer_client="classic",
        )  # fmt: skip

    @property
    def client(self) -> Any:
        return _client(*self._client_args, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))

    def _call(self, uri: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one boto3 (or file) call; every failure becomes a one-line StorageError naming `uri`."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if _is_404(e) and is_s3(uri):  # a 404 does not say whether the key or the bucket is missing
                self._check_bucket(uri)
            raise self._error(uri, e) from None

    def _error(self, uri: str, exc: Exception) -> StorageError:
        err = _storage_error(uri, exc, self.client.meta.endpoint_url if is_s3(uri) else None)
        if err is None:  # not a storage failure: a bug, raised as it is
            raise exc
        return err

    def _check_bucket(self, uri: str) -> None:
        bucket = split_s3(uri)[0]
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception as e:
            if _is_404(e):
                raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from None
            raise self._error(uri, e) from None

    def _transfer_args(self, progress: ProgressCallback | None) -> dict[str, Any]:
        from boto3.s3.transfer import TransferConfig

        return {"Config": TransferConfig(**self._transfer), "Callback": progress}

    def _head(self, uri: str) -> dict[str, Any] | None:
        """Object metadata, or None if the object is missing (a missing bucket raises)."""
        bucket, key = split_s3(uri)
        try:
            return self.client.head_object(Bucket=bucket, Key=key)
        except Exception as e:
            if not _is_404(e):
                raise self._error(uri, e) from None
        self._check_bucket(uri)
        return None

    def exists(self, uri: str | os.PathLike[str]) -> bool:
        """A file/object, or a directory/prefix holding at least one object."""
        if not is_s3(uri):
            return Path(uri).exists()
        bucket, key = split_s3(uri)
        if key and self._head(uri) is not None:
            return True
        return self._call(uri, self.client.list_objects_v2, Bucket=bucket, Prefix=_dir_key(key), MaxKeys=1)["KeyCount"] > 0

    def read_bytes(self, uri: str | os.PathLike[str]) -> bytes:
        if not is_s3(uri):
            return self._call(str(uri), Path(uri).read_bytes)
        bucket, key = split_s3(uri)
        return self._call(uri, lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def download_file(self, uri: str, local_path: str | os.PathLike[str], progress: ProgressCallback | None = None) -> Path:
        """One object to a local path; boto3 writes a temporary name and renames, so it is never partial."""
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        self._call(uri, self.client.download_file, *split_s3(uri), str(local_path), **self._transfer_args(progress))
        return Path(local_path)

    def delete(self, uri: str) -> None:
        """Delete one object/file; missing is fine."""
        if not is_s3(uri):
            return Path(uri).unlink(missing_ok=True)
        bucket, key = split_s3(uri)
        self._call(uri, self.client.delete_object, Bucket=bucket, Key=key)

    def list(self, uri_prefix: str | os.PathLike[str], delimiter: str = "") -> list[str]:
        """Every file/object under a directory or prefix, recursively, sorted; a file lists itself."""
        if not is_s3(uri_prefix):
            root = Path(uri_prefix)
            return [str(root)] if root.is_file() else sorted(str(p) for p in root.rglob("*") if p.is_file())
        bucket, key = split_s3(uri_prefix)
        if key and not key.endswith("/") and not delimiter and self._head(uri_prefix) is not None:
            return [uri_prefix]
        args = {"Bucket": bucket, "Prefix": _dir_key(key), **({"Delimiter": delimiter} if delimiter else {})}
        pages = self._call(uri_prefix, self.client.get_paginator("list_objects_v2").paginate(**args).build_full_result)
        if delimiter:
            return sorted(p["Prefix"][len(_dir_key(key)) :].rstrip("/") for p in pages.get("CommonPrefixes", []))
        return sorted(f"{S3_SCHEME}{bucket}/{o['Key']}" for o in pages.get("Contents", []) if not o["Key"].endswith("/"))

    def list_dirs(self, uri: str | os.PathLike[str]) -> list[str]:
        """Names of the immediate sub-directories (sub-prefixes), sorted."""
        if not is_s3(uri):
            root = Path(uri)
            return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != ".") if root.is_dir() else []
        return [n for n in self.list(uri, delimiter="/") if n]

    def read_manifest(self, uri: str | os.PathLike[str]) -> dict[str, Any]:
        """The manifest of a complete directory; StorageError if it has none."""
        where = join(uri, MANIFEST)
        if not (self._head(where) is not None if is_s3(uri) else Path(where).is_file()):
            raise StorageError(f"{uri}: not found") if not (is_s3(uri) or Path(uri).exists()) else _incomplete(str(uri))
        return _parse_manifest(self.read_bytes(where), where)

    def upload_dir(self, local_dir: str | os.PathLike[str], uri: str, progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Copy a local directory to `uri`, the manifest last; returns it.

        Any old manifest at `uri` is deleted first, so a crashed or retried upload reads as
        incomplete until the new manifest lands.
        """
        src = Path(local_dir)
        if not src.is_dir():
            raise StorageError(f"{local_dir}: not a directory")
        if not is_s3(uri):
            with self.staging_dir(uri) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            return build_manifest(uri)
        manifest = build_manifest(src)
        bucket, key = split_s3(uri)
        self._call(uri, self.client.delete_object, Bucket=bucket, Key=_dir_key(key) + MANIFEST)
        for e in manifest["files"]:
            upload = self.client.upload_file
            self._call(uri, upload, str(src / e["path"]), bucket, _dir_key(key) + e["path"], **self._transfer_args(progress))
        # Every file is in place: now, and only now, the directory becomes complete.
        self._call(uri, self.client.put_object, Bucket=bucket, Key=_dir_key(key) + MANIFEST, Body=_manifest_bytes(manifest))
        return manifest

    def download_dir(
        self, uri: str | os.PathLike[str], local_dir: str | os.PathLike[str], progress: ProgressCallback | None = None
    ) -> Path:
        """Copy a complete directory to `local_dir`, verifying every file; refuses one without a manifest.

        `local_dir` is replaced as a whole, and holds a manifest.json of its own afterwards.
        """
        manifest = self.read_manifest(uri)
        with staged_dir(local_dir, may_replace=_check_replaceable) as tmp:
            for entry in manifest["files"]:
                where, target = join(uri, entry["path"]), tmp / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                if is_s3(where):
                    self.download_file(where, target, progress)
                else:
                    self._call(where, shutil.copyfile, where, target)
                _verify_file(target, entry, where)
            _write_manifest_last(tmp, manifest)
        return Path(local_dir)

    def materialize(self, uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local directory for `uri`: local paths pass through; s3 is downloaded and verified.

        Downloads are cached under `cache_dir` (default $VEMBED_CACHE_DIR or ~/.cache/vembed)
        and reused while the remote manifest is unchanged.
        """
        if not is_s3(uri):
            if not Path(uri).exists():
                raise StorageError(f"{uri}: not found")
            return Path(uri)
        bucket, key = split_s3(uri)
        root = Path(cache_dir or os.environ.get("VEMBED_CACHE_DIR") or Path.home() / ".cache" / "vembed")
        dest = root / "s3" / bucket / (key.strip("/") or "_root")
        remote = self.read_manifest(uri)
        with _file_lock(dest.with_name(f".{dest.name}.lock")):
            if _cache_matches(dest, remote):
                return dest
            return self.download_dir(uri, dest)

    @contextlib.contextmanager
    def staging_dir(self, uri: str | os.PathLike[str]) -> Iterator[Path]:
        """Write a directory locally, then publish it to `uri` complete with its manifest.

        Local `uri`: a hidden sibling is renamed into place. s3: uploaded, manifest last.
        On an exception nothing is published.
        """
        if is_s3(uri):
            tmp = Path(tempfile.mkdtemp(prefix="vembed-stage-"))
            try:
                yield tmp
                self.upload_dir(tmp, str(uri))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        with staged_dir(Path(uri), may_replace=_check_replaceable) as tmp:
            yield tmp
            _write_manifest_last(tmp, build_manifest(tmp))

    def manifest_sha256(self, uri: str | os.PathLike[str]) -> str:
        """sha256 of a complete directory's manifest: one id for all of its content."""
        return hashlib.sha256(_manifest_bytes(self.read_manifest(uri))).hexdigest()


def _cache_matches(dest: Path, manifest: dict[str, Any]) -> bool:
    """Files were verified when downloaded; a size check catches later truncation cheaply."""
    try:
        cached = json.loads((dest / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False
    files = manifest["files"]
    return cached == manifest and all((dest / e["path"]).is_file() and (dest / e["path"]).stat().st_size == e["size"] for e in files)


# The module API: the default Storage (its client is built on first use, then shared).
_DEFAULT = Storage()
exists, read_bytes, download_file, delete = _DEFAULT.exists, _DEFAULT.read_bytes, _DEFAULT.download_file, _DEFAULT.delete
list_dirs, upload_dir, download_dir, materialize = _DEFAULT.list_dirs, _DEFAULT.upload_dir, _DEFAULT.download_dir, _DEFAULT.materialize
staging_dir, manifest_sha256, list_uris = _DEFAULT.staging_dir, _DEFAULT.manifest_sha256, _DEFAULT.list
list = list_uris  # noqa: A001  (`storage.list(...)` reads naturally at call sites)
