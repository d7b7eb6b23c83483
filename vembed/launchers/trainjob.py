"""backend: trainjob: a Kubeflow Trainer v2 TrainJob, through the kubeflow SDK (TrainerClient).

The TrainJob references a training runtime (default `torch-distributed`) and overrides its trainer:
our image, `bash -c` with the `accelerate launch` script, num_nodes, resources, and env. Secrets are
passed as `secretKeyRef`s. The SDK's CustomTrainerContainer only takes plain env values, so the
TrainJob is built from the SDK's own CRD models (kubeflow_trainer_api) and submitted through the
SDK backend's Kubernetes client; status, logs and deletion go through TrainerClient.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from vembed.config import TrainConfig
from vembed.errors import ConfigError
from vembed.launchers.command import TRAINJOB_RENDEZVOUS, job_command, processes_per_node
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

PATCH_MANAGER = "vembed-factory/train-step"
NODE = "node"  # the trainer's replicated job and container name in Trainer runtimes


def _model(model: Any, data: dict[str, Any], where: str) -> Any:
    """Build an SDK model from Kubernetes JSON, refusing keys the model would silently drop."""
    obj = model.from_dict(data)
    dropped = dropped_keys(data, obj.to_dict())
    if dropped:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(dropped)}")
    return obj


def build_trainjob(
    cfg: TrainConfig,
    *,
    name: str,
    config_yaml: str,
    output_uri: str,
    runtime_kind: str = "ClusterTrainingRuntime",
    task: TaskSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The TrainJob as a `kubeflow_trainer_api.models.TrainerV1alpha1TrainJob` (validated on build)."""
    from kubeflow.trainer.constants import constants
    from kubeflow_trainer_api import models as m

    t = cfg.trainer
    resources = resources_json(cfg, task)
    trainer = m.TrainerV1alpha1Trainer(
        image=t.image,
        command=job_command(cfg, TRAINJOB_RENDEZVOUS),
        numNodes=t.num_nodes,
        numProcPerNode=processes_per_node(cfg),
        resourcesPerNode=_model(m.IoK8sApiCoreV1ResourceRequirements, resources, "resources")
        if resources
        else None,
        env=[
            _model(m.IoK8sApiCoreV1EnvVar, e, f"env {e.get('name')}")
            for e in env_json(cfg, config_yaml, output_uri, task, environ)
        ],
    )
    # Scheduling, volumes, pull secrets and security are not part of the Trainer API: a runtime patch
    # (Trainer 2.2+) sets them on the node pods.
    # The security context (restricted Pod Security Standard) is always set, so there is always a patch.
    pod = pod_json(cfg, task)
    container: dict[str, Any] = {"name": NODE, "securityContext": container_security_json()}
    if task and task.volume_mounts:
        container["volumeMounts"] = list(task.volume_mounts)
    pod["containers"] = [container]
    patches = None
    if pod:
        job_patch = m.TrainerV1alpha1JobTemplatePatch(
            spec=m.TrainerV1alpha1JobSpecPatch(
                template=m.TrainerV1alpha1PodTemplatePatch(
                    spec=_model(m.TrainerV1alpha1PodSpecPatch, pod, "trainer")
                )
            )
        )
        patches = [
            m.TrainerV1alpha1RuntimePatch(
                manager=PATCH_MANAGER,
                trainingRuntimeSpec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
                    template=m.TrainerV1alpha1JobSetTemplatePatch(
                        spec=m.TrainerV1alpha1JobSetSpecPatch(
                            replicatedJobs=[
                                m.TrainerV1alpha1ReplicatedJobPatch(name=NODE, template=job_patch)
                            ]
                        )
                    )
                ),
            )
        ]
    return m.TrainerV1alpha1TrainJob(
        apiVersion=constants.API_VERSION,
        kind=constants.TRAINJOB_KIND,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=t.namespace, labels=dict(LABELS)
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtimeRef=m.TrainerV1alpha1RuntimeRef(name=t.runtime, kind=runtime_kind),
            trainer=trainer,
            runtimePatches=patches,
            # The cluster stops the job at the same deadline even if this step's pod dies first.
            activeDeadlineSeconds=t.timeout,
        ),
    )


def trainer_client(namespace: str | None, client_configuration: Any = None) -> Any:
    """A TrainerClient; without `client_configuration`, the in-cluster or kube-config credentials."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    try:
        return TrainerClient(
            KubernetesBackendConfig(namespace=namespace, client_configuration=client_configuration)
        )
    except Exception as e:  # noqa: BLE001 - no cluster credentials: say so in one line
        raise TrainingJobError(f"cannot connect to Kubernetes for a TrainJob: {api_error_text(e)}") from None


class TrainJobRun:
    """A submitted TrainJob, as the wait loop sees it."""

    def __init__(self, client: Any, name: str):
        self.client, self.name = client, name
        self.namespace = client.backend.namespace
        self.description = f"TrainJob {self.namespace}/{name}"

    def state(self) -> JobState:
        from kubeflow.trainer.constants import constants

        status = self.client.get_job(self.name).status
        if status == constants.TRAINJOB_COMPLETE:
            return JobState(Phase.SUCCEEDED)
        if status == constants.TRAINJOB_FAILED:
            return JobState(Phase.FAILED, self.failure_reason())
        if status == constants.TRAINJOB_RUNNING:
            return JobState(Phase.RUNNING)
        return JobState(Phase.PENDING)

    def failure_reason(self) -> str:
        """The Failed condition's reason and message, plus which node container died how."""
        from kubeflow.trainer.constants import constants
        from kubeflow_trainer_api import models as m

        backend = self.client.backend
        parts: list[str] = []
        try:
            raw = backend.custom_api.get_namespaced_custom_object(
                constants.GROUP, constants.VERSION, self.namespace, constants.TRAINJOB_PLURAL, self.name
            )
            status = m.TrainerV1alpha1TrainJob.from_dict(raw).status
            parts += [
                f"{c.reason}: {c.message}"
                for c in (status.conditions if status and status.conditions else [])
                if c.type == constants.TRAINJOB_FAILED and c.status == "True"
            ]
            pods = backend.core_api.list_namespaced_pod(
                self.namespace, label_selector=f"{constants.JOBSET_NAME_LABEL}={self.name}"
            ).items
            parts.append(describe_pod_failure(pods, NODE))
        except Exception as e:  # noqa: BLE001 - report what was found; the job did fail either way
            parts.append(f"(details unavailable: {api_error_text(e)})")
        return "; ".join(p for p in parts if p)

    def stream_logs(self) -> Iterator[str]:
        yield from self.client.get_job_logs(self.name, step=f"{NODE}-0", follow=True)

    def delete(self) -> None:
        self.client.delete_job(self.name)


def submit_trainjob(
    cfg: TrainConfig,
    *,
    config_yaml: str,
    output_uri: str,
    task: TaskSettings | None = None,
    client_configuration: Any = None,
) -> TrainJobRun:
    """Check the runtime exists, create the TrainJob, and return a handle for `wait_for_job`."""
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.types import types

    t = cfg.trainer
    client = trainer_client(t.namespace, client_configuration)
    namespace = client.backend.namespace
    try:
        runtime = client.get_runtime(t.runtime)
    except Exception as e:  # noqa: BLE001
        raise TrainingJobError(
            f"trainer.runtime: no TrainingRuntime or ClusterTrainingRuntime {t.runtime!r} "
            f"visible from namespace {namespace} ({api_error_text(e)})"
        ) from None
    if runtime.trainer.trainer_type != types.TrainerType.CUSTOM_TRAINER:
        raise ConfigError(f"trainer.runtime: {t.runtime!r} is a builtin-trainer runtime; use a torch runtime")
    job = build_trainjob(
        cfg.model_copy(update={"trainer": t.model_copy(update={"namespace": namespace})}),
        name=new_job_name(),
        config_yaml=config_yaml,
        output_uri=output_uri,
        runtime_kind=runtime.kind.value,
        task=task,
    )
    try:
        client.backend.custom_api.create_namespaced_custom_object(
            constants.GROUP, constants.VERSION, namespace, constants.TRAINJOB_PLURAL, job.to_dict()
        )
    except Exception as e:  # noqa: BLE001
        raise TrainingJobError(
            f"cannot create TrainJob {namespace}/{job.metadata.name}: {api_error_text(e)}"
        ) from None
    return TrainJobRun(client, job.metadata.name)
