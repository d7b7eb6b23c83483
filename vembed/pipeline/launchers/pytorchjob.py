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
from vembed.pipeline.launchers import jobspec as js
from vembed.pipeline.launchers.command import PYTORCHJOB_RENDEZVOUS, job_command, processes_per_node
from vembed.pipeline.launchers.wait import JobRun, JobState, Phase, failure_reason, sdk_call

CONTAINER = "pytorch"  # the operator looks for this container name


def build_pytorchjob(
    cfg: TrainConfig,
    *,
    name: str,
    config_yaml: str,
    output_uri: str,
    task: js.TaskSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The PyTorchJob as a `kubeflow.training.models.KubeflowOrgV1PyTorchJob`."""
    from kubeflow.training import models as m
    from kubeflow.training.constants import constants
    from kubernetes import client as k8s

    t = cfg.trainer
    container = js.container_json(CONTAINER, task) | {
        "image": t.image,
        "command": job_command(cfg, PYTORCHJOB_RENDEZVOUS),
        "env": js.env_json(cfg, config_yaml, output_uri, task, environ),
    }
    if resources := js.resources_json(cfg, task):
        container["resources"] = resources
    # restartPolicy Never: a failed node fails the job, and this step reports why instead of looping.
    pod = {**js.pod_json(cfg, task), "containers": [container], "restartPolicy": "Never"}
    api = k8s.ApiClient()
    # The client's public deserializer reads a response body; hand it the JSON the same way.
    read = lambda data: api.deserialize(SimpleNamespace(data=json.dumps(data)), "V1PodSpec")  # noqa: E731
    pod_spec = js.checked(pod, read, api.sanitize_for_serialization, "trainer")
    template = k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=dict(js.LABELS)), spec=pod_spec)
    replicas = {
        role: m.KubeflowOrgV1ReplicaSpec(replicas=n, restart_policy="Never", template=template)
        for role, n in (("Master", 1), ("Worker", t.num_nodes - 1))
        if n
    }
    return m.KubeflowOrgV1PyTorchJob(
        api_version=constants.API_VERSION,
        kind=constants.PYTORCHJOB_KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=t.namespace, labels=dict(js.LABELS)),
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


class PyTorchJobRun(JobRun):
    """A submitted PyTorchJob, as the wait loop sees it."""

    kind = "PyTorchJob"

    def state(self) -> JobState:
        conditions = self.client.get_job_conditions(name=self.name, namespace=self.namespace)
        current = {c.type: c for c in conditions if c.status == "True"}
        if "Failed" in current:
            c = current["Failed"]
            pods = lambda: self.client.get_job_pods(self.name, namespace=self.namespace)  # noqa: E731
            return JobState(Phase.FAILED, failure_reason([f"{c.reason}: {c.message}"], pods, CONTAINER))
        if "Succeeded" in current:
            return JobState(Phase.SUCCEEDED)
        return JobState(Phase.RUNNING if "Running" in current else Phase.PENDING)

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
    task: js.TaskSettings | None = None,
    client_configuration: Any = None,
) -> PyTorchJobRun:
    """Create the PyTorchJob and return a handle for `wait_for_job`."""
    from kubeflow.training import TrainingClient

    namespace = {"namespace": cfg.trainer.namespace} if cfg.trainer.namespace else {}
    client = sdk_call(
        "cannot connect to Kubernetes for a PyTorchJob",
        lambda: TrainingClient(client_configuration=client_configuration, **namespace),
    )
    cfg = js.with_namespace(cfg, client.namespace)
    job = build_pytorchjob(cfg, name=js.new_job_name(), config_yaml=config_yaml, output_uri=output_uri, task=task)
    where = f"{client.namespace}/{job.metadata.name}"
    sdk_call(f"cannot create PyTorchJob {where}", lambda: client.create_job(job=job, namespace=client.namespace))
    return PyTorchJobRun(client, job.metadata.name, client.namespace)
