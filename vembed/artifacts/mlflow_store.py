"""Connecting to MLflow and reading a registered model back; no torch and no vembed model code.

The registry (which also registers models) and the Predictor (which loads `models:/NAME@alias`) both
build on this module, so neither needs the other to download.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import (
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
    MLFLOW_TRACKING_CLIENT_CERT_PATH,
    MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH,
)
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version

from vembed.errors import RegistryError
from vembed.redaction import redact

MERGED_ARTIFACT, ADAPTER_ARTIFACT = "merged", "adapter"  # directories inside a registered model
ST_DATA_PATH = "model.sentence_transformer"  # where the sentence_transformers flavor keeps the model
_TRANSIENT = ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED")
# OSErrors of the local file system: a retry meets them again (network OSErrors are worth a retry).
_LOCAL_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def resolve_tracking_uri(output_dir: str | os.PathLike[str], create: bool = True) -> str:
    """`MLFLOW_TRACKING_URI`, else the embedded sqlite store `<output_dir>/mlflow.db`.
    `create=False` (read commands) leaves the file system alone: the store must exist already."""
    if not (uri := os.environ.get("MLFLOW_TRACKING_URI", "").strip()):
        if str(output_dir).startswith("s3://"):
            raise RegistryError(f"{output_dir}: the embedded MLflow store needs a local output dir; set MLFLOW_TRACKING_URI")
        out = Path(output_dir).resolve()
        if create:
            out.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{out / 'mlflow.db'}"
    if not create:
        require_existing_store(uri)
    return uri


def require_existing_store(tracking_uri: str) -> None:
    """For read commands: a sqlite store that does not exist is an error, not a new empty database."""
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if tracking_uri.startswith("sqlite:///") and not db.is_file():
        raise RegistryError(f"{tracking_uri}: no MLflow store there ({db} does not exist)")


@contextlib.contextmanager
def registry_errors(what: str) -> Iterator[None]:
    """MLflow and network failures become one-line RegistryErrors that keep MLflow's `error_code`;
    network errors, 5xx and throttling are marked transient (a pipeline step retries those, vembed.retry)."""
    try:
        yield
    except (MlflowException, OSError) as e:
        lines = [line.strip() for line in redact(str(getattr(e, "message", e))).splitlines() if line.strip()]
        text = lines[0][:300] if lines else type(e).__name__
        if text.endswith(":") and len(lines) > 1:  # a failed download: MLflow puts the reason on the last line
            text = f"{text} {lines[-1][:300]}"
        err = RegistryError(f"{what}: {text}")
        err.error_code = getattr(e, "error_code", "")
        network = isinstance(e, OSError) and not isinstance(e, _LOCAL_OS_ERRORS)
        err.transient = network or err.error_code in _TRANSIENT or "Max retries exceeded" in str(e)
        raise err from None


class Client:
    """An MlflowClient for one tracking URI (default: MLflow's; the registry's too) whose every call turns
    MLflow and network failures into one-line RegistryErrors naming the server and the call."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = uri = tracking_uri or mlflow.get_tracking_uri()
        if uri.split(":", 1)[0] in ("http", "https"):  # must answer within seconds (MLflow would retry for minutes)
            from vembed.endpoints import check_http

            # With the TLS settings MLflow's own requests use (a private CA, no verification, a client cert).
            verify = not MLFLOW_TRACKING_INSECURE_TLS.get() and (MLFLOW_TRACKING_SERVER_CERT_PATH.get() or True)
            check_http(uri, "/health", "MLflow", RegistryError, verify=verify, cert=MLFLOW_TRACKING_CLIENT_CERT_PATH.get())
        self.where = redact(uri)
        with registry_errors(self.where):  # an unsupported scheme or MLflow 3's deprecated file store
            self.mlflow = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.mlflow, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with registry_errors(f"{self.where}: {name}"):
                return attr(*args, **kwargs)

        return call


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """No progress bars, warnings or info lines from MLflow while fetching a model (errors still raise)."""
    logger, bar = logging.getLogger("mlflow"), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    level, old = logger.level, bar.get_raw()
    bar.set("false")
    logger.setLevel(logging.ERROR)  # mlflow.* loggers inherit it
    try:
        with warnings.catch_warnings(action="ignore"):
            yield
    finally:
        logger.setLevel(level)
        bar.unset() if old is None else bar.set(old)


def resolve_version(client: Client, models_uri: str) -> ModelVersion:
    """The version `models:/NAME@alias` or `models:/NAME/VERSION` names, resolved with this client
    (MLflow's own `models:/` download would resolve it through the process-wide registry URI)."""
    with registry_errors(f"{models_uri} at {client.where}"):
        found = get_model_name_and_version(client, models_uri)
        if len(found) != 2:  # `models:/<logged model id>`: not a registered version
            raise RegistryError(f"{models_uri}: expected models:/NAME@alias or models:/NAME/VERSION")
        return client.get_model_version(*found)


def download_model(models_uri: str, tracking_uri: str | None = None) -> Path:
    """`models:/NAME@alias` or `models:/NAME/3` as a local directory Predictor loads (merged model, else
    adapter), cached per version under $VEMBED_CACHE_DIR (default ~/.cache/vembed)."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    require_existing_store(uri)  # reading: never create an empty store (building an MlflowClient would)
    client = Client(uri)
    mv = resolve_version(client, models_uri)
    cache = Path(os.environ.get("VEMBED_CACHE_DIR") or Path.home() / ".cache" / "vembed") / "models"
    ident = hashlib.sha256(f"{client.tracking_uri}|{mv.name}|{mv.version}|{mv.source}".encode()).hexdigest()[:16]
    dest = cache / f"v{mv.version}-{ident}"
    if not dest.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        # Downloaded next to `dest` and renamed into place whole: a crash never leaves a partial model.
        with (
            tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=cache) as tmp,
            registry_errors(f"{models_uri}: download from {client.where}"),
            quiet_mlflow(),
        ):
            got = mlflow.artifacts.download_artifacts(
                artifact_uri=client.get_model_version_download_uri(mv.name, mv.version),
                dst_path=tmp,
                tracking_uri=client.tracking_uri,
                registry_uri=client.tracking_uri,
            )
            with contextlib.suppress(OSError):  # a concurrent download that finished first wins
                os.replace(got, dest)
    # The sentence_transformers flavor's model, else the pyfunc's artifacts (vembed.artifacts.mlflow_model).
    for sub in (ST_DATA_PATH, f"artifacts/{MERGED_ARTIFACT}", f"artifacts/{ADAPTER_ARTIFACT}"):
        if (dest / sub).is_dir():
            return dest / sub
    raise RegistryError(f"{models_uri}: version {mv.version} holds neither a merged model nor an adapter")
