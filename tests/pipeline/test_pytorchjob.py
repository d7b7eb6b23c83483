"""backend: pytorchjob — the PyTorchJob manifest and the wait/stream/fail/timeout loop.

No Kubernetes API can run here, so the cluster is tests/support/fake_k8s.py: a loopback HTTP server that
answers the REST calls the kubeflow-training SDK makes, driven through a real kubernetes.client.Configuration.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import yaml

from tests.pipeline.test_trainjob import OVERRIDES, SECRET_VALUE, accelerate_line, parse_accelerate
from tests.support.fake_k8s import fake_kube
from vembed.config import TrainConfig, load_config
from vembed.errors import ConfigError
from vembed.pipeline.launchers.command import CONFIG_ENV, ENTRYPOINT_MODULE, JOB_CONFIG_PATH
from vembed.pipeline.launchers.jobspec import TaskSettings, dropped_keys
from vembed.pipeline.launchers.pytorchjob import build_pytorchjob, submit_pytorchjob
from vembed.pipeline.launchers.wait import TrainingJobError, wait_for_job

MASTER_ENV = {"RANK": "0", "MASTER_ADDR": "vembed-x-master-0", "MASTER_PORT": "23456"}


def pytorchjob_cfg(*extra: str) -> TrainConfig:
    return load_config(None, [*OVERRIDES, "trainer.backend=pytorchjob", *extra])


def to_json(job) -> dict:
    from kubernetes.client import ApiClient

    return json.loads(json.dumps(ApiClient().sanitize_for_serialization(job)))


def test_pytorchjob_manifest_validates_against_the_sdk_models():
    from kubeflow.training import models
    from kubeflow.training.api_client import ApiClient

    cfg = pytorchjob_cfg()
    task = TaskSettings.from_mapping(
        {
            "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": "shared-rwx"}}],
            "volume_mounts": [{"name": "workspace", "mountPath": "/workspace"}],
        }
    )
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"image_pull_secrets": ["regcred"]})})
    job = build_pytorchjob(
        cfg,
        name="vembed-test",
        config_yaml=cfg.to_yaml(),
        output_uri="/workspace/out",
        task=task,
        environ={"AWS_SECRET_ACCESS_KEY": SECRET_VALUE, "AWS_REGION": "eu-west-1"},
    )
    manifest = to_json(job)

    # The SDK's own deserializer (what TrainingClient.get_job uses) reads it back without losing anything.
    again = ApiClient().deserialize(SimpleNamespace(data=json.dumps(manifest)), "KubeflowOrgV1PyTorchJob")
    assert isinstance(again, models.KubeflowOrgV1PyTorchJob)
    assert dropped_keys(manifest, to_json(again)) == []
    assert to_json(again) == manifest

    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = manifest["spec"]
    assert spec["nprocPerNode"] == "4"
    assert spec["runPolicy"] == {"activeDeadlineSeconds": 7200, "backoffLimit": 0, "cleanPodPolicy": "None"}
    replicas = spec["pytorchReplicaSpecs"]
    assert {k: (v["replicas"], v["restartPolicy"]) for k, v in replicas.items()} == {
        "Master": (1, "Never"),
        "Worker": (1, "Never"),
    }
    pod = replicas["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "workspace", "persistentVolumeClaim": {"claimName": "shared-rwx"}}]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == "registry.example/vembed-train:1.0"
    assert container["volumeMounts"] == [{"name": "workspace", "mountPath": "/workspace"}]
    # Restricted Pod Security Standard on every replica's pod and container.
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    expected = {"cpu": "16", "memory": "128Gi", "ephemeral-storage": "200Gi", "nvidia.com/gpu": "4"}
    assert container["resources"] == {"requests": expected, "limits": expected}

    # Every pod runs the same script; the operator's RANK / MASTER_* env places it.
    assert container["command"][:2] == ["bash", "-c"]
    words = accelerate_line(container["command"][2])
    assert {"${RANK}", "${MASTER_ADDR}", "${MASTER_PORT}"} <= set(words)
    args = parse_accelerate(words, MASTER_ENV)
    assert (args.num_processes, args.num_machines, args.machine_rank) == (8, 2, 0)
    assert (args.main_process_ip, args.main_process_port) == ("vembed-x-master-0", 23456)
    assert args.use_fsdp and args.module and args.training_script == ENTRYPOINT_MODULE
    assert args.training_script_args == [JOB_CONFIG_PATH]
    assert (
        'if [ "${RANK:-0}" = "0" ]; then python -m vembed.pipeline.launchers.stage out; fi' in container["command"][2]
    )

    env = {e["name"]: e for e in container["env"]}
    assert TrainConfig.model_validate(yaml.safe_load(env[CONFIG_ENV]["value"])) == cfg
    assert env["AWS_REGION"] == {"name": "AWS_REGION", "value": "eu-west-1"}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "vembed-s3", "key": "secret-key"}},
    }
    assert SECRET_VALUE not in json.dumps(manifest)


def test_pytorchjob_single_node_has_only_a_master():
    cfg = load_config(None, ["trainer.backend=pytorchjob", "trainer.image=img"])
    spec = to_json(build_pytorchjob(cfg, name="one", config_yaml="{}", output_uri="s3://b/o", environ={}))[
        "spec"
    ]
    assert list(spec["pytorchReplicaSpecs"]) == ["Master"]
    (container,) = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert container["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert parse_accelerate(accelerate_line(container["command"][2])).machine_rank is None


def test_pytorchjob_rejects_an_unknown_volume_field():
    task = TaskSettings.from_mapping({"volumes": [{"name": "v", "persistentVolumeClam": {"claimName": "c"}}]})
    with pytest.raises(ConfigError, match=r"trainer: unknown field\(s\) volumes\.0\.persistentVolumeClam"):
        build_pytorchjob(
            pytorchjob_cfg(), name="x", config_yaml="{}", output_uri="s3://b/o", task=task, environ={}
        )


def run_pytorchjob(fake, cfg, **wait_kwargs):
    run = submit_pytorchjob(
        cfg, config_yaml=cfg.to_yaml(), output_uri="s3://b/o", client_configuration=fake.configuration()
    )
    lines: list[str] = []
    wait_for_job(
        run, timeout=wait_kwargs.pop("timeout", 60), poll_interval=0.01, log=lines.append, **wait_kwargs
    )
    return run, lines


def test_pytorchjob_completes_streams_master_logs_and_is_deleted():
    log = ["[rank0] step 10 loss 2.0", "[rank0] saved checkpoint-10"]
    with fake_kube(phases=["Pending", "Running", "Running", "Succeeded"], log_lines=log) as fake:
        run, lines = run_pytorchjob(fake, pytorchjob_cfg("trainer.namespace=team-b"))
    assert all(line in lines for line in log)
    assert f"GET /api/v1/namespaces/team-b/pods/{run.name}-master-0/log" in fake.calls
    assert fake.deleted == [run.name]
    (body,) = fake.created
    assert body["metadata"] == {
        "name": run.name,
        "namespace": "team-b",
        "labels": {"app.kubernetes.io/managed-by": "vembed-factory", "app.kubernetes.io/component": "train"},
    }


def test_pytorchjob_failure_raises_the_jobs_reason_and_deletes_it():
    with fake_kube(
        phases=["Running", "Failed"],
        failure=("PyTorchJobFailed", "PyTorchJob vembed is failed because 1 Worker replica(s) failed."),
        exit_code=(1, "Error"),
    ) as fake:
        with pytest.raises(TrainingJobError) as err:
            run_pytorchjob(fake, pytorchjob_cfg())
    assert "failed: PyTorchJobFailed: PyTorchJob vembed is failed because 1 Worker replica(s) failed." in str(
        err.value
    )
    assert "container pytorch: Error (exit code 1)" in str(err.value)
    assert len(fake.deleted) == 1


def test_pytorchjob_timeout_raises_and_deletes_unless_kept():
    with fake_kube(phases=["Pending"]) as fake:
        with pytest.raises(TrainingJobError, match=r"did not finish within trainer.timeout=0.2s"):
            run_pytorchjob(fake, pytorchjob_cfg(), timeout=0.2)
    assert len(fake.deleted) == 1
    with fake_kube(phases=["Pending"]) as fake:
        with pytest.raises(TrainingJobError, match=r"did not finish"):
            run_pytorchjob(fake, pytorchjob_cfg(), timeout=0.2, keep_job=True)
    assert fake.deleted == [] and len(fake.created) == 1


def test_pytorchjob_create_denied_is_one_clear_line():
    with fake_kube() as fake:
        original = fake.handle

        def deny_create(method, path, body):
            if method == "POST":
                return 403, {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "Forbidden",
                    "code": 403,
                    "message": 'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:kubeflow:'
                    'pipeline-runner" cannot create resource "pytorchjobs"',
                }
            return original(method, path, body)

        fake.handle = deny_create
        with pytest.raises(TrainingJobError) as err:
            run_pytorchjob(fake, pytorchjob_cfg())
    message = str(err.value)
    assert re.match(r"cannot create PyTorchJob [\w-]+/vembed-[0-9a-f]{8}: ", message)
    assert "HTTP 403 Forbidden" in message and 'cannot create resource "pytorchjobs"' in message
    assert "\n" not in message


def test_pytorchjob_through_the_train_step_with_a_kubeconfig(s3_env, tmp_path, monkeypatch):
    """vembed.pipeline.steps.train.train with trainer.backend=pytorchjob and credentials from a kubeconfig file."""
    from kubeflow.training.utils import utils as training_utils

    from tests.pipeline.test_trainjob import check_round_trip, job_player, write_dataset
    from vembed.pipeline.steps.train import train as train_step

    s3_env.client().create_bucket(Bucket="runs-pt")
    data_dir = write_dataset(tmp_path / "dataset")
    seen: dict = {}

    def master_env(body: dict) -> list[dict]:
        return body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]

    with fake_kube(phases=["Succeeded"], log_lines=["done"]) as fake:
        fake.on_create = job_player(tmp_path / "pod", master_env, seen)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                    "users": [{"name": "me", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                    "current-context": "fake",
                }
            )
        )
        # kubernetes.config reads $KUBECONFIG once, at import; point its default at this file.
        from kubernetes.config import kube_config

        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        # Loading it replaces the client's process-wide default configuration: restore that afterwards.
        from kubernetes.client import Configuration

        monkeypatch.setattr(Configuration, "_default", Configuration._default)
        # If these tests themselves run in a pod, the SDK would prefer the in-cluster credentials.
        monkeypatch.setattr(training_utils, "is_running_in_k8s", lambda: False)
        summary = train_step(
            data_dir,
            tmp_path / "step-output",
            config_overrides=[*OVERRIDES, "trainer.backend=pytorchjob", "trainer.namespace=team-c"],
            output_uri="s3://runs-pt/run-2/model",
        )
    check_round_trip(summary, seen, data_dir, tmp_path / "pod", tmp_path / "step-output")
    assert summary["config"]["trainer"]["backend"] == "pytorchjob"
    assert fake.deleted and fake.calls[0] == "POST /apis/kubeflow.org/v1/namespaces/team-c/pytorchjobs"
