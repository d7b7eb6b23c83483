"""backend: trainjob: a Kubeflow Trainer v2 TrainJob, through the kubeflow SDK (TrainerClient).

The TrainJob references a training runtime (default `torch-distributed`) and overrides its trainer:
our image, `bash -c` with the `accelerate launch` script, num_nodes, resources, and env. Secrets are
passed as `secretKeyRef`s. The SDK's CustomTrainerContainer only takes plain env values, so the
TrainJob is written as Kubernetes JSON, read through the SDK's own CRD models (kubeflow_trainer_api,
refusing any field they would drop) and submitted through the SDK backend's Kubernetes client;
status, logs and deletion go through TrainerClient.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from vembed.config import TrainConfig
from vembed.errors import ConfigError
from vembed.pipeline.launchers import jobspec as js
from vembed.pipeline.launchers.command import TRAINJOB_RENDEZVOUS, job_command, processes_per_node
from vembed.pipeline.launchers.wait import JobRun, JobState, Phase, failure_reason, sdk_call

PATCH_MANAGER = "vembed-factory/train-step"
NODE = "node"  # the trainer's replicated job and container name in Trainer runtimes


def build_trainjob(
    cfg: TrainConfig,
    *,
    name: str,
    config_yaml: str,
    output_uri: str,
    runtime_kind: str = "ClusterTrainingRuntime",
    task: js.TaskSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The TrainJob as a `kubeflow_trainer_api.models.TrainerV1alpha1TrainJob` (validated on build)."""
    from kubeflow.trainer.constants import constants
    from kubeflow_trainer_api import models as m

    def model(cls: Any, data: dict[str, Any], where: str) -> Any:
        return js.checked(data, cls.from_dict, lambda obj: obj.to_dict(), where)

    t = cfg.trainer
    trainer = {
        "image": t.image,
        "command": job_command(cfg, TRAINJOB_RENDEZVOUS),
        "numNodes": t.num_nodes,
        "numProcPerNode": processes_per_node(cfg),
        "env": js.env_json(cfg, config_yaml, output_uri, task, environ),
    }
    if resources := js.resources_json(cfg, task):
        trainer["resourcesPerNode"] = resources
    # Scheduling, volumes, pull secrets and security are not part of the Trainer API: a runtime patch
    # (Trainer 2.2+) sets them on the node pods. The security context (restricted Pod Security
    # Standard) is always set, so there is always a patch.
    pod = {**js.pod_json(cfg, task), "containers": [js.container_json(NODE, task)]}
    pod_patch = {"template": {"spec": model(m.TrainerV1alpha1PodSpecPatch, pod, "trainer").to_dict()}}
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {"spec": {"replicatedJobs": [{"name": NODE, "template": {"spec": pod_patch}}]}}
        },
    }
    return model(
        m.TrainerV1alpha1TrainJob,
        {
            "apiVersion": constants.API_VERSION,
            "kind": constants.TRAINJOB_KIND,
            "metadata": {"name": name, "labels": dict(js.LABELS)} | ({"namespace": t.namespace} if t.namespace else {}),
            "spec": {
                "runtimeRef": {"name": t.runtime, "kind": runtime_kind},
                "trainer": trainer,
                "runtimePatches": [patch],
                # The cluster stops the job at the same deadline even if this step's pod dies first.
                "activeDeadlineSeconds": t.timeout,
            },
        },
        "trainjob",
    )


class TrainJobRun(JobRun):
    """A submitted TrainJob, as the wait loop sees it."""

    kind = "TrainJob"

    def state(self) -> JobState:
        from kubeflow.trainer.constants import constants

        status = self.client.get_job(self.name).status
        if status == constants.TRAINJOB_COMPLETE:
            return JobState(Phase.SUCCEEDED)
        if status == constants.TRAINJOB_FAILED:
            return JobState(Phase.FAILED, self.failure_reason())
        return JobState(Phase.RUNNING if status == constants.TRAINJOB_RUNNING else Phase.PENDING)

    def failure_reason(self) -> str:
        """The Failed condition's reason and message, plus which node container died how."""
        from kubeflow.trainer.constants import constants
        from kubeflow_trainer_api import models as m

        backend, selector = self.client.backend, f"{constants.JOBSET_NAME_LABEL}={self.name}"
        pods = lambda: backend.core_api.list_namespaced_pod(self.namespace, label_selector=selector).items  # noqa: E731
        try:
            raw = backend.custom_api.get_namespaced_custom_object(
                constants.GROUP, constants.VERSION, self.namespace, constants.TRAINJOB_PLURAL, self.name
            )
            status = m.TrainerV1alpha1TrainJob.from_dict(raw).status
        except Exception:  # noqa: BLE001 - the pods may still say why
            status = None
        conditions = [
            f"{c.reason}: {c.message}"
            for c in (status.conditions if status and status.conditions else [])
            if c.type == constants.TRAINJOB_FAILED and c.status == "True"
        ]
        return failure_reason(conditions, pods, NODE)

    def stream_logs(self) -> Iterator[str]:
        yield from self.client.get_job_logs(self.name, step=f"{NODE}-0", follow=True)

    def delete(self) -> None:
        self.client.delete_job(self.name)


def submit_trainjob(
    cfg: TrainConfig,
    *,
    config_yaml: str,
    output_uri: str,
    task: js.TaskSettings | None = None,
    client_configuration: Any = None,
) -> TrainJobRun:
    """Check the runtime exists, create the TrainJob, and return a handle for `wait_for_job`."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.types import types

    t = cfg.trainer
    client = sdk_call(
        "cannot connect to Kubernetes for a TrainJob",
        lambda: TrainerClient(KubernetesBackendConfig(namespace=t.namespace, client_configuration=client_configuration)),
    )
    namespace = client.backend.namespace
    runtime = sdk_call(
        f"trainer.runtime: no TrainingRuntime or ClusterTrainingRuntime {t.runtime!r} visible from namespace {namespace}",
        lambda: client.get_runtime(t.runtime),
    )
    if runtime.trainer.trainer_type != types.TrainerType.CUSTOM_TRAINER:
        raise ConfigError(f"trainer.runtime: {t.runtime!r} is a builtin-trainer runtime; use a torch runtime")
    job = build_trainjob(
        js.with_namespace(cfg, namespace),
        name=js.new_job_name(),
        config_yaml=config_yaml,
        output_uri=output_uri,
        runtime_kind=runtime.kind.value,
        task=task,
    )
    args = (constants.GROUP, constants.VERSION, namespace, constants.TRAINJOB_PLURAL, job.to_dict())
    sdk_call(
        f"cannot create TrainJob {namespace}/{job.metadata.name}",
        lambda: client.backend.custom_api.create_namespaced_custom_object(*args),
    )
    return TrainJobRun(client, job.metadata.name, namespace)
