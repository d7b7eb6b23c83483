"""Pipeline step: serve `models:/NAME@champion` as a KServe InferenceService.

1. Resolve the alias to a version and the version to its merged model's object-storage location.
2. Create the InferenceService, or merge-patch its predictor (new image / model / canary percent).
3. Wait for the new revision to be Ready, within a timeout.
4. On failure put the previous predictor spec back (the previous revision never stopped serving),
   tag the version `vembed.deployed=false` with the reason, and fail the step.
   On success tag it `vembed.deployed=true` and record the deployment on the registered model, so
   `vembed registry rollback` can point the service back.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vembed.errors import RegistryError
from vembed.pipeline.launchers.inference_service import (
    DeployError,
    InferenceServices,
    PredictorSpec,
    custom_objects_api,
    rollout_of,
)

TAG_DEPLOYED = "vembed.deployed"  # on the version: "true" | "false"
TAG_DEPLOY_ERROR = "vembed.deploy_error"
TAG_DEPLOYMENT = "vembed.deployment"  # on the registered model: JSON of the last successful deploy
CLOUD_SCHEMES = ("s3", "gs", "pvc")  # locations KServe's storage initializer can fetch
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_DNS_1123 = re.compile(r"^[a-z]([-a-z0-9]{0,43}[a-z0-9])?$")


def service_name_for(model_name: str) -> str:
    """A valid InferenceService name from a registered model name (`Docs_Search` -> `docs-search`)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")[:45].rstrip("-")
    return name if name and name[0].isalpha() else f"m-{name}".rstrip("-")


def current_namespace(default: str = "default") -> str:
    """The pod's own namespace in a cluster, else `default`."""
    try:
        return _SA_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


def merged_location(registry: Any, models_uri: str, artifacts_destination: str = "") -> str:
    """Object-storage URI of the merged model inside the version's MLflow model directory.

    A tracking server that proxies artifacts reports `mlflow-artifacts:/PATH`; `artifacts_destination`
    (the server's `--artifacts-destination`, e.g. `s3://mlflow/artifacts`) turns that into `s3://...`.
    """
    import mlflow
    import yaml

    from vembed.artifacts.mlflow_store import MERGED_ARTIFACT, ST_DATA_PATH, quiet_mlflow

    root = registry.storage_uri(models_uri).rstrip("/")
    with quiet_mlflow():
        try:
            flavors = yaml.safe_load(mlflow.artifacts.load_text(f"{root}/MLmodel")).get("flavors") or {}
        except Exception as e:  # noqa: BLE001 - one line naming the location
            raise RegistryError(f"{models_uri}: cannot read {root}/MLmodel: {str(e).splitlines()[0]}") from None
    if "sentence_transformers" in flavors:
        rel = ST_DATA_PATH
    else:
        merged = ((flavors.get("python_function") or {}).get("artifacts") or {}).get(MERGED_ARTIFACT)
        if not merged:
            raise DeployError(f"{models_uri}: the version holds no merged model; only merged models are served")
        rel = merged.get("path") if isinstance(merged, dict) else str(merged)
    if urlparse(root).scheme == "mlflow-artifacts":
        if not artifacts_destination:
            raise DeployError(
                f"{models_uri}: stored at {root} behind the MLflow server's artifact proxy; pass "
                "mlflow_artifacts_destination (the server's --artifacts-destination, e.g. s3://mlflow/artifacts)"
            )
        root = f"{artifacts_destination.rstrip('/')}/{urlparse(root).path.lstrip('/')}"
    if urlparse(root).scheme not in CLOUD_SCHEMES:
        raise DeployError(f"{models_uri}: stored at {root}, which a cluster cannot read (need {CLOUD_SCHEMES})")
    return f"{root}/{rel}"


def deploy_command(
    model_name: str, service_name: str, namespace: str, image: str, alias: str = "champion", **extra: Any
) -> str:
    """The exact `vembed deploy` command line that does what `deploy(...)` does."""
    words = ["vembed", "deploy", model_name, "--alias", alias, "--service", service_name]
    words += ["--namespace", namespace, "--image", image]
    for key, value in extra.items():
        if value not in (None, ""):
            words += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(w) for w in words)


def deploy(
    model_name: str,
    image: str,
    *,
    alias: str = "champion",
    service_name: str = "",
    namespace: str = "",
    canary_traffic_percent: int = 100,
    timeout_s: float = 900.0,
    poll_s: float = 5.0,
    service_account: str = "",
    mlflow_artifacts_destination: str = "",
    cpu: str = "1",
    memory: str = "4Gi",
    gpus: int = 0,
    output_dir: str | os.PathLike[str] = "output",
    client_configuration: Any = None,
) -> dict[str, Any]:
    """Create or update the InferenceService serving `models:/NAME@alias`; see the module docstring."""
    from vembed.artifacts.mlflow_store import resolve_tracking_uri, resolve_version
    from vembed.artifacts.registry import Registry

    if not image:
        raise DeployError("deploy: image is empty (the vembed serving image, e.g. ghcr.io/org/vembed:0.1.0-cpu)")
    if not 1 <= int(canary_traffic_percent) <= 100:
        raise DeployError(f"canary_traffic_percent: {canary_traffic_percent} is not between 1 and 100")
    if timeout_s <= 0:
        raise DeployError(f"timeout_s: {timeout_s} must be positive")
    name = service_name or service_name_for(model_name)
    if not _DNS_1123.match(name):
        raise DeployError(f"service_name: {name!r} is not a valid InferenceService name (lowercase, dashes, <=45)")
    namespace = namespace or current_namespace()
    registry = Registry(resolve_tracking_uri(output_dir, create=False))  # deploy only reads: never a new store
    mv = resolve_version(registry.client, f"models:/{model_name}@{alias}")
    version_uri = f"models:/{model_name}/{mv.version}"
    spec = PredictorSpec(
        image=image,
        storage_uri=merged_location(registry, version_uri, mlflow_artifacts_destination),
        model_uri=version_uri,
        service_account=service_account,
        cpu=cpu,
        memory=memory,
        gpus=int(gpus),
    )
    services = InferenceServices(custom_objects_api(client_configuration), namespace)
    try:
        action, before = services.apply(name, spec, int(canary_traffic_percent))
        try:
            ready, reason, obj = services.wait_ready(name, timeout_s, poll_s)
        except DeployError as e:  # the API server stopped answering mid-rollout: the new spec is still in place
            ready, reason, obj = False, str(e), {}
        if not ready and before is not None:
            services.restore(name, before)
    except DeployError as e:
        _tag(registry, model_name, str(mv.version), ok=False, reason=str(e))
        raise
    rollout = rollout_of(action, ready, reason, obj, before)
    if not ready:
        previous = rollout["previous_revision"]
        serving = f"the previous revision {previous} keeps serving" if before is not None else "nothing served before"
        message = f"{services.where(name)}: {version_uri} not deployed: {reason}; {serving}"
        _tag(registry, model_name, str(mv.version), ok=False, reason=message)
        raise DeployError(message)
    deployment = {
        "namespace": namespace,
        "service": name,
        "image": image,
        "version": str(mv.version),
        "storage_uri": spec.storage_uri,
        "service_account": service_account,
        "mlflow_artifacts_destination": mlflow_artifacts_destination,
    }
    _tag(registry, model_name, str(mv.version), ok=True, deployment=deployment)
    return {
        "model_uri": version_uri,
        **deployment,
        "canary_traffic_percent": int(canary_traffic_percent),
        "endpoint": f"{rollout['url']}/v1/embeddings" if rollout["url"] else None,
        **{k: v for k, v in rollout.items() if k != "url"},
    }


def _tag(
    registry: Any, model_name: str, version: str, ok: bool, reason: str = "", deployment: dict | None = None
) -> None:
    """Record the outcome on the version (and the live deployment on the registered model)."""
    from vembed.redaction import redact

    client = registry.client
    try:
        client.set_model_version_tag(model_name, version, TAG_DEPLOYED, "true" if ok else "false")
        if ok:
            if TAG_DEPLOY_ERROR in (client.get_model_version(model_name, version).tags or {}):
                client.delete_model_version_tag(model_name, version, TAG_DEPLOY_ERROR)  # an older failure
            client.set_registered_model_tag(model_name, TAG_DEPLOYMENT, json.dumps(deployment))
        else:
            client.set_model_version_tag(model_name, version, TAG_DEPLOY_ERROR, redact(reason)[:4000])
    except Exception as e:  # noqa: BLE001 - the deploy outcome stands; say why the tag is missing
        outcome = "succeeded" if ok else "failed"
        raise RegistryError(f"{model_name} v{version}: deploy {outcome}, tagging failed: {e}") from None


def last_deployment(registry: Any, model_name: str) -> dict[str, Any] | None:
    """What the last successful deploy of `model_name` recorded, if any."""
    try:
        tags = registry.client.get_registered_model(model_name).tags or {}
        return json.loads(tags[TAG_DEPLOYMENT]) if TAG_DEPLOYMENT in tags else None
    except (KeyError, ValueError):
        return None
