"""A KServe InferenceService (serving.kserve.io/v1beta1) that serves a model with `vembed serve`.

Why a custom predictor and not KServe's Hugging Face runtime (`modelFormat: huggingface`, task
`text_embedding`): its encoder model always mean-pools and L2-normalises (huggingfaceserver's
encoder_model.py, `postprocess`), reads neither modules.json (CLS or last-token pooling) nor prompts
(query instructions), and ignores `dimensions` (MRL); VL models are not text encoders at all. vembed's
own image (`vembed serve`) answers the same OpenAI `/v1/embeddings` API.

The model files come through KServe's storage initializer, with the credentials of `service_account`:
for a custom predictor KServe reads `STORAGE_URI` from the container named `kserve-container`
(predictor_custom.go, `GetStorageUri`) and downloads it to /mnt/models.

Why CustomObjectsApi and not the `kserve` SDK: `kserve` 0.21 pins pandas<3 and psutil<6 (it would
downgrade both in the shared environment), and its models add nothing to one create/patch/get.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vembed.errors import VembedError
from vembed.pipeline.launchers.wait import api_error_text

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
API_VERSION = f"{GROUP}/{VERSION}"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
PORT = 8080
ANNOTATION_MODEL = "vembed.io/model-uri"  # models:/NAME/VERSION the predictor serves
MANAGED_BY = {"app.kubernetes.io/managed-by": "vembed"}
# Every API call's (connect, read) timeout: the client's default waits forever on an API server that hangs.
REQUEST_TIMEOUT_S = (5.0, 30.0)
# Conditions whose False state with one of these reasons means the new revision will not come up.
FAILED_REASONS = {"RevisionFailed", "RevisionMissing", "ContainerMissing", "ExitCode", "CrashLoopBackOff"}


class DeployError(VembedError):
    """Creating, updating or waiting for an InferenceService failed."""


@dataclass
class PredictorSpec:
    image: str
    storage_uri: str
    model_uri: str  # models:/NAME/VERSION, recorded as an annotation
    service_account: str = ""
    cpu: str = "1"
    memory: str = "4Gi"
    gpus: int = 0


def predictor(spec: PredictorSpec, canary_traffic_percent: int | None = None) -> dict[str, Any]:
    """The `spec.predictor` of the InferenceService."""
    limits: dict[str, Any] = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus:
        limits["nvidia.com/gpu"] = str(spec.gpus)
    container = {
        "name": "kserve-container",
        "image": spec.image,
        # args, not command: the image's entrypoint checks the install first, then execs this.
        "args": ["vembed", "serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(PORT)],
        "env": [{"name": "STORAGE_URI", "value": spec.storage_uri}, {"name": "HF_HUB_OFFLINE", "value": "1"}],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 5},
        "resources": {"requests": dict(limits), "limits": limits},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    }
    out: dict[str, Any] = {"containers": [container]}
    if spec.service_account:
        out["serviceAccountName"] = spec.service_account
    # None removes the field in a merge patch: all traffic to the latest ready revision.
    out["canaryTrafficPercent"] = canary_traffic_percent if canary_traffic_percent not in (None, 100) else None
    return out


def manifest(name: str, namespace: str, spec: PredictorSpec) -> dict[str, Any]:
    pred = {k: v for k, v in predictor(spec).items() if v is not None}
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(MANAGED_BY),
            "annotations": {ANNOTATION_MODEL: spec.model_uri},
        },
        "spec": {"predictor": pred},
    }


def custom_objects_api(client_configuration: Any = None) -> Any:
    """CustomObjectsApi for the given configuration, else in-cluster, else the kubeconfig."""
    from kubernetes import client, config

    if client_configuration is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                # KUBECONFIG is read now, not when the kubernetes package was imported.
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
            except Exception as e:  # noqa: BLE001 - no cluster credentials: one line
                raise DeployError(f"cannot reach Kubernetes (no in-cluster config or kubeconfig): {e}") from None
        return client.CustomObjectsApi()
    return client.CustomObjectsApi(client.ApiClient(client_configuration))


class InferenceServices:
    """Create, patch, wait for and restore one InferenceService."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api, self.namespace = api, namespace

    def where(self, name: str) -> str:
        return f"InferenceService {self.namespace}/{name}"

    @contextlib.contextmanager
    def _errors(self, name: str, doing: str = "") -> Iterator[None]:
        """Any API failure (connection refused and friends) as one line naming the service."""
        try:
            yield
        except DeployError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DeployError(f"{self.where(name)}: {doing}{api_error_text(e)}") from None

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        with self._errors(name):
            try:
                return self.api.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT_S
                )
            except ApiException as e:
                if e.status != 404:
                    raise
        return None

    def apply(self, name: str, spec: PredictorSpec, canary_traffic_percent: int) -> tuple[str, dict | None]:
        """Create, or merge-patch the predictor. Returns (action, the object as it was before)."""
        before = self.get(name)
        with self._errors(name):
            if before is None:
                self.api.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, manifest(name, self.namespace, spec),
                    _request_timeout=REQUEST_TIMEOUT_S,
                )
                return "created", None
            if before["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") != "vembed":
                raise DeployError(
                    f"{self.where(name)} exists and is not managed by vembed; choose another service name"
                )
            patch = {
                "metadata": {"annotations": {ANNOTATION_MODEL: spec.model_uri}},
                "spec": {"predictor": predictor(spec, canary_traffic_percent)},
            }
            self.api.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, patch, _request_timeout=REQUEST_TIMEOUT_S
            )
            return "patched", before

    def restore(self, name: str, before: dict[str, Any]) -> None:
        """Put the previous predictor spec back (replace, so fields the failed spec added go away)."""
        current = self.get(name)
        if current is None:
            return
        body = {k: v for k, v in current.items() if k != "status"} | {"spec": before["spec"]}
        body["metadata"].setdefault("annotations", {}).update(
            {k: v for k, v in (before["metadata"].get("annotations") or {}).items() if k == ANNOTATION_MODEL}
        )
        with self._errors(name, "restoring the previous spec failed: "):
            self.api.replace_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, body, _request_timeout=REQUEST_TIMEOUT_S
            )

    def wait_ready(
        self, name: str, timeout_s: float, poll_s: float = 5.0, max_poll_errors: int = 5
    ) -> tuple[bool, str, dict[str, Any]]:
        """Until the latest revision is Ready, it failed, or `timeout_s` passed: (ready, reason, object)."""
        deadline = time.monotonic() + timeout_s
        obj: dict[str, Any] = {}
        errors = 0
        while True:
            try:
                obj = self.get(name) or {}
                errors = 0
            except DeployError as e:
                # One failed poll (the API server restarting) is not a failed rollout. A run of them, or one
                # past the deadline, is an error (the deploy step then puts the previous spec back).
                errors += 1
                if errors >= max_poll_errors or time.monotonic() >= deadline:
                    raise
                print(f"[vembed] {e}; retrying", flush=True)
            status, pred = _status(obj)
            generation = (obj.get("metadata") or {}).get("generation", 0)
            current = status.get("observedGeneration", generation) >= generation
            conditions = {c.get("type"): c for c in status.get("conditions") or []}
            if current:
                for c in conditions.values():
                    if c.get("status") == "False" and c.get("reason") in FAILED_REASONS:
                        return False, f"{c.get('type')}: {c.get('reason')}: {c.get('message', '')}".strip(), obj
                latest = pred.get("latestCreatedRevision")
                ready = (conditions.get("Ready") or {}).get("status") == "True"
                if ready and (latest is None or pred.get("latestReadyRevision") == latest):
                    return True, "ready", obj
            if time.monotonic() >= deadline:
                waiting = (conditions.get("Ready") or {}).get("message") or "no Ready condition yet"
                return False, f"not Ready after {timeout_s:g}s ({waiting})", obj
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


def _status(obj: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(status, status.components.predictor) of an InferenceService; empty where not reported yet."""
    status = (obj or {}).get("status") or {}
    return status, (status.get("components") or {}).get("predictor") or {}


def rollout_of(action: str, ready: bool, reason: str, obj: dict[str, Any], before: dict | None) -> dict[str, Any]:
    """The outcome of one create/patch (action: created | patched), for the deploy step's result."""
    status, pred = _status(obj)
    return {
        "action": action,
        "ready": ready,
        "revision": pred.get("latestReadyRevision") if ready else pred.get("latestCreatedRevision"),
        "previous_revision": _status(before)[1].get("latestReadyRevision"),
        "traffic": list(pred.get("traffic") or []),
        "reason": reason,
        "url": status.get("url"),
    }
