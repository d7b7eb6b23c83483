"""Every manifest vembed emits, checked against the upstream schemas that are available offline.

No CRD OpenAPI file ships in the installed packages, so the schemas are the upstream SDKs' own models,
generated from those CRDs and protos, read strictly (an unknown or misplaced field is an error):

| manifest | schema |
|---|---|
| compiled pipeline (IR + Kubernetes platform spec) | kfp `pipeline_spec_pb2.PipelineSpec` / `PlatformSpec`, kfp-kubernetes `KubernetesExecutorConfig` protos |
| TrainJob | `kubeflow_trainer_api` models (Trainer CRD), pod parts also as `kubernetes` core/v1 models |
| PyTorchJob | `kubeflow.training` models (training-operator CRD), pod template as `kubernetes` core/v1 |
| RBAC | `kubernetes` rbac/v1 models (tests/test_trainjob.py) |
| InferenceService | `kserve` `V1beta1InferenceService`, when kserve is installed and vembed builds one (`check_inference_service`) |
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from pipelines.compile import COMPILED_PATH, compile_pipeline
from pipelines.lora_finetune import PipelineOptions
from vembed.config import load_config
from vembed.launchers.jobspec import TaskSettings, dropped_keys


def check_k8s(type_name: str, data: Any) -> Any:
    """`data` read as a kubernetes-client model (e.g. "V1PodSpec"); nothing may be dropped on the way."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    obj = api.deserialize(SimpleNamespace(data=json.dumps(data)), type_name)
    assert dropped_keys(data, api.sanitize_for_serialization(obj)) == [], f"{type_name}: unknown fields"
    return obj


def check_proto(message: Any, data: dict) -> Any:
    from google.protobuf import json_format

    return json_format.ParseDict(data, message, ignore_unknown_fields=False)


def check_inference_service(manifest: dict) -> None:
    """For the deploy step: a KServe InferenceService against kserve's model (skips without kserve)."""
    kserve = pytest.importorskip("kserve")
    model = kserve.V1beta1InferenceService
    api = kserve.ApiClient() if hasattr(kserve, "ApiClient") else None
    if api is not None:
        obj = api.deserialize(SimpleNamespace(data=json.dumps(manifest)), "V1beta1InferenceService")
        assert dropped_keys(manifest, api.sanitize_for_serialization(obj)) == []
    else:  # pragma: no cover - older kserve SDKs
        assert model(**manifest)


def cluster_compile(tmp_path: Path, backend: str) -> Path:
    opts = PipelineOptions(train_backend=backend, image_pull_secrets=["regcred"], model_cache_pvc="hf-cache",
                           node_selector={"pool": "gpu"},
                           tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}])  # fmt: skip
    return compile_pipeline(tmp_path / f"{backend}.yaml", opts)


@pytest.mark.parametrize("variant", ["committed", "trainjob"])
def test_compiled_pipeline_matches_the_kfp_protos(variant: str, tmp_path: Path) -> None:
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb
    from kfp.pipeline_spec import pipeline_spec_pb2 as pb

    path = COMPILED_PATH if variant == "committed" else cluster_compile(tmp_path, variant)
    spec, platform = yaml.safe_load_all(path.read_text())
    check_proto(pb.PipelineSpec(), spec)
    check_proto(pb.PlatformSpec(), platform)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"]), "every executor has a platform config"
    for name, config in executors.items():
        check_proto(k8s_pb.KubernetesExecutorConfig(), config)
        assert config["securityContext"]["runAsNonRoot"] is True, name


def job_cfg(backend: str):
    return load_config(None, [
        f"trainer.backend={backend}", "trainer.image=registry.example/vembed@sha256:" + "ab" * 32,
        "trainer.num_nodes=2", "trainer.gpus_per_node=2", "trainer.resources={cpu: '8', memory: 64Gi}",
        "trainer.image_pull_secrets=[regcred]", "trainer.env_from_secrets={AWS_ACCESS_KEY_ID: vembed-s3/key}",
    ])  # fmt: skip


TASK = TaskSettings.from_mapping({
    "env": [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "vembed-s3", "key": "secret"}}}],
    "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
    "volume_mounts": [{"name": "cache", "mountPath": "/model-cache"}],
    "node_selector": {"pool": "gpu"},
    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "resources": {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}},
})  # fmt: skip


def test_trainjob_matches_the_trainer_crd_and_core_models() -> None:
    from kubeflow_trainer_api import models as m

    from vembed.launchers.trainjob import build_trainjob

    cfg = job_cfg("trainjob")
    manifest = json.loads(json.dumps(
        build_trainjob(cfg, name="vembed-x", config_yaml=cfg.to_yaml(), output_uri="s3://b/o", task=TASK,
                       environ={}).to_dict()
    ))  # fmt: skip
    again = m.TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()
    assert dropped_keys(manifest, again) == [] and again == manifest
    (patch,) = manifest["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    # The patch's pod parts are plain core/v1 objects: check them as such too.
    check_k8s("V1PodSecurityContext", pod["securityContext"])
    for container in pod["containers"]:
        check_k8s("V1SecurityContext", container["securityContext"])
        check_k8s("list[V1VolumeMount]", container["volumeMounts"])
    check_k8s("list[V1LocalObjectReference]", pod["imagePullSecrets"])
    check_k8s("list[V1Volume]", pod["volumes"])
    check_k8s("list[V1Toleration]", pod["tolerations"])
    check_k8s("V1ResourceRequirements", manifest["spec"]["trainer"]["resourcesPerNode"])
    check_k8s("list[V1EnvVar]", manifest["spec"]["trainer"]["env"])


def test_pytorchjob_matches_the_training_operator_crd_and_core_models() -> None:
    from kubeflow.training.api_client import ApiClient

    from vembed.launchers.pytorchjob import build_pytorchjob

    cfg = job_cfg("pytorchjob")
    job = build_pytorchjob(cfg, name="vembed-x", config_yaml=cfg.to_yaml(), output_uri="s3://b/o", task=TASK,
                           environ={})  # fmt: skip
    api = ApiClient()
    manifest = json.loads(json.dumps(api.sanitize_for_serialization(job)))
    again = api.deserialize(SimpleNamespace(data=json.dumps(manifest)), "KubeflowOrgV1PyTorchJob")
    assert dropped_keys(manifest, api.sanitize_for_serialization(again)) == []
    for replica in manifest["spec"]["pytorchReplicaSpecs"].values():
        template = check_k8s("V1PodTemplateSpec", replica["template"])
        assert template.spec.security_context.run_as_non_root is True
        assert template.spec.containers[0].security_context.allow_privilege_escalation is False


def test_the_checks_refuse_an_unknown_field() -> None:
    """The validators above are strict: a misspelt field is caught, not silently dropped."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb

    with pytest.raises(json_format.ParseError):
        check_proto(k8s_pb.KubernetesExecutorConfig(), {"securityContext": {"runAsNonRoot": True, "privileged": True}})
    with pytest.raises(AssertionError, match="unknown fields"):
        check_k8s("V1SecurityContext", {"allowPrivilegeEscalation": False, "dropCapabilities": ["ALL"]})
