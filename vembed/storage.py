"""One API over local paths and `s3://bucket/key` (boto3 and its transfer manager).

Directory contract (models, datasets): a directory is complete only when its
`manifest.json` exists. The manifest is written last and lists the relative path,
size and sha256 of every file; downloads verify every file against it. A directory
without a manifest is refused, so a crashed or half-finished upload is never read.

Endpoint: `endpoint_url=` or the standard `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
(MinIO, SeaweedFS, moto); none means AWS. Credentials come only from the standard
AWS chain (environment, shared files, instance roles): never a parameter here.
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

from vembed.atomic_dir import publish, staged_dir
from vembed.errors import StorageError
from vembed.integrity import sha256_file
from vembed.redaction import redact

S3_SCHEME = "s3://"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MiB = 1024 * 1024

# Called with the bytes moved since the last call (negative when a retried part is rewound).
ProgressCallback = Callable[[int], None]


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name in URI")
    return bucket, key


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(uri):
        base = str(uri).rstrip("/")
        return "/".join([base, *(p.strip("/") for p in parts)])
    return str(Path(uri).joinpath(*parts))


def _dir_key(key: str) -> str:
    """A key prefix with directory semantics: `raw` lists `raw/...` but never `raw-old/...`."""
    key = key.strip("/")
    return f"{key}/" if key else ""


# --------------------------------------------------------------------------- manifests


def build_manifest(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Size and sha256 of every file under `local_dir` (a top-level manifest.json excluded)."""
    root = Path(local_dir)
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return {"version": MANIFEST_VERSION, "files": files}


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        for entry in files:
            rel = entry["path"]
            int(entry["size"])
            str(entry["sha256"])
            # A manifest must never make us write outside the target directory.
            if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/") or not rel:
                raise ValueError(f"unsafe path {rel!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{where}: invalid {MANIFEST} ({e})") from None
    return manifest


def _verify_file(path: Path, entry: dict[str, Any], where: str) -> None:
    size = path.stat().st_size
    if size != entry["size"]:
        raise StorageError(f"{where}: size {size} does not match manifest ({entry['size']}); the copy is corrupt")
    if sha256_file(path) != entry["sha256"]:
        raise StorageError(f"{where}: sha256 does not match manifest; the copy is corrupt")


def verify_dir(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file of a local directory against its manifest; returns the manifest."""
    root = Path(local_dir)
    try:
        data = (root / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise _incomplete(str(root)) from None
    manifest = _parse_manifest(data, str(root / MANIFEST))
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.is_file():
            raise StorageError(f"{path}: listed in {MANIFEST} but missing")
        _verify_file(path, entry, str(path))
    return manifest


def _incomplete(uri: str) -> StorageError:
    return StorageError(
        f"{uri}: no {MANIFEST}, so the directory is incomplete (an upload crashed or is still running); "
        "refusing to read it"
    )


def _write_manifest_last(local_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = local_dir / f".{MANIFEST}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(_manifest_bytes(manifest))
    os.replace(tmp, local_dir / MANIFEST)


def _check_replaceable(dest: Path) -> None:
    """Only an empty directory or an earlier complete one (with a manifest) may be replaced."""
    if not (dest.exists() or dest.is_symlink()):
        return
    if not dest.is_dir():
        raise StorageError(f"{dest}: exists and is not a directory; refusing to replace it")
    if not (dest / MANIFEST).is_file() and any(dest.iterdir()):
        raise StorageError(f"{dest}: exists, is not empty and has no {MANIFEST}; refusing to replace it")


def _publish_local(tmp_dir: Path, dest: Path) -> None:
    """Move a finished directory into place; readers see the old one, nothing, or the new one."""
    _check_replaceable(dest)
    publish(tmp_dir, dest)


def _atomic_copy(src: Path, dest: Path, error: Callable[[str, BaseException], StorageError]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise error(str(src) if not src.exists() else str(dest), e) from None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (e.g. every rank of a launch fetching one model)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _local_tmp_sibling(dest: Path) -> Path:
    _check_replaceable(dest)  # fail before any work is done
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    return tmp


# --------------------------------------------------------------------------- errors


def _storage_error(uri: str, exc: BaseException, endpoint: str | None = None) -> StorageError | None:
    """One line that names the URI for a boto/botocore/OS failure; None for anything else (a bug)."""
    import botocore.exceptions as bex

    # Transfer-manager wrappers (RetriesExceededError, S3UploadFailedError) carry the real cause.
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, (bex.BotoCoreError, bex.ClientError, OSError, StorageError)):
        seen = getattr(seen, "last_exception", None) or seen.__cause__ or seen.__context__
    if seen is None:
        return None
    exc = seen
    if isinstance(exc, StorageError):
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
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            bucket = split_s3(uri)[0] if is_s3(uri) else "?"
            return StorageError(f"{uri}: bucket {bucket!r} does not exist")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return StorageError(f"{uri}: the S3 server rejected the credentials ({code}, HTTP {status})")
        if code in ("AccessDenied", "AllAccessDisabled", "Forbidden") or status == 403:
            reason = code if code and not code.isdigit() else "Forbidden"
            return StorageError(f"{uri}: access denied (HTTP 403, {reason}); check the bucket policy and IAM permissions")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return StorageError(f"{uri}: not found (HTTP 404)")
        err = StorageError(f"{uri}: S3 error {code or 'unknown'} (HTTP {status})")
        throttled = code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests")
        return _transient(err) if throttled or status == 429 or (status or 0) >= 500 else err
    if isinstance(exc, bex.BotoCoreError):
        return StorageError(f"{uri}: S3 client error ({type(exc).__name__})")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{uri}: not found")
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: permission denied")
    return StorageError(f"{uri}: {getattr(exc, 'strerror', None) or type(exc).__name__}")


def _transient(err: StorageError) -> StorageError:
    """Network errors, 5xx and throttling: a later attempt may succeed (see vembed.retry)."""
    err.transient = True
    return err


@functools.cache
def _shared_loader() -> Any:
    from botocore.loaders import create_loader

    return create_loader()


def _resolve_endpoint(explicit: str | None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _is_404(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _subscribers(progress: ProgressCallback | None) -> list[Any] | None:
    """s3transfer subscribers that forward byte counts to a plain callback."""
    if progress is None:
        return None
    from s3transfer.subscribers import BaseSubscriber

    class Progress(BaseSubscriber):
        def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
            progress(bytes_transferred)

    return [Progress()]


# --------------------------------------------------------------------------- the API


class Storage:
    """Storage operations with one S3 client configuration.

    Module-level functions (`exists`, `upload_dir`, ...) use `Storage()` with defaults;
    build one yourself for a custom endpoint, transfer tuning or retry count.
    """

    def __init__(
        self,
        endpoint_url: str | None = None,
        *,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 8,
        max_attempts: int = 5,
    ) -> None:
        self.endpoint_url = _resolve_endpoint(endpoint_url)
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self._client: Any = None

    # -- boto plumbing

    @property
    def client(self) -> Any:
        if self._client is None:
            if self.endpoint_url:  # a dead endpoint fails in seconds, not after minutes of retries
                from vembed.endpoints import check_tcp

                check_tcp(self.endpoint_url, "S3", StorageError)
            import boto3
            import botocore.session
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": self.max_attempts},
                connect_timeout=5,  # the default 60 s, times every retry, is a hang to a user
                max_pool_connections=max(10, self.max_concurrency + 2),
                # Custom endpoints (MinIO, SeaweedFS) rarely resolve bucket.host names.
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            )
            # A fresh session per Storage picks up the current environment (credentials, endpoint);
            # the shared loader keeps client creation cheap (parsed service models are cached).
            botocore_session = botocore.session.Session()
            botocore_session.register_component("data_loader", _shared_loader())
            session = boto3.session.Session(botocore_session=botocore_session)
            self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",  # same code path everywhere (no CRT surprise)
        )

    @contextlib.contextmanager
    def _transfers(self) -> Iterator[Any]:
        from boto3.s3.transfer import create_transfer_manager

        # On an exception the manager cancels what is still in flight.
        with create_transfer_manager(self.client, self._transfer_config()) as tm:
            yield tm

    def _error(self, uri: str, exc: BaseException) -> StorageError:
        """The StorageError to raise for `exc`; an unexpected exception (a bug) is re-raised as is."""
        err = _storage_error(uri, exc, self.endpoint_url)
        if err is None:
            raise exc
        return err

    def _check_bucket(self, uri: str) -> None:
        """A HEAD 404 does not say whether the key or the bucket is missing: ask."""
        bucket, _ = split_s3(uri)
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception as e:  # every failure becomes a one-line StorageError
            if _is_404(e):
                raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from None
            raise self._error(uri, e) from None

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

    # -- single objects

    def exists(self, uri: str | os.PathLike[str]) -> bool:
        """A file/object, or a directory/prefix holding at least one object."""
        if not is_s3(uri):
            return Path(uri).exists()
        uri = str(uri)
        if split_s3(uri)[1] and self._head(uri) is not None:
            return True
        bucket, key = split_s3(uri)
        try:
            resp = self.client.list_objects_v2(Bucket=bucket, Prefix=_dir_key(key), MaxKeys=1)
        except Exception as e:
            raise self._error(uri, e) from None
        return resp.get("KeyCount", 0) > 0

    def read_bytes(self, uri: str | os.PathLike[str]) -> bytes:
        if not is_s3(uri):
            try:
                return Path(uri).read_bytes()
            except OSError as e:
                raise self._error(str(uri), e) from None
        uri = str(uri)
        bucket, key = split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:
            raise self._error(uri, e) from None

    def read_text(self, uri: str | os.PathLike[str], encoding: str = "utf-8") -> str:
        data = self.read_bytes(uri)
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as e:
            raise StorageError(f"{uri}: not valid {encoding} text (byte {e.start})") from None

    def write_bytes(self, uri: str | os.PathLike[str], data: bytes) -> None:
        """Write a whole object/file; a local file is replaced atomically."""
        if not is_s3(uri):
            path = Path(uri)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as e:
                raise self._error(str(uri), e) from None
            return
        import io

        uri = str(uri)
        bucket, key = split_s3(uri)
        try:
            with self._transfers() as tm:
                tm.upload(io.BytesIO(data), bucket, key).result()
        except Exception as e:
            raise self._error(uri, e) from None

    def write_text(self, uri: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(uri, text.encode(encoding))

    def download_file(self, uri: str, local_path: str | os.PathLike[str]) -> Path:
        """Copy one object/file to a local path (multipart, concurrent for large objects)."""
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not is_s3(uri):
            _atomic_copy(Path(uri), dest, self._error)
            return dest
        bucket, key = split_s3(uri)
        try:
            with self._transfers() as tm:
                # s3transfer writes to a temp name and renames, so `dest` is never partial.
                tm.download(bucket, key, str(dest)).result()
        except Exception as e:
            if _is_404(e):
                self._check_bucket(uri)
            raise self._error(uri, e) from None
        return dest

    def upload_file(self, local_path: str | os.PathLike[str], uri: str) -> None:
        if not is_s3(uri):
            _atomic_copy(Path(local_path), Path(uri), self._error)
            return
        bucket, key = split_s3(uri)
        try:
            with self._transfers() as tm:
                tm.upload(str(local_path), bucket, key).result()
        except Exception as e:
            raise self._error(uri, e) from None

    def delete(self, uri: str) -> None:
        """Delete one object/file; missing is fine."""
        if not is_s3(uri):
            Path(uri).unlink(missing_ok=True)
            return
        bucket, key = split_s3(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise self._error(uri, e) from None

    # -- listings

    def list(self, uri_prefix: str | os.PathLike[str]) -> list[str]:
        """Every file/object under a directory or prefix, recursively, sorted.

        A prefix has directory semantics: `s3://b/raw` lists `raw/...`, never `raw-old/...`.
        A plain file or object lists itself. Nothing there -> [].
        """
        if not is_s3(uri_prefix):
            root = Path(uri_prefix)
            if root.is_file():
                return [str(root)]
            if not root.is_dir():
                return []
            return sorted(str(p) for p in root.rglob("*") if p.is_file())
        uri = str(uri_prefix)
        bucket, key = split_s3(uri)
        out: list[str] = []
        try:
            if key and not key.endswith("/") and self._head(uri) is not None:
                return [uri]
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_dir_key(key)):
                out.extend(f"{S3_SCHEME}{bucket}/{o['Key']}" for o in page.get("Contents", []))
        except StorageError:
            raise
        except Exception as e:
            raise self._error(uri, e) from None
        return sorted(u for u in out if not u.endswith("/"))  # skip "folder marker" objects

    def list_dirs(self, uri: str | os.PathLike[str]) -> list[str]:
        """Names of the immediate sub-directories (sub-prefixes), sorted."""
        if not is_s3(uri):
            root = Path(uri)
            if not root.is_dir():
                return []
            return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        uri = str(uri)
        bucket, key = split_s3(uri)
        prefix = _dir_key(key)
        names: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                names.extend(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        except Exception as e:
            raise self._error(uri, e) from None
        return sorted(n for n in names if n)

    # -- directories with manifests

    def read_manifest(self, uri: str | os.PathLike[str]) -> dict[str, Any]:
        """The manifest of a complete directory; StorageError if it has none."""
        where = join(uri, MANIFEST)
        if is_s3(uri):
            if self._head(where) is None:
                raise _incomplete(str(uri))
        elif not Path(where).is_file():
            if not Path(uri).exists():
                raise StorageError(f"{uri}: not found")
            raise _incomplete(str(uri))
        return _parse_manifest(self.read_bytes(where), where)

    def upload_dir(
        self, local_dir: str | os.PathLike[str], uri: str, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Copy a local directory to `uri` (s3:// or local); the manifest goes last. Returns it.

        Any old manifest at `uri` is deleted first, so a crashed or retried upload reads
        as incomplete until the new manifest lands.
        """
        src = Path(local_dir)
        if not src.is_dir():
            raise StorageError(f"{local_dir}: not a directory")
        manifest = build_manifest(src)
        if not is_s3(uri):
            self._copy_local_dir(src, Path(uri), manifest)
            return manifest
        bucket, key = split_s3(uri)
        prefix = _dir_key(key)
        manifest_key = prefix + MANIFEST
        subscribers = _subscribers(progress)
        try:
            self.client.delete_object(Bucket=bucket, Key=manifest_key)
            with self._transfers() as tm:
                futures = [
                    tm.upload(str(src / e["path"]), bucket, prefix + e["path"], subscribers=subscribers)
                    for e in manifest["files"]
                ]
                for f in futures:
                    f.result()
            # Every file is in place: now, and only now, the directory becomes complete.
            self.client.put_object(Bucket=bucket, Key=manifest_key, Body=_manifest_bytes(manifest))
        except Exception as e:
            raise self._error(uri, e) from None
        return manifest

    def _copy_local_dir(self, src: Path, dest: Path, manifest: dict[str, Any]) -> None:
        if src.resolve() == dest.resolve():
            # Sealing a directory in place: just (re)write the manifest, last.
            _write_manifest_last(src, manifest)
            return
        tmp = _local_tmp_sibling(dest)
        try:
            for entry in manifest["files"]:
                target = tmp / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / entry["path"], target)
            _write_manifest_last(tmp, manifest)
            _publish_local(tmp, dest)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._error(str(dest), e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def download_dir(
        self, uri: str | os.PathLike[str], local_dir: str | os.PathLike[str], progress: ProgressCallback | None = None
    ) -> Path:
        """Copy a complete directory to `local_dir`, verifying size and sha256 of every file.

        Refuses a directory without a manifest. `local_dir` is replaced as a whole, and
        holds a manifest.json of its own afterwards.
        """
        dest = Path(local_dir)
        manifest = self.read_manifest(uri)
        tmp = _local_tmp_sibling(dest)
        try:
            self._fetch_files(str(uri), manifest, tmp, progress)
            _write_manifest_last(tmp, manifest)
            _publish_local(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def _fetch_files(self, uri: str, manifest: dict[str, Any], dest: Path, progress: ProgressCallback | None) -> None:
        for entry in manifest["files"]:
            (dest / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        if is_s3(uri):
            bucket, key = split_s3(uri)
            prefix = _dir_key(key)
            subscribers = _subscribers(progress)
            current = uri
            try:
                with self._transfers() as tm:
                    futures = [
                        (e, tm.download(bucket, prefix + e["path"], str(dest / e["path"]), subscribers=subscribers))
                        for e in manifest["files"]
                    ]
                    for entry, f in futures:
                        current = join(uri, entry["path"])
                        f.result()
            except Exception as e:
                raise self._error(current, e) from None
        else:
            for entry in manifest["files"]:
                try:
                    shutil.copyfile(Path(uri) / entry["path"], dest / entry["path"])
                except OSError as e:
                    raise self._error(join(uri, entry["path"]), e) from None
        for entry in manifest["files"]:
            _verify_file(dest / entry["path"], entry, join(uri, entry["path"]))

    def materialize(self, uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local directory for `uri`: local paths pass through; s3 is downloaded and verified.

        Downloads are cached under `cache_dir` (default $VEMBED_CACHE_DIR or ~/.cache/vembed)
        and reused while the remote manifest is unchanged.
        """
        if not is_s3(uri):
            path = Path(uri)
            if not path.exists():
                raise StorageError(f"{uri}: not found")
            return path
        uri = str(uri)
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
        # The one "temporary sibling, removed on failure, renamed into place" helper (vembed.atomic_dir).
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
    return cached == manifest and all(
        (dest / e["path"]).is_file() and (dest / e["path"]).stat().st_size == e["size"] for e in manifest["files"]
    )


# --------------------------------------------------------------------------- module-level API


def exists(uri: str | os.PathLike[str]) -> bool:
    return Storage().exists(uri)


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    return Storage().read_bytes(uri)


def read_text(uri: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    return Storage().read_text(uri, encoding)


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    Storage().write_bytes(uri, data)


def write_text(uri: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    Storage().write_text(uri, text, encoding)


def download_file(uri: str, local_path: str | os.PathLike[str]) -> Path:
    return Storage().download_file(uri, local_path)


def upload_file(local_path: str | os.PathLike[str], uri: str) -> None:
    Storage().upload_file(local_path, uri)


def delete(uri: str) -> None:
    Storage().delete(uri)


def list_dirs(uri: str | os.PathLike[str]) -> list[str]:
    return Storage().list_dirs(uri)


def read_manifest(uri: str | os.PathLike[str]) -> dict[str, Any]:
    return Storage().read_manifest(uri)


def manifest_sha256(uri: str | os.PathLike[str]) -> str:
    return Storage().manifest_sha256(uri)


def upload_dir(local_dir: str | os.PathLike[str], uri: str, progress: ProgressCallback | None = None) -> dict[str, Any]:
    return Storage().upload_dir(local_dir, uri, progress)


def download_dir(
    uri: str | os.PathLike[str], local_dir: str | os.PathLike[str], progress: ProgressCallback | None = None
) -> Path:
    return Storage().download_dir(uri, local_dir, progress)


def materialize(uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return Storage().materialize(uri, cache_dir)


def staging_dir(uri: str | os.PathLike[str]) -> contextlib.AbstractContextManager[Path]:
    return Storage().staging_dir(uri)


def list_uris(uri_prefix: str | os.PathLike[str]) -> list[str]:
    return Storage().list(uri_prefix)


# `storage.list(...)` reads naturally at call sites; defined last so the builtin stays usable above.
list = list_uris  # noqa: A001
