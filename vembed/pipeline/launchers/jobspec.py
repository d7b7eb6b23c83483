"""What both cluster jobs carry, as Kubernetes JSON: name, labels, env, resources, scheduling, volumes.

Values come from `trainer.*` in the config and, when the KFP train component receives a
`dsl.TaskConfig` (task_config_passthroughs), from the pipeline task's own settings. The config wins
where both set something. Each backend turns these dicts into its SDK's models.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vembed.config import TrainConfig
from vembed.errors import ConfigError
from vembed.pipeline.launchers.command import CONFIG_ENV, OUTPUT_URI_ENV

LABELS = {"app.kubernetes.io/managed-by": "vembed-factory", "app.kubernetes.io/component": "train"}
GPU = "nvidia.com/gpu"

# Non-secret settings of this pod that the job pods need to reach the same storage the same way.
# Credentials are never forwarded: they reach the job only as secret references.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


@dataclass(frozen=True)
class TaskSettings:
    """The pipeline task's settings handed to the job (the fields of kfp's `dsl.TaskConfig`)."""

    resources: dict[str, Any] = field(default_factory=dict)  # {"requests": {...}, "limits": {...}}
    env: list[dict[str, Any]] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] | None = None
    volumes: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)
    image_pull_secrets: list[str] = field(default_factory=list)  # from the pipeline's compile options

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> TaskSettings:
        """From `dataclasses.asdict(task_config)` (snake_case keys); None values mean unset."""
        return cls(**{k: v for k, v in (data or {}).items() if v is not None})


def new_job_name(prefix: str = "vembed") -> str:
    # Short and DNS-1035 safe: the controllers append suffixes for their JobSets, Jobs and pods.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def env_json(
    cfg: TrainConfig,
    config_yaml: str,
    output_uri: str,
    task: TaskSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The job's env: the config, forwarded non-secret settings, secret references, then the task's env."""
    environ = os.environ if environ is None else environ
    env = [{"name": CONFIG_ENV, "value": config_yaml}, {"name": OUTPUT_URI_ENV, "value": output_uri}]
    env += [{"name": name, "value": environ[name]} for name in FORWARDED_ENV if environ.get(name)]
    for name, ref in cfg.trainer.env_from_secrets.items():
        secret, key = ref.split("/", 1)
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    taken = {e["name"] for e in env}
    env += [e for e in (task.env if task else []) if e.get("name") not in taken]
    return env


def resources_json(cfg: TrainConfig, task: TaskSettings | None = None) -> dict[str, dict[str, str]] | None:
    """Per node: the task's requests/limits, overlaid by trainer.resources (requests = limits), plus GPUs."""
    gpus = cfg.trainer.gpus_per_node
    own = {**cfg.trainer.resources, **({GPU: str(gpus)} if gpus else {})}  # GPUs only from trainer.gpus_per_node
    base = task.resources if task else {}
    out = {kind: {k: str(v) for k, v in (base.get(kind) or {}).items() if k != GPU} | own for kind in ("requests", "limits")}
    return {kind: values for kind, values in out.items() if values} or None


def container_json(name: str, task: TaskSettings | None = None) -> dict[str, Any]:
    """The node container's name, volume mounts and the container-level part of the `restricted`
    Pod Security Standard (these fields exist only on containers)."""
    security = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container: dict[str, Any] = {"name": name, "securityContext": security}
    if task and task.volume_mounts:
        container["volumeMounts"] = list(task.volume_mounts)
    return container


def pod_json(cfg: TrainConfig, task: TaskSettings | None = None) -> dict[str, Any]:
    """Scheduling, volumes, pull secrets and the security context for every node pod (keys that are set)."""
    task = task or TaskSettings()
    t = cfg.trainer
    pull = [*t.image_pull_secrets, *(n for n in task.image_pull_secrets if n not in t.image_pull_secrets)]
    out: dict[str, Any] = {
        "nodeSelector": {**task.node_selector, **t.node_selector},
        "tolerations": [*t.tolerations, *(x for x in task.tolerations if x not in t.tolerations)],
        "affinity": task.affinity,
        "volumes": list(task.volumes),
        "imagePullSecrets": [{"name": n} for n in pull],
        # What the `restricted` Pod Security Standard admits at pod level.
        "securityContext": {"runAsNonRoot": True, "runAsUser": t.run_as_user, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    return {k: v for k, v in out.items() if v}


def with_namespace(cfg: TrainConfig, namespace: str) -> TrainConfig:
    """The config with the namespace the client resolved (in-cluster, kubeconfig or the config's own)."""
    return cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"namespace": namespace})})


def checked(data: Any, build: Callable[[Any], Any], dump: Callable[[Any], Any], where: str) -> Any:
    """`build(data)`, an SDK model from Kubernetes JSON; a key the model would silently drop is an error."""
    obj = build(data)
    dropped = dropped_keys(data, dump(obj))
    if dropped:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(dropped)}")
    return obj


def dropped_keys(given: Any, kept: Any, path: str = "") -> list[str]:
    """Keys of `given` missing from `kept`: what a model silently dropped on a round trip."""
    if isinstance(given, list) and isinstance(kept, list):  # list items pair up by position, as keys 0, 1, ...
        given, kept = dict(enumerate(given[: len(kept)])), dict(enumerate(kept))
    if not (isinstance(given, dict) and isinstance(kept, dict)):
        return []
    out = []
    for key, value in given.items():
        out += dropped_keys(value, kept[key], f"{path}{key}.") if key in kept else [f"{path}{key}"]
    return out
