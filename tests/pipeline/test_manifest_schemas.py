"""Every manifest vembed emits, checked against the upstream schemas that are available offline.

No CRD OpenAPI file ships in the installed packages, so the schemas are the upstream SDKs' own models,
generated from those CRDs and protos, read strictly (an unknown or misplaced field is an error):

| manifest | schema |
|---|---|
| compiled pipeline (IR + Kubernetes platform spec) | kfp `pipeline_spec_pb2.PipelineSpec` / `PlatformSpec`, kfp-kubernetes `KubernetesExecutorConfig` protos |
| TrainJob | `kubeflow_trainer_api` models (Trainer CRD), pod parts also as `kubernetes` core/v1 models |
| PyTorchJob | `kubeflow.training` models (training-operator CRD), pod template as `kubernetes` core/v1 |
| RBAC | `kubernetes` rbac/v1 models (tests/pipeline/test_trainjob.py) |
| InferenceService (deploy step) | `kserve` 0.21 `V1beta1InferenceService` models (kserve CRD), core/v1 parts as `kubernetes` models (`check_inference_service`) |
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

from pipelines.compile import COMPILED_PATH, compile_pipeline
from pipelines.lora_finetune import PipelineOptions
from vembed.config import load_config
from vembed.pipeline.launchers.jobspec import TaskSettings, dropped_keys


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


def kserve_models() -> ModuleType:
    """kserve's OpenAPI models (`kserve.models`) without running kserve/__init__.py.

    The Makefile installs kserve with `--no-deps`: its runtime pins (pandas<3, psutil<6) would downgrade
    this environment, and `import kserve` first loads the model server (fastapi, grpc, cloudevents...).
    The generated models need only kserve.configuration, six and the kubernetes client, so `kserve` is
    registered as a bare package over the installed directory and only the models are imported from it.
    """
    if "kserve" not in sys.modules:
        spec = importlib.util.find_spec("kserve")
        if spec is None or not spec.submodule_search_locations:
            pytest.fail("kserve is not installed: `pip install --no-deps kserve==0.21.0` (make install does)")
        package = ModuleType("kserve")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["kserve"] = package
    return importlib.import_module("kserve.models")


PRIMITIVES: dict[str, Any] = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
                              "datetime": str, "date": str}  # fmt: skip


def strict_model(data: Any, type_name: str, path: str = "$") -> Any:
    """`data` read into the OpenAPI model `type_name`, refusing any field the model does not have.

    KServe's types come from `kserve.models`, the core/v1 ones they embed (V1Container, V1ObjectMeta...)
    from the kubernetes client, as in the kserve SDK. An unknown field or a wrongly typed value is an
    AssertionError naming its path; a null is kept as None (a merge patch uses it to delete a field)."""
    from kubernetes.client import models as k8s

    if data is None:
        return None
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        assert isinstance(data, list), f"{path}: expected a list, got {data!r}"
        return [strict_model(v, m.group(1), f"{path}[{i}]") for i, v in enumerate(data)]
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        assert isinstance(data, dict), f"{path}: expected a mapping, got {data!r}"
        return {k: strict_model(v, m.group(1), f"{path}.{k}") for k, v in data.items()}
    if type_name in PRIMITIVES:
        kind = PRIMITIVES[type_name]
        ok = isinstance(data, kind) and not (type_name in ("int", "float") and isinstance(data, bool))
        assert ok, f"{path}: expected {type_name}, got {data!r}"
        return data
    cls = getattr(kserve_models(), type_name, None) or getattr(k8s, type_name, None)
    assert cls is not None, f"{path}: no model for {type_name}"
    assert isinstance(data, dict), f"{path}: expected a {type_name} object, got {data!r}"
    fields = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(fields))
    assert not unknown, f"{path}: unknown fields for {type_name}: {unknown}"
    kwargs = {fields[k]: strict_model(v, cls.openapi_types[fields[k]], f"{path}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def check_inference_service(manifest: dict) -> Any:
    """A KServe InferenceService (or a merge patch of one) against kserve's `V1beta1InferenceService`."""
    from kubernetes.client import ApiClient

    obj = strict_model(manifest, "V1beta1InferenceService")
    drop_nulls = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
    without_nulls = json.loads(json.dumps(manifest), object_hook=drop_nulls)
    assert ApiClient().sanitize_for_serialization(obj) == without_nulls, "the model changed the manifest"
    return obj


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

    from vembed.pipeline.launchers.trainjob import build_trainjob

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

    from vembed.pipeline.launchers.pytorchjob import build_pytorchjob

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


class RecordingApi:
    """The real CustomObjectsApi, keeping each merge-patch body it sends (to check those as well)."""

    def __init__(self, api: Any) -> None:
        self.api, self.patches = api, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)

    def patch_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> Any:
        self.patches.append(json.loads(json.dumps(args[-1])))
        return self.api.patch_namespaced_custom_object(*args, **kwargs)


def test_inference_service_matches_the_kserve_crd_models() -> None:
    """What the deploy step sends (create, canary patch, full rollout), through the Kubernetes client to
    the loopback fake API server (tests/support/fake_k8s.py: no API server can run here), read as kserve's
    models. The stored objects are checked without their status: kserve 0.21's models name Knative's
    status types (KnativeCondition, KnativeURL) without shipping them."""
    from tests.support.fake_k8s import fake_kube
    from vembed.pipeline.launchers.inference_service import (
        InferenceServices,
        PredictorSpec,
        custom_objects_api,
    )

    def spec(version: int) -> PredictorSpec:
        return PredictorSpec(image="registry.example/vembed@sha256:" + "ab" * 32, gpus=1,
                             storage_uri=f"s3://models/emb/{version}/artifacts/merged",
                             model_uri=f"models:/emb/{version}", service_account="s3-reader")  # fmt: skip

    def stored(fake: Any) -> dict:
        return {k: v for k, v in fake.isvcs["emb"]["obj"].items() if k != "status"}

    with fake_kube() as fake:
        api = RecordingApi(custom_objects_api(fake.configuration()))
        services = InferenceServices(api, "search")
        assert services.apply("emb", spec(1), 100)[0] == "created"
        (created,) = fake.created
        isvc = check_inference_service(created)
        (container,) = isvc.spec.predictor.containers
        assert container.name == "kserve-container"
        assert isvc.spec.predictor.service_account_name == "s3-reader"
        assert {e.name: e.value for e in container.env}["STORAGE_URI"] == spec(1).storage_uri
        assert isvc.spec.predictor.canary_traffic_percent is None

        assert services.apply("emb", spec(2), 25)[0] == "patched"
        assert check_inference_service(api.patches[-1]).spec.predictor.canary_traffic_percent == 25
        assert check_inference_service(stored(fake)).spec.predictor.canary_traffic_percent == 25

        assert services.apply("emb", spec(2), 100)[0] == "patched"
        assert api.patches[-1]["spec"]["predictor"]["canaryTrafficPercent"] is None  # merge patch: delete it
        check_inference_service(api.patches[-1])
        assert check_inference_service(stored(fake)).spec.predictor.canary_traffic_percent is None


def test_the_kserve_check_refuses_a_misspelt_or_mistyped_field() -> None:
    from vembed.pipeline.launchers.inference_service import PredictorSpec, manifest

    spec = PredictorSpec(image="img", storage_uri="s3://b/m", model_uri="models:/emb/1")
    good = manifest("emb", "search", spec)
    check_inference_service(good)
    misspelt = json.loads(json.dumps(good))
    misspelt["spec"]["predictor"]["canaryTraficPercent"] = 10
    with pytest.raises(AssertionError, match=r"\$\.spec\.predictor: unknown fields .*canaryTraficPercent"):
        check_inference_service(misspelt)
    in_container = json.loads(json.dumps(good))
    in_container["spec"]["predictor"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(AssertionError, match=r"containers\[0\]: unknown fields for V1Container"):
        check_inference_service(in_container)
    mistyped = json.loads(json.dumps(good))
    mistyped["spec"]["predictor"]["canaryTrafficPercent"] = "10"
    with pytest.raises(AssertionError, match="canaryTrafficPercent: expected int"):
        check_inference_service(mistyped)
