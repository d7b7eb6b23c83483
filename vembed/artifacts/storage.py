"""Local paths and `s3://bucket/key` through one cached boto3 client per process.

boto3 does the work: managed transfers, paginators, retries, endpoint resolution (botocore reads
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` itself) and the AWS credential chain. vembed's own rules
(vembed.artifacts.integrity): a directory is complete only once its manifest is written, last; every download
is verified against it; only an empty or an earlier complete directory (on s3 also an unfinished upload of
vembed's own, marked by UPLOADING) is ever replaced.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from vembed.artifacts import integrity as mf
from vembed.artifacts.atomic_dir import staged_dir
from vembed.artifacts.integrity import MANIFEST, build_manifest
from vembed.endpoints import check_tcp
from vembed.errors import StorageError
from vembed.redaction import redact

S3_SCHEME = "s3://"
# Put first and deleted last by an s3 upload_dir: marks a prefix without a manifest as an unfinished upload
# of vembed's own, which a retry may write over (a prefix with anything else in it is refused).
UPLOADING = ".vembed-uploading"
# Called with the bytes moved since the last call (negative when a retried part is rewound).
ProgressCallback = Callable[[int], None]


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not is_s3(uri) or not bucket:
        raise StorageError(f"{uri}: not an s3://bucket/key URI")
    return bucket, key


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    if is_s3(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri).joinpath(*parts))


def _object(uri: str) -> dict[str, str]:
    bucket, key = split_s3(uri)
    return {"Bucket": bucket, "Key": key}


def _dir_key(key: str) -> str:
    """A prefix with directory semantics: `raw` lists `raw/...`, never `raw-old/...`."""
    return f"{key.strip('/')}/" if key.strip("/") else ""


def _storage_error(uri: str, exc: BaseException, endpoint: str | None = None) -> StorageError | None:
    """One line that names the URI for a boto/botocore/OS failure; None for anything else (a bug)."""
    import botocore.exceptions as bex

    # Transfer wrappers (S3UploadFailedError, RetriesExceededError) carry the real cause.
    while exc is not None and not isinstance(exc, (bex.BotoCoreError, bex.ClientError, OSError, StorageError)):
        exc = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if exc is None or isinstance(exc, StorageError):
        return exc
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return StorageError(f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or configure the standard AWS credential chain)")
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ConnectTimeoutError, bex.ReadTimeoutError)):
        where = redact(endpoint) if endpoint else "the default AWS endpoint"
        return _transient(StorageError(f"{uri}: cannot reach S3 at {where} ({type(exc).__name__}, after retries)"))
    if isinstance(exc, bex.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
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
    err.transient = True  # network errors, 5xx and throttling: a later attempt may succeed (vembed.retry)
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

    # connect_timeout: the default 60 s, times every retry, is a hang to a user.
    config = Config(retries={"mode": "standard", "max_attempts": max_attempts}, connect_timeout=5, max_pool_connections=pool)
    session = boto3.session.Session()
    client = session.client("s3", endpoint_url=endpoint_url, config=config)  # None: botocore reads AWS_ENDPOINT_URL*
    endpoint = client.meta.endpoint_url
    if "amazonaws.com" not in endpoint:  # MinIO, SeaweedFS, moto: fail fast, and no bucket.host DNS names
        check_tcp(endpoint, "S3", StorageError)
        client = session.client("s3", endpoint_url=endpoint, config=config.merge(Config(s3={"addressing_style": "path"})))
    return client


class Storage:
    """Storage operations with one transfer/retry setting; the module functions use the defaults."""

    def __init__(self, endpoint_url: str | None = None, *, multipart_threshold: int = 64 * 2**20,
                 multipart_chunksize: int = 16 * 2**20, max_concurrency: int = 8, max_attempts: int = 5) -> None:  # fmt: skip
        self._client_args = (endpoint_url, max_attempts, max(10, max_concurrency + 2))
        self._config = {"multipart_threshold": multipart_threshold, "multipart_chunksize": multipart_chunksize,
                          "max_concurrency": max_concurrency, "preferred_transfer_client": "classic"}  # fmt: skip

    @property
    def client(self) -> Any:
        return _client(*self._client_args, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))

    def _call(self, uri: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        """Run one boto3 (or file) call; a failure becomes a one-line StorageError naming `uri`."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            cause: Exception = e
            if _is_404(e) and is_s3(uri):  # a 404 does not say whether the key or the bucket is missing
                bucket = split_s3(uri)[0]
                try:
                    self.client.head_bucket(Bucket=bucket)
                    if missing_ok:  # the bucket is there: the object is just missing
                        return None
                except Exception as b:
                    cause = StorageError(f"{uri}: bucket {bucket!r} does not exist") if _is_404(b) else b
            err = _storage_error(uri, cause, self.client.meta.endpoint_url if is_s3(uri) else None)
            if err is None:  # not a storage failure: a bug, raised as it is
                raise
            raise err from None

    def _transfer(self, calls: list[tuple[str, str, tuple[str, ...]]], progress: ProgressCallback | None) -> None:
        """Run (uri, "upload"/"download", args) calls at once through one boto3 transfer manager,
        cancelled on the first failure; a file is never partial (s3transfer renames when done)."""
        from boto3.s3.transfer import ProgressCallbackInvoker, TransferConfig, create_transfer_manager

        subscribers = [ProgressCallbackInvoker(progress)] if progress else None
        with create_transfer_manager(self.client, TransferConfig(**self._config)) as tm:
            futures = [(uri, getattr(tm, kind)(*args, subscribers=subscribers)) for uri, kind, args in calls]
            for uri, future in futures:
                self._call(uri, future.result)

    def _head(self, uri: str) -> dict[str, Any] | None:
        """Object metadata, or None if the object is missing (a missing bucket raises)."""
        return self._call(uri, self.client.head_object, **_object(uri), missing_ok=True)

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
        return self._call(uri, lambda: self.client.get_object(**_object(uri))["Body"].read())

    def download_file(self, uri: str, local_path: str | os.PathLike[str], progress: ProgressCallback | None = None) -> Path:
        """One object to a local path; boto3 writes a temporary name and renames, so it is never partial."""
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        self._transfer([(uri, "download", (*split_s3(uri), str(local_path)))], progress)
        return Path(local_path)

    def delete(self, uri: str) -> None:
        """Delete one object/file; missing is fine."""
        if not is_s3(uri):
            return Path(uri).unlink(missing_ok=True)
        self._call(uri, self.client.delete_object, **_object(uri))

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
            raise StorageError(f"{uri}: not found") if not self.exists(uri) else mf.incomplete(str(uri))
        return mf.parse_manifest(self.read_bytes(where), where)

    def upload_dir(self, local_dir: str | os.PathLike[str], uri: str, progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Copy a local directory to `uri` and return its manifest, which goes last; an old one goes
        first, so a crashed or retried upload reads as incomplete until the new manifest lands."""
        src = Path(local_dir)
        if not src.is_dir():
            raise StorageError(f"{local_dir}: not a directory")
        if not is_s3(uri):
            with self.staging_dir(uri) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            return self.read_manifest(uri)
        self.check_replaceable(uri)
        manifest = build_manifest(src)
        bucket, key = split_s3(uri)
        self._call(uri, self.client.put_object, Bucket=bucket, Key=_dir_key(key) + UPLOADING, Body=b"")
        self._call(uri, self.client.delete_object, Bucket=bucket, Key=_dir_key(key) + MANIFEST)
        self._transfer([(uri, "upload", (str(src / e["path"]), bucket, _dir_key(key) + e["path"])) for e in manifest["files"]], progress)
        # Every file is in place: now, and only now, the directory becomes complete.
        self._call(uri, self.client.put_object, Bucket=bucket, Key=_dir_key(key) + MANIFEST, Body=mf.manifest_bytes(manifest))
        self._call(uri, self.client.delete_object, Bucket=bucket, Key=_dir_key(key) + UPLOADING)
        return manifest

    def check_replaceable(self, uri: str) -> None:
        """The s3 side of integrity.check_replaceable: only an empty prefix, an earlier complete directory
        or an unfinished upload of ours may be written over."""
        if self.exists(uri) and self._head(join(uri, MANIFEST)) is None and self._head(join(uri, UPLOADING)) is None:
            raise StorageError(f"{uri}: exists, is not empty and has no {MANIFEST}; refusing to replace it")

    def download_dir(self, uri: str | os.PathLike[str], local_dir: str | os.PathLike[str], progress: ProgressCallback | None = None) -> Path:
        """Copy a complete directory to `local_dir` (replaced as a whole, manifest included), verifying
        every file; a directory without a manifest is refused."""
        manifest = self.read_manifest(uri)
        with staged_dir(local_dir) as tmp:
            files = [(join(uri, e["path"]), tmp / e["path"], e) for e in manifest["files"]]
            for _, target, _ in files:
                target.parent.mkdir(parents=True, exist_ok=True)
            if is_s3(uri):
                self._transfer([(where, "download", (*split_s3(where), str(target))) for where, target, _ in files], progress)
            for where, target, entry in files:
                if not is_s3(uri):
                    self._call(where, shutil.copyfile, where, target)
                mf.verify_file(target, entry, where)
            mf.write_manifest(tmp, manifest)
        return Path(local_dir)

    def materialize(self, uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local directory for `uri`: local paths pass through; s3 is downloaded, verified and cached
        under `cache_dir` (default $VEMBED_CACHE_DIR or ~/.cache/vembed) while its manifest is unchanged."""
        if not is_s3(uri):
            if not Path(uri).exists():
                raise StorageError(f"{uri}: not found")
            return Path(uri)
        bucket, key = split_s3(uri)
        if ".." in key.split("/"):  # S3 allows it, but the cached copy would land outside the cache
            raise StorageError(f"{uri}: a '..' in the key; vembed does not cache such a directory")
        root = Path(cache_dir or os.environ.get("VEMBED_CACHE_DIR") or Path.home() / ".cache" / "vembed")
        dest = root / "s3" / bucket / (key.strip("/") or "_root")
        remote = self.read_manifest(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(dest.with_name(f".{dest.name}.lock")):  # every rank of a launch fetching one model
            if mf.cache_matches(dest, remote):
                return dest
            return self.download_dir(uri, dest)

    @contextlib.contextmanager
    def staging_dir(self, uri: str | os.PathLike[str]) -> Iterator[Path]:
        """Write a directory locally, then publish it to `uri` with its manifest (local: a hidden
        sibling renamed into place; s3: uploaded, manifest last). On an exception nothing is published."""
        if is_s3(uri):
            self.check_replaceable(str(uri))  # before the work, as staged_dir does locally
            with tempfile.TemporaryDirectory(prefix="vembed-stage-") as tmp:
                yield Path(tmp)
                self.upload_dir(tmp, str(uri))
            return
        with staged_dir(Path(uri)) as tmp:
            yield tmp
            mf.write_manifest(tmp)

    def manifest_sha256(self, uri: str | os.PathLike[str]) -> str:
        """sha256 of a complete directory's manifest: one id for all of its content."""
        return hashlib.sha256(mf.manifest_bytes(self.read_manifest(uri))).hexdigest()


# The module API: the default Storage (its client is built on first use, then shared).
_DEFAULT = Storage()
exists, read_bytes, download_file, delete = _DEFAULT.exists, _DEFAULT.read_bytes, _DEFAULT.download_file, _DEFAULT.delete
list_dirs, upload_dir, download_dir, materialize = _DEFAULT.list_dirs, _DEFAULT.upload_dir, _DEFAULT.download_dir, _DEFAULT.materialize
staging_dir, manifest_sha256, list_uris = _DEFAULT.staging_dir, _DEFAULT.manifest_sha256, _DEFAULT.list
read_manifest = _DEFAULT.read_manifest
list = list_uris  # noqa: A001  (`storage.list(...)` reads naturally at call sites)
