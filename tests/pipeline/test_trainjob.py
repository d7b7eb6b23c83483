"""backend: trainjob — the TrainJob manifest, the wait/stream/fail/timeout loop, RBAC, the pipeline IR.

No Kubernetes API can run here, so the cluster is tests/support/fake_k8s.py: a loopback HTTP server that
answers the REST calls the kubeflow SDK makes, driven through a real kubernetes.client.Configuration.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.support.fake_k8s import fake_kube
from vembed.config import TrainConfig, load_config
from vembed.errors import ConfigError
from vembed.pipeline.launchers.command import CONFIG_ENV, ENTRYPOINT_MODULE, JOB_CONFIG_PATH, OUTPUT_URI_ENV
from vembed.pipeline.launchers.jobspec import TaskSettings, dropped_keys
from vembed.pipeline.launchers.trainjob import build_trainjob, submit_trainjob
from vembed.pipeline.launchers.wait import TrainingJobError, wait_for_job

RBAC_DIR = Path(__file__).parents[2] / "pipelines" / "rbac"
SECRET_VALUE = "s3cr3t-value-that-must-never-appear"

OVERRIDES = [
    "trainer.backend=trainjob",
    "trainer.image=registry.example/vembed-train:1.0",
    "trainer.num_nodes=2",
    "trainer.gpus_per_node=4",
    "trainer.resources={cpu: '16', memory: 128Gi, ephemeral: 200Gi}",
    "trainer.node_selector={nvidia.com/gpu.product: H100}",
    "trainer.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    "trainer.env_from_secrets={AWS_ACCESS_KEY_ID: vembed-s3/access-key, AWS_SECRET_ACCESS_KEY: vembed-s3/secret-key}",
    "trainer.timeout=7200",
    "use_fsdp=true",
]


def trainjob_cfg(*extra: str):
    return load_config(None, [*OVERRIDES, *extra])


def accelerate_line(script: str) -> list[str]:
    """The `accelerate launch ...` words of a job script, with ${VAR} references left as text."""
    (line,) = [ln for ln in script.splitlines() if ln.startswith("accelerate launch")]
    return shlex.split(line)


NODE_ENV = {"PET_NODE_RANK": "1", "PET_MASTER_ADDR": "10.0.0.7", "PET_MASTER_PORT": "29500"}


def parse_accelerate(words: list[str], env: dict[str, str] | None = None):
    """Parse with accelerate's own parser, after expanding ${VAR} as the node's shell would."""
    from accelerate.commands.launch import launch_command_parser

    assert words[:2] == ["accelerate", "launch"]
    expanded = [(env or {}).get(w[2:-1], w) if w.startswith("${") else w for w in words[2:]]
    return launch_command_parser().parse_args(expanded)


def test_trainjob_manifest_validates_against_the_sdk_models():
    from kubeflow_trainer_api import models as m

    cfg = trainjob_cfg()
    environ = {"AWS_ENDPOINT_URL": "http://minio.minio:9000", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE}
    task = TaskSettings.from_mapping(
        {
            "env": [{"name": "PIP_INDEX_URL", "value": "http://mirror/simple"}],
            "volumes": None,
            "affinity": None,
            "image_pull_secrets": ["regcred"],
        }
    )
    job = build_trainjob(
        cfg,
        name="vembed-test",
        config_yaml=cfg.to_yaml(),
        output_uri="s3://bucket/out",
        task=task,
        environ=environ,
    )
    manifest = json.loads(json.dumps(job.to_dict()))

    # The CRD model the SDK ships reads it back without losing or changing anything.
    again = m.TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()
    assert dropped_keys(manifest, again) == []
    assert again == manifest

    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    assert spec["activeDeadlineSeconds"] == 7200
    trainer = spec["trainer"]
    assert trainer["image"] == "registry.example/vembed-train:1.0"
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    expected = {"cpu": "16", "memory": "128Gi", "ephemeral-storage": "200Gi", "nvidia.com/gpu": "4"}
    assert trainer["resourcesPerNode"] == {"requests": expected, "limits": expected}

    # The command: stage in, accelerate launch over 2 nodes x 4 GPUs with FSDP, node 0 publishes.
    assert trainer["command"][:2] == ["bash", "-c"]
    script = trainer["command"][2]
    assert script.splitlines()[1] == "python -m vembed.pipeline.launchers.stage in"
    assert "stage out" in script.splitlines()[-1] and "PET_NODE_RANK" in script.splitlines()[-1]
    words = accelerate_line(script)
    assert {"${PET_NODE_RANK}", "${PET_MASTER_ADDR}", "${PET_MASTER_PORT}"} <= set(words)
    args = parse_accelerate(words, NODE_ENV)
    assert (args.num_processes, args.num_machines) == (8, 2)
    assert args.use_fsdp and not args.multi_gpu
    assert (args.machine_rank, args.main_process_ip, args.main_process_port) == (1, "10.0.0.7", 29500)
    assert args.module and args.training_script == ENTRYPOINT_MODULE
    assert args.training_script_args == [JOB_CONFIG_PATH]

    # Env: the config and output as values, storage endpoint forwarded, credentials by reference only.
    env = {e["name"]: e for e in trainer["env"]}
    assert TrainConfig.model_validate(yaml.safe_load(env[CONFIG_ENV]["value"])) == cfg
    assert env[OUTPUT_URI_ENV]["value"] == "s3://bucket/out"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio:9000"
    assert env["PIP_INDEX_URL"]["value"] == "http://mirror/simple"
    for name, ref in [
        ("AWS_ACCESS_KEY_ID", ("vembed-s3", "access-key")),
        ("AWS_SECRET_ACCESS_KEY", ("vembed-s3", "secret-key")),
    ]:
        assert set(env[name]) == {"name", "valueFrom"}
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": ref[0], "key": ref[1]}}
    assert SECRET_VALUE not in json.dumps(manifest)

    # Scheduling goes to the node pods through a runtime patch.
    (patch,) = spec["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    pod = rjob["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # Restricted Pod Security Standard: non-root, RuntimeDefault seccomp, no escalation, no capabilities.
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    (node,) = pod["containers"]
    assert node["name"] == "node"
    assert node["securityContext"]["allowPrivilegeEscalation"] is False
    assert node["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_trainjob_single_node_cpu_manifest_has_no_gpu_or_rendezvous():
    cfg = load_config(None, ["trainer.backend=trainjob", "trainer.image=img", "trainer.gpus_per_node=0"])
    manifest = build_trainjob(cfg, name="cpu", config_yaml="{}", output_uri="s3://b/o", environ={}).to_dict()
    trainer = manifest["spec"]["trainer"]
    assert "resourcesPerNode" not in trainer
    # Only the security context reaches the node pods: no scheduling, volumes or pull secrets.
    (patch,) = manifest["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert set(pod) == {"securityContext", "containers"}
    args = parse_accelerate(accelerate_line(trainer["command"][2]))
    assert args.cpu and (args.num_processes, args.num_machines, args.machine_rank) == (1, 1, None)


def test_trainjob_rejects_an_unknown_toleration_field():
    cfg = trainjob_cfg("trainer.tolerations=[{key: gpu, operator: Exists, tolerationSecond: 5}]")
    with pytest.raises(ConfigError, match=r"trainer: unknown field\(s\) tolerations\.0\.tolerationSecond"):
        build_trainjob(cfg, name="x", config_yaml="{}", output_uri="s3://b/o", environ={})


def run_trainjob(fake, cfg, **wait_kwargs):
    run = submit_trainjob(
        cfg, config_yaml=cfg.to_yaml(), output_uri="s3://b/o", client_configuration=fake.configuration()
    )
    lines: list[str] = []
    wait_for_job(
        run, timeout=wait_kwargs.pop("timeout", 60), poll_interval=0.01, log=lines.append, **wait_kwargs
    )
    return run, lines


def test_trainjob_completes_streams_node0_logs_and_is_deleted():
    log = ["epoch 0 step 10 loss 2.31", "epoch 0 step 20 loss 1.87"]
    with fake_kube(phases=["Pending", "Pending", "Running", "Running", "Succeeded"], log_lines=log) as fake:
        cfg = trainjob_cfg("trainer.namespace=team-a")
        run, lines = run_trainjob(fake, cfg)
    assert all(line in lines for line in log)
    assert fake.deleted == [run.name]
    assert run.description == f"TrainJob team-a/{run.name}"
    # What reached the API server is the manifest the SDK models accept, and carries no secret value.
    (body,) = fake.created
    from kubeflow_trainer_api import models as m

    assert m.TrainerV1alpha1TrainJob.from_dict(body).spec.trainer.num_nodes == 2
    assert body["metadata"]["namespace"] == "team-a"


def test_trainjob_failure_raises_the_jobs_reason_and_deletes_it(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    with fake_kube(
        phases=["Pending", "Running", "Failed"],
        log_lines=["RuntimeError: CUDA out of memory"],
        failure=("JobSetFailed", "jobset node failed"),
    ) as fake:
        with pytest.raises(TrainingJobError) as err:
            run_trainjob(fake, trainjob_cfg())
    message = str(err.value)
    assert "failed: JobSetFailed: jobset node failed" in message
    assert "container node: OOMKilled (exit code 137)" in message
    assert "\n" not in message
    assert len(fake.deleted) == 1
    assert SECRET_VALUE not in json.dumps(fake.created)


def test_trainjob_keep_job_leaves_a_failed_job_in_place():
    with fake_kube(phases=["Running", "Failed"]) as fake:
        with pytest.raises(TrainingJobError, match="failed"):
            run_trainjob(fake, trainjob_cfg(), keep_job=True)
    assert fake.deleted == [] and len(fake.created) == 1


def test_trainjob_timeout_raises_and_deletes_the_job():
    with fake_kube(phases=["Pending"]) as fake:
        with pytest.raises(
            TrainingJobError, match=r"did not finish within trainer.timeout=0.2s \(last seen Pending\)"
        ):
            run_trainjob(fake, trainjob_cfg(), timeout=0.2)
    assert len(fake.deleted) == 1


def test_trainjob_cancelled_step_deletes_the_job():
    """SIGTERM (KFP stopping a cancelled run's pod) ends the wait with an error and deletes the job."""
    import os
    import signal
    import threading

    handler_before = signal.getsignal(signal.SIGTERM)
    with fake_kube(phases=["Pending"]) as fake:

        def terminate_once_polling() -> None:
            while not any(c.startswith("GET /apis/trainer.kubeflow.org/v1alpha1/namespaces/") and "/trainjobs/" in c
                          for c in list(fake.calls)):  # fmt: skip
                threading.Event().wait(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=terminate_once_polling, daemon=True).start()
        with pytest.raises(TrainingJobError, match=r"cancelled \(SIGTERM\) while waiting for TrainJob"):
            run_trainjob(fake, trainjob_cfg(), timeout=30)
    assert len(fake.deleted) == 1
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the step's own handler is back


def test_trainjob_unknown_runtime_is_a_clear_error_and_creates_nothing():
    with fake_kube() as fake:
        with pytest.raises(
            TrainingJobError, match=r"trainer.runtime: no TrainingRuntime or ClusterTrainingRuntime 'nope'"
        ):
            run_trainjob(fake, trainjob_cfg("trainer.runtime=nope"))
    assert fake.created == []


def write_dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "train.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    (root / "eval.jsonl").write_text('{"query": "q2", "positive": "p2"}\n')
    return root


def job_player(workdir: Path, container_env, seen: dict):
    """Plays a job's node-0 pod: the job's own `stage in`, the checkpoint a training run writes, `stage out`.

    `container_env(body)` picks the container env list out of the created job.
    """
    from vembed.pipeline.launchers.stage import stage_in, stage_out

    def play(body: dict) -> None:
        env = {e["name"]: e["value"] for e in container_env(body) if "value" in e}
        job_config = yaml.safe_load(stage_in(env, workdir=str(workdir)).read_text())
        seen["config"] = job_config
        ckpt = Path(job_config["output_dir"]) / "checkpoint-6"
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_model.safetensors").write_bytes(b"weights")
        (ckpt / "adapter_config.json").write_text("{}")
        history = [{"step": 3, "loss": 2.5}, {"step": 6, "loss": 1.25}]
        (ckpt / "trainer_state.json").write_text(
            json.dumps({"global_step": 6, "epoch": 1, "history": history})
        )
        (ckpt.parent / "training_log.txt").write_text("step 3 loss 2.5\nstep 6 loss 1.25\n")
        stage_out(env, output_dir=job_config["output_dir"])

    return play


def check_round_trip(summary: dict, seen: dict, data_dir: Path, pod_dir: Path, step_out: Path) -> None:
    # The job read its inputs from S3 copies of the step's local files, and wrote locally in its pod.
    assert seen["config"]["data_path"].startswith(str(pod_dir / "inputs"))
    assert Path(seen["config"]["data_path"]).read_text() == (data_dir / "train.jsonl").read_text()
    assert Path(seen["config"]["eval_data_path"]).read_text() == (data_dir / "eval.jsonl").read_text()
    # The step got the final adapter and the log back, and a summary from the job's trainer state.
    final = Path(summary["checkpoint_dir"])
    assert final.name == "checkpoint-6" and final.is_relative_to(step_out)
    assert (final / "adapter_model.safetensors").read_bytes() == b"weights"
    assert Path(summary["log_path"]).read_text().endswith("loss 1.25\n")
    assert (summary["global_step"], summary["final_loss"]) == (6, 1.25)


def test_trainjob_launch_training_publishes_inputs_and_downloads_the_adapter(s3_env, tmp_path):
    """The launcher end to end: local data -> S3, TrainJob, in-job stage in/out, download of the adapter."""
    from vembed.pipeline.steps.launch import inputs_uri, train_via_launcher

    s3_env.client().create_bucket(Bucket="runs")
    data_dir = write_dataset(tmp_path / "dataset")
    cfg = trainjob_cfg(f"data_path={data_dir / 'train.jsonl'}", f"eval_data_path={data_dir / 'eval.jsonl'}")
    output_uri = "s3://runs/run-1/model"
    seen: dict = {}
    with fake_kube(phases=["Running", "Succeeded"], log_lines=["training..."]) as fake:
        fake.on_create = job_player(tmp_path / "pod", lambda body: body["spec"]["trainer"]["env"], seen)
        summary = train_via_launcher(
            cfg, tmp_path / "step-output", output_uri=output_uri,
            client_configuration=fake.configuration(), poll_interval=0.01, log=lambda line: None,
        )  # fmt: skip
    check_round_trip(summary, seen, data_dir, tmp_path / "pod", tmp_path / "step-output")
    assert storage_has(inputs_uri(output_uri))
    assert len(fake.deleted) == 1


def test_a_retried_train_step_downloads_again_without_a_second_job(s3_env, tmp_path, monkeypatch):
    """The job succeeded, then the download of its output hit a transient S3 failure: the step's retry
    (vembed.retry.run_step) downloads again instead of training all over in a second job."""
    from vembed.artifacts import storage
    from vembed.errors import StorageError
    from vembed.pipeline.steps.launch import train_via_launcher
    from vembed.retry import run_step

    s3_env.client().create_bucket(Bucket="runs")
    data_dir = write_dataset(tmp_path / "dataset")
    cfg = trainjob_cfg(f"data_path={data_dir / 'train.jsonl'}", f"eval_data_path={data_dir / 'eval.jsonl'}")
    real_download, attempts = storage.download_dir, []

    def download_fails_once(uri, local_dir, *args, **kwargs):  # fault injection: a blip of the real S3 server
        attempts.append(uri)
        if len(attempts) == 1:
            err = StorageError(f"{uri}: connection reset")
            err.transient = True
            raise err
        return real_download(uri, local_dir, *args, **kwargs)

    monkeypatch.setattr(storage, "download_dir", download_fails_once)
    seen: dict = {}
    with fake_kube(phases=["Running", "Succeeded"], log_lines=["training..."]) as fake:
        fake.on_create = job_player(tmp_path / "pod", lambda body: body["spec"]["trainer"]["env"], seen)
        summary = run_step(
            lambda: train_via_launcher(
                cfg, tmp_path / "step-output", output_uri="s3://runs/run-1/model",
                client_configuration=fake.configuration(), poll_interval=0.01, log=lambda line: None,
            ),  # fmt: skip
            sleep=lambda s: None,
        )
    assert len(fake.created) == 1 and len(attempts) == 2
    check_round_trip(summary, seen, data_dir, tmp_path / "pod", tmp_path / "step-output")


def storage_has(uri: str) -> bool:
    from vembed.artifacts import storage

    return bool(storage.list(uri))


# -- RBAC: every call the SDKs made against the fake cluster must be allowed by pipelines/rbac/


def rbac_rules() -> tuple[list[dict], list[dict]]:
    # The deploy step's Role (deployer.yaml) is checked against its own calls in test_deploy.py.
    files = [f for f in sorted(RBAC_DIR.glob("*.yaml")) if f.name != "deployer.yaml"]
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    namespaced = [r for d in docs if d["kind"] == "Role" for r in d["rules"]]
    cluster = [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"]]
    bound = {d["roleRef"]["name"] for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")}
    assert bound == {d["metadata"]["name"] for d in docs if d["kind"] in ("Role", "ClusterRole")}
    return namespaced, cluster


def required_permission(call: str) -> tuple[bool, str, str, str] | None:
    """'GET /apis/g/v/namespaces/ns/res/name' -> (namespaced, group, resource, verb)."""
    method, path = call.split(" ", 1)
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    namespaced = rest[:1] == ["namespaces"]
    if namespaced:
        if rest[1] == "kubeflow-system":
            return None  # the SDK's optional version probe: it only logs a warning when denied
        rest = rest[2:]
    watch = rest[-1].endswith("?watch")
    rest[-1] = rest[-1].removesuffix("?watch")
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    verb = {"POST": "create", "DELETE": "delete"}.get(method, "get" if len(rest) > 1 else "list")
    return namespaced, group, resource, "watch" if watch else verb


def allowed(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


@pytest.mark.parametrize("outcome", ["Succeeded", "Failed"])
def test_rbac_role_allows_every_trainjob_and_pytorchjob_call(outcome):
    from vembed.pipeline.launchers.pytorchjob import submit_pytorchjob

    namespaced, cluster = rbac_rules()
    calls: list[str] = []
    for backend, submit in (("trainjob", submit_trainjob), ("pytorchjob", submit_pytorchjob)):
        with fake_kube(phases=["Pending", "Running", outcome], log_lines=["x"]) as fake:
            cfg = trainjob_cfg(f"trainer.backend={backend}")
            run = submit(
                cfg, config_yaml="{}", output_uri="s3://b/o", client_configuration=fake.configuration()
            )
            try:
                wait_for_job(run, timeout=60, poll_interval=0.01, log=lambda line: None)
            except TrainingJobError:
                assert outcome == "Failed"
            calls += fake.calls
    needed = {p for p in map(required_permission, calls) if p}
    assert ("pods/log", "get") in {(p[2], p[3]) for p in needed}
    for is_namespaced, group, resource, verb in sorted(needed):
        rules = namespaced if is_namespaced else cluster
        assert allowed(rules, group, resource, verb), f"RBAC misses {verb} {group}/{resource}"
    # ...and grants nothing more: every verb is one of those calls.
    granted = {
        (is_namespaced, group, resource, verb)
        for is_namespaced, rules in ((True, namespaced), (False, cluster))
        for r in rules for group in r["apiGroups"] for resource in r["resources"] for verb in r["verbs"]
    }  # fmt: skip
    assert granted == needed, f"granted but never used: {sorted(granted - needed)}"


def test_rbac_rendered_for_a_namespace_validates_against_the_kubernetes_models(tmp_path, capsys):
    from kubernetes.client import ApiClient

    from pipelines.cli import main
    from pipelines.rbac_render import render_rbac

    out = tmp_path / "rbac.yaml"
    assert main(["rbac", "--namespace", "team-a", "--service-account", "default-editor", "--output", str(out)]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert {d["kind"] for d in docs} == {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    api = ApiClient()
    for doc in docs:
        model = api.deserialize(SimpleNamespace(data=json.dumps(doc)), f"V1{doc['kind']}")
        assert dropped_keys(doc, api.sanitize_for_serialization(model)) == [], doc["kind"]
        if doc["kind"] in ("Role", "RoleBinding"):
            assert doc["metadata"]["namespace"] == "team-a"
        if doc["kind"].endswith("Binding"):
            assert doc["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "team-a"}]
    (crb,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert crb["metadata"]["name"].endswith("-team-a"), "one cluster binding per pipeline namespace"
    # A PyTorchJob-only cluster needs no Trainer rights at all.
    only = render_rbac("team-b", backends=["pytorchjob"])
    assert {d["kind"] for d in only} == {"Role", "RoleBinding"}
    assert "trainer.kubeflow.org" not in json.dumps(only)
    assert main(["rbac", "--namespace", "Team_A"]) == 2
    assert "not a valid Kubernetes name" in capsys.readouterr().err


# -- the pipeline compiled for a cluster backend, and its train component on kfp.local


def compile_for(backend: str, tmp_path: Path, monkeypatch, *extra: str) -> tuple[dict, dict, str]:
    """`vembed pipeline compile --train-backend <backend>` with a credential in the environment."""
    from pipelines.cli import main

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    out = tmp_path / f"{backend}.yaml"
    assert main(["compile", "--train-backend", backend, "--output", str(out), *extra]) == 0
    text = out.read_text()
    spec, platform = yaml.safe_load_all(text)
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], text


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_pipeline_compiled_for_trainjob_or_pytorchjob(backend, tmp_path, monkeypatch):
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    spec, k8s, text = compile_for(
        backend, tmp_path, monkeypatch, "--node-selector", "pool=h100", "--toleration", json.dumps(toleration)
    )
    handler = next(t for n, t in spec["root"]["dag"]["tasks"].items() if n.startswith("exit-handler"))
    train_task = spec["components"][handler["componentRef"]["name"]]["dag"]["tasks"]["train"]
    params = train_task["inputs"]["parameters"]
    # The train task carries the backend; the job image defaults to the train_image run parameter.
    assert params["train_backend"] == {"runtimeValue": {"constant": backend}}
    assert params["job_image"] == {"componentInputParameter": "pipelinechannel--train_image"}
    assert "job_output_uri" not in params  # derived from the model artifact's URI in the pod
    assert "trainer" not in json.dumps(spec["root"]["inputDefinitions"]["parameters"]["config_overrides"])

    # The launcher pod: CPU image, no GPU, small requests and limits of its own; scheduling goes to the
    # job's nodes, and the compile-time train resources reach the job through job_settings.
    comp = spec["components"][train_task["componentRef"]["name"]]
    assert comp["inputDefinitions"]["parameters"]["task_config"]["parameterType"] == "TASK_CONFIG"
    passthroughs = {p["field"]: p.get("applyToTask", False) for p in comp["taskConfigPassthroughs"]}
    assert passthroughs == {
        "RESOURCES": True, "KUBERNETES_NODE_SELECTOR": False, "KUBERNETES_TOLERATIONS": False,
        "KUBERNETES_AFFINITY": False, "ENV": True, "KUBERNETES_VOLUMES": True,
    }  # fmt: skip
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert container["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}"
    assert "accelerator" not in container["resources"]
    assert (container["resources"]["resourceCpuRequest"], container["resources"]["resourceMemoryRequest"]) == ("500m", "2Gi")
    assert (container["resources"]["resourceCpuLimit"], container["resources"]["resourceMemoryLimit"]) == ("1", "4Gi")
    job_settings = params["job_settings"]["runtimeValue"]["constant"]
    assert job_settings["resources"] == {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}}
    assert k8s["exec-train"]["nodeSelector"]["labels"] == {"pool": "h100"}
    assert k8s["exec-train"]["tolerations"] == [toleration]
    # Evaluate and merge still run the train image; nothing else asks for a GPU either.
    images = {n: e["container"]["image"] for n, e in spec["deploymentSpec"]["executors"].items()}
    assert images["exec-evaluate"] == images["exec-merge"] == "{{$.inputs.parameters['pipelinechannel--train_image']}}"
    assert "accelerator" not in text

    # The pod's code hands every input, the task config and job settings included, to the one train body
    # (vembed.pipeline.steps.train.train_component), which gives the job an output next to the model artifact.
    source = " ".join(container["command"])
    assert "task_config: dsl.TaskConfig" in source and "job_settings: dict" in source
    assert "inputs = dict(locals())" in source and "train_component(**inputs)" in source

    # Secrets by name only (run parameters), mounted on the launcher pod and passed on as references.
    (secret,) = k8s["exec-train"]["secretAsEnv"]
    assert secret["secretNameParameter"] == {"componentInputParameter": "pipelinechannel--s3_secret_name"}
    assert {e["envVar"] for e in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert SECRET_VALUE not in text


def test_pipeline_trainjob_backend_option_checks(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main
    from pipelines.lora_finetune import PipelineOptions

    out = tmp_path / "p.yaml"
    assert main(["compile", "--train-backend", "trainjob", "--gpus", "2", "--output", str(out)]) == 2
    assert "trainer.gpus_per_node" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ConfigError, match="train_backend: 'slurm' is not one of local, trainjob, pytorchjob"):
        PipelineOptions(train_backend="slurm")
    assert PipelineOptions.from_env({"VEMBED_TRAIN_BACKEND": "pytorchjob"}).train_backend == "pytorchjob"
    # The default (committed) pipeline keeps training in its own GPU pod, with the config's backend.
    spec, _ = yaml.safe_load_all(Path("pipelines/compiled/lora_finetune.yaml").read_text())
    handler = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert handler["train"]["inputs"]["parameters"]["train_backend"] == {
        "runtimeValue": {"constant": ""}
    }
    assert "taskConfigPassthroughs" not in spec["components"]["comp-train"]


def write_trainjob_yaml(path: Path, trainer: dict) -> Path:
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    return path


def test_trainjob_compiled_backend_fills_only_unset_trainer_keys(tmp_path):
    from vembed.config import parse_overrides
    from vembed.pipeline.steps.train import resolve_config

    def resolve(config_path=None, overrides=(), backend="trainjob", job_image="img:cuda"):
        return resolve_config(config_path, parse_overrides(overrides), backend, job_image)

    cfg = resolve(overrides=["trainer.num_nodes=2"])
    assert (cfg.trainer.backend, cfg.trainer.image, cfg.trainer.num_nodes) == ("trainjob", "img:cuda", 2)
    yaml_cfg = write_trainjob_yaml(tmp_path / "c.yaml", {"image": "mine:1", "gpus_per_node": 8})
    cfg = resolve(yaml_cfg, ["trainer.num_nodes=2"])
    assert (cfg.trainer.backend, cfg.trainer.image, cfg.trainer.gpus_per_node) == ("trainjob", "mine:1", 8)
    # The same backend given explicitly is fine; another one contradicts the compiled pod.
    assert resolve(overrides=["trainer.backend=trainjob"]).trainer.backend == "trainjob"
    with pytest.raises(ConfigError, match=r"trainer.backend is 'local' but this pipeline was compiled with "
                                          r"--train-backend trainjob"):  # fmt: skip
        resolve(overrides=["trainer.backend=local"])
    with pytest.raises(ConfigError, match="trainer.backend is 'pytorchjob'"):
        resolve(write_trainjob_yaml(tmp_path / "p.yaml", {"backend": "pytorchjob", "image": "x"}))
    # Compiled for local (the default pipeline): the config decides, and no job image is filled in.
    cfg = resolve(backend=None)
    assert (cfg.trainer.backend, cfg.trainer.image) == ("local", None)
    assert resolve(overrides=["trainer.backend=pytorchjob"], backend=None).trainer.image == "img:cuda"
    # Dotted keys in a mapping (a Python caller) count as set too.
    cfg = resolve_config(None, {"trainer.num_nodes": 3, "trainer.image": "own:2"}, "pytorchjob", "img:cuda")
    assert (cfg.trainer.backend, cfg.trainer.num_nodes, cfg.trainer.image) == ("pytorchjob", 3, "own:2")


@pytest.mark.parametrize(
    ("artifact", "expected"),
    [
        ("minio://mlpipeline/v2/artifacts/lora-finetune/r1/train/model", "s3://mlpipeline/v2/artifacts/lora-finetune/r1/train/model-job"),
        ("s3://bucket/root/train/model/", "s3://bucket/root/train/model-job"),
        ("/mnt/shared/root/train/model", "/mnt/shared/root/train/model-job"),
    ],
)  # fmt: skip
def test_trainjob_output_uri_sits_next_to_the_model_artifact(artifact, expected):
    from vembed.pipeline.steps.launch import job_output_uri

    assert job_output_uri(artifact) == expected


def test_trainjob_gcs_pipeline_root_is_refused_with_a_pointer(tmp_path):
    from vembed.pipeline.steps.launch import job_output_uri, train_via_launcher

    with pytest.raises(ConfigError, match=r"'gs://b/train/model-job' must be an s3:// URI .*job_output_uri"):
        train_via_launcher(trainjob_cfg(), tmp_path, job_output_uri("gs://b/train/model"))


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom")
def test_trainjob_train_component_on_kfp_local(tmp_path, monkeypatch):
    """The pipeline's train component end to end in a kfp.local subprocess: compiled for trainjob, it
    finds the (fake) cluster through KUBECONFIG, creates a TrainJob whose output is `<model uri>-job`
    (a local path here, as on a shared volume), and hands the job's adapter on as its Model."""
    from kfp import dsl, local

    from components.prepare.component import prepare
    from components.train.component import train_on_cluster

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(8)))

    def train_only(raw_uri: str) -> dsl.Model:
        data = prepare(raw_uri=raw_uri, eval_fraction=0.25)
        return train_on_cluster(
            dataset=data.outputs["dataset"], config_overrides=["trainer.namespace=team-a"],
            train_backend="trainjob", job_image="registry.example/vembed:cuda",
            job_settings={"resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}},
                          "image_pull_secrets": ["regcred"]},
        ).outputs["model"]  # fmt: skip

    # kfp reads annotations as objects; this module's `from __future__ import annotations` made them text.
    train_only.__annotations__ = {"raw_uri": str, "return": dsl.Model}
    pipeline = dsl.pipeline(train_only)

    seen: dict = {}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    with fake_kube(phases=["Succeeded"], log_lines=["training..."]) as fake:
        fake.on_create = job_player(tmp_path / "pod", lambda body: body["spec"]["trainer"]["env"], seen)
        monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        model = pipeline(raw_uri=str(raw)).output

    (body,) = fake.created
    trainer = body["spec"]["trainer"]
    assert body["metadata"]["namespace"] == "team-a" and fake.deleted == [body["metadata"]["name"]]
    assert trainer["image"] == "registry.example/vembed:cuda"  # trainer.image unset: the pipeline's image
    # The compile-time job settings reach the job's nodes (GPU count from trainer.gpus_per_node).
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}
    pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["template"]["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env[OUTPUT_URI_ENV] == f"{model.uri}-job"
    assert yaml.safe_load(env[CONFIG_ENV])["trainer"]["backend"] == "trainjob"
    # The job read prepare's split, published next to its output; the Model is the job's adapter.
    (prepared,) = (tmp_path / "root").glob("*/prepare/dataset")
    for key, name in (("data_path", "train.jsonl"), ("eval_data_path", "eval.jsonl")):
        assert seen["config"][key].startswith(f"{model.uri}-job-inputs/")
        assert Path(seen["config"][key]).read_text() == (prepared / name).read_text()
    assert (Path(model.path) / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (Path(model.path) / "training_log.txt").read_text().endswith("loss 1.25\n")
    assert (model.metadata["global_step"], model.metadata["final_loss"]) == (6, 1.25)
