"""Connecting to MLflow and reading a registered model back; no torch and no vembed model code.

The registry (which also packages and registers models) and the Predictor (which loads
`models:/NAME@alias`) both build on this module, so neither needs the other to download.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from vembed.errors import RegistryError
from vembed.redaction import redact

# Artifact names inside a registered MLflow model directory (see vembed.mlflow_model).
MERGED_ARTIFACT = "merged"
ADAPTER_ARTIFACT = "adapter"
# Where the sentence_transformers flavor keeps the model inside the MLflow model directory.
ST_DATA_PATH = "model.sentence_transformer"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))/?$")


def resolve_tracking_uri(output_dir: str | os.PathLike[str], create: bool = True) -> str:
    """`MLFLOW_TRACKING_URI`, else the embedded sqlite store `<output_dir>/mlflow.db`.
    `create=False` (read commands) leaves the file system alone."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    if str(output_dir).startswith("s3://"):
        raise RegistryError(
            f"{output_dir}: the embedded MLflow store needs a local output dir; set MLFLOW_TRACKING_URI"
        )
    out = Path(output_dir).resolve()
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def require_existing_store(tracking_uri: str) -> None:
    """For read commands: a sqlite store that does not exist is an error, not a new empty database
    (MLflow would create the file, and the folders above it, and then find nothing)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise RegistryError(f"{tracking_uri}: folder {db.parent} does not exist, so there is no MLflow store there")
        if not db.is_file():
            raise RegistryError(f"{tracking_uri}: no MLflow store there ({db} does not exist)")


def check_server(tracking_uri: str) -> None:
    """An http(s) tracking server must answer within seconds (MLflow itself would retry for minutes)."""
    if tracking_uri.split(":", 1)[0] in ("http", "https"):
        from vembed.endpoints import check_http

        check_http(tracking_uri, "/health", "MLflow", RegistryError)


def local_artifact_root(tracking_uri: str) -> str | None:
    """For a sqlite store, artifacts live next to the db file instead of MLflow's `./mlruns` default."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


@contextlib.contextmanager
def registry_errors(what: str) -> Iterator[None]:
    """MLflow and network failures become one-line RegistryErrors."""
    try:
        yield
    except RegistryError:
        raise
    except (MlflowException, OSError) as e:
        first = redact(str(getattr(e, "message", e))).strip().splitlines()
        err = RegistryError(f"{what}: {first[0][:300] if first else type(e).__name__}")
        # Network errors, 5xx and throttling may pass; a pipeline step retries those (vembed.retry).
        err.transient = isinstance(e, OSError) or getattr(e, "error_code", "") in _TRANSIENT_CODES or (
            "Max retries exceeded" in str(e)
        )
        raise err from None


_TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED")


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """No download progress bars, MLflow warnings or info lines while fetching a model for a person
    or a server (errors still raise)."""
    names = ("mlflow", "mlflow.store", "mlflow.tracking", "mlflow.models")
    levels = {n: logging.getLogger(n).level for n in names}
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def connect(tracking_uri: str | None = None) -> tuple[str, MlflowClient]:
    """The tracking URI (default: MLflow's) and a client for it, after a bounded health check."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    check_server(uri)
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `name@alias` points at, None when there is no such alias or model."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        with registry_errors(f"{redact(client.tracking_uri)}: {name}@{alias}"):
            raise


def resolve_version(client: MlflowClient, models_uri: str) -> ModelVersion:
    """The version `models:/NAME@alias` or `models:/NAME/VERSION` names."""
    m = _MODELS_URI.match(models_uri)
    if not m:
        raise RegistryError(f"{models_uri}: expected models:/NAME@alias or models:/NAME/VERSION")
    name, where = m["name"], redact(client.tracking_uri)
    if m["alias"]:
        mv = alias_version(client, name, m["alias"])
        if mv is None:
            raise RegistryError(f"{models_uri}: no alias {m['alias']!r} on model {name!r} at {where}")
        return mv
    with registry_errors(f"{models_uri} at {where}"):
        return client.get_model_version(name, m["version"])


def download_version(
    client: MlflowClient, tracking_uri: str, models_uri: str, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A local directory Predictor can load: the version's merged model if present, else its adapter."""
    mv = resolve_version(client, models_uri)
    where = redact(tracking_uri)
    cache = Path(cache_dir or os.environ.get("VEMBED_CACHE_DIR") or Path.home() / ".cache" / "vembed")
    ident = hashlib.sha256(
        f"{tracking_uri}|{mv.name}|{mv.version}|{mv.source}".encode()
    ).hexdigest()[:16]
    dest = cache / "models" / re.sub(r"[^\w.-]", "_", mv.name) / f"v{mv.version}-{ident}"
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            with registry_errors(f"{models_uri}: download from {where}"), quiet_mlflow():
                # The version's storage location, not `models:/...`: resolving that would consult
                # mlflow's global registry URI instead of this registry's.
                got = mlflow.artifacts.download_artifacts(
                    artifact_uri=client.get_model_version_download_uri(mv.name, mv.version),
                    dst_path=str(tmp),
                    tracking_uri=tracking_uri,
                    registry_uri=tracking_uri,
                )
            with contextlib.suppress(OSError):  # a concurrent download that finished first wins
                os.replace(got, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model_dir_in(dest, models_uri, str(mv.version))


def model_dir_in(dest: Path, models_uri: str, version: str) -> Path:
    """The directory Predictor loads inside a downloaded MLflow model: merged model, else adapter."""
    from mlflow.models import Model

    flavors = Model.load(str(dest)).flavors
    if "sentence_transformers" in flavors and (dest / ST_DATA_PATH).is_dir():
        return dest / ST_DATA_PATH
    flavor = flavors.get("python_function", {})
    paths = {
        k: v.get("path") if isinstance(v, Mapping) else v for k, v in (flavor.get("artifacts") or {}).items()
    }
    for key in (MERGED_ARTIFACT, ADAPTER_ARTIFACT):
        if paths.get(key) and (dest / paths[key]).is_dir():
            return dest / paths[key]
    raise RegistryError(f"{models_uri}: version {version} holds neither a merged model nor an adapter")


def download_model(
    models_uri: str, tracking_uri: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Resolve `models:/NAME@alias` or `models:/NAME/3` to a local model directory for Predictor."""
    tracking_uri, client = connect(tracking_uri)
    require_existing_store(tracking_uri)  # reading: never create an empty store
    return download_version(client, tracking_uri, models_uri, cache_dir)
