"""backend: pytorchjob: a Training Operator v1 PyTorchJob (kubeflow-training SDK, TrainingClient).

One Master replica plus num_nodes - 1 Workers, all running the same `accelerate launch` script;
the operator gives each pod RANK, MASTER_ADDR and MASTER_PORT. Secrets are `secretKeyRef`s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

from vembed.config import TrainConfig
from vembed.errors import ConfigError
from vembed.launchers.command import PYTORCHJOB_RENDEZVOUS, job_command, processes_per_node
from vembed.launchers.jobspec import (
    LABELS,
    TaskSettings,
    container_security_json,
    dropped_keys,
    env_json,
    new_job_name,
    pod_json,
    resources_json,
)
from vembed.launchers.wait import JobState, Phase, TrainingJobError, api_error_text, describe_pod_failure

CONTAINER = "pytorch"  # the operator looks for this container name


def _k8s(type_name: str, data: Any, where: str) -> Any:
    """A kubernetes-client model (e.g. "V1Volume") from its JSON form; unknown keys are errors."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    # The client's public deserializer reads a response body; hand it the JSON the same way.
    obj = api.deserialize(SimpleNamespace(data=json.dumps(data)), type_name)
    dropped = dropped_keys(data, api.sanitize_for_serialization(obj))
    if dropped:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(dropped)}")
    return obj


def build_pytorchjob(
    cfg: TrainConfig,
    *,
    name: str,
    config_yaml: str,
    output_uri: str,
    task: TaskSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The PyTorchJob as a `kubeflow.training.models.KubeflowOrgV1PyTorchJob`."""
    from kubeflow.training import models as m
    from kubeflow.training.constants import constants
    from kubernetes import client as k8s

    t = cfg.trainer
    env = env_json(cfg, config_yaml, output_uri, task, environ)
    resources = resources_json(cfg, task)
    container = k8s.V1Container(
        name=CONTAINER,
        image=t.image,
        command=job_command(cfg, PYTORCHJOB_RENDEZVOUS),
        env=_k8s("list[V1EnvVar]", env, "env"),
        resources=_k8s("V1ResourceRequirements", resources, "resources") if resources else None,
        volume_mounts=_k8s("list[V1VolumeMount]", task.volume_mounts, "volume_mounts") if task else None,
        security_context=_k8s("V1SecurityContext", container_security_json(), "securityContext"),
    )
    pod = pod_json(cfg, task)
    # restartPolicy Never: a failed node fails the job, and this step reports why instead of looping.
    pod_spec = _k8s("V1PodSpec", {**pod, "containers": [], "restartPolicy": "Never"}, "trainer")
    pod_spec.containers = [container]
    template = k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=dict(LABELS)), spec=pod_spec)
    replicas = {"Master": m.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="Never", template=template)}
    if t.num_nodes > 1:
        replicas["Worker"] = m.KubeflowOrgV1ReplicaSpec(
            replicas=t.num_nodes - 1, restart_policy="Never", template=template
        )
    return m.KubeflowOrgV1PyTorchJob(
        api_version=constants.API_VERSION,
        kind=constants.PYTORCHJOB_KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=t.namespace, labels=dict(LABELS)),
        spec=m.KubeflowOrgV1PyTorchJobSpec(
            pytorch_replica_specs=replicas,
            nproc_per_node=str(processes_per_node(cfg)),
            run_policy=m.KubeflowOrgV1RunPolicy(
                backoff_limit=0,
                # Pods stay after the end so their logs are readable until the job is deleted.
                clean_pod_policy="None",
                # The cluster stops the job at the same deadline even if this step's pod dies first.
                active_deadline_seconds=t.timeout,
            ),
        ),
    )


def training_client(namespace: str | None, client_configuration: Any = None) -> Any:
    from kubeflow.training import TrainingClient

    kwargs = {"namespace": namespace} if namespace else {}
    try:
        return TrainingClient(client_configuration=client_configuration, **kwargs)
    except Exception as e:  # noqa: BLE001 - no cluster credentials: say so in one line
        raise TrainingJobError(
            f"cannot connect to Kubernetes for a PyTorchJob: {api_error_text(e)}"
        ) from None


class PyTorchJobRun:
    """A submitted PyTorchJob, as the wait loop sees it."""

    def __init__(self, client: Any, name: str):
        self.client, self.name = client, name
        self.namespace = client.namespace
        self.description = f"PyTorchJob {self.namespace}/{name}"

    def state(self) -> JobState:
        conditions = self.client.get_job_conditions(name=self.name, namespace=self.namespace)
        current = {c.type: c for c in conditions if c.status == "True"}
        if "Failed" in current:
            c = current["Failed"]
            reason = "; ".join(p for p in (f"{c.reason}: {c.message}", self._pod_failure()) if p)
            return JobState(Phase.FAILED, reason)
        if "Succeeded" in current:
            return JobState(Phase.SUCCEEDED)
        if "Running" in current:
            return JobState(Phase.RUNNING)
        return JobState(Phase.PENDING)

    def _pod_failure(self) -> str:
        try:
            return describe_pod_failure(
                self.client.get_job_pods(self.name, namespace=self.namespace), CONTAINER
            )
        except Exception:  # noqa: BLE001 - the condition alone is still a reason
            return ""

    def stream_logs(self) -> Iterator[str]:
        from kubernetes import watch

        pods = self.client.get_job_pods(self.name, namespace=self.namespace, is_master=True)
        pod = next((p for p in pods if p.status is None or p.status.phase != "Pending"), None)
        if pod is None:
            return
        yield from watch.Watch().stream(
            self.client.core_api.read_namespaced_pod_log,
            name=pod.metadata.name,
            namespace=self.namespace,
            container=CONTAINER,
        )

    def delete(self) -> None:
        self.client.delete_job(self.name, namespace=self.namespace)


def submit_pytorchjob(
    cfg: TrainConfig,
    *,
    config_yaml: str,
    output_uri: str,
    task: TaskSettings | None = None,
    client_configuration: Any = None,
) -> PyTorchJobRun:
    """Create the PyTorchJob and return a handle for `wait_for_job`."""
    client = training_client(cfg.trainer.namespace, client_configuration)
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"namespace": client.namespace})})
    job = build_pytorchjob(
        cfg, name=new_job_name(), config_yaml=config_yaml, output_uri=output_uri, task=task
    )
    try:
        client.create_job(job=job, namespace=client.namespace)
    except Exception as e:  # noqa: BLE001
        raise TrainingJobError(
            f"cannot create PyTorchJob {client.namespace}/{job.metadata.name}: {api_error_text(e)}"
        ) from None
    return PyTorchJobRun(client, job.metadata.name)
