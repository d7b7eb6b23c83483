"""backend: trainjob — the TrainJob manifest, the wait/stream/fail/timeout loop, RBAC, the pipeline IR.

No Kubernetes API can run here, so the cluster is tests/fake_k8s.py: a loopback HTTP server that
answers the REST calls the kubeflow SDK makes, driven through a real kubernetes.client.Configuration.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from tests.fake_k8s import fake_kube
from vembed.config import TrainConfig, load_config
from vembed.errors import ConfigError
from vembed.launchers.command import CONFIG_ENV, ENTRYPOINT_MODULE, JOB_CONFIG_PATH, OUTPUT_URI_ENV
from vembed.launchers.jobspec import TaskSettings, dropped_keys
from vembed.launchers.trainjob import build_trainjob, submit_trainjob
from vembed.launchers.wait import TrainingJobError, wait_for_job

RBAC_DIR = Path(__file__).parent.parent / "pipelines" / "rbac"
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
    assert script.splitlines()[1] == "python -m vembed.launchers.stage in"
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


def test_trainjob_single_node_cpu_manifest_has_no_gpu_or_rendezvous():
    cfg = load_config(None, ["trainer.backend=trainjob", "trainer.image=img", "trainer.gpus_per_node=0"])
    manifest = build_trainjob(cfg, name="cpu", config_yaml="{}", output_uri="s3://b/o", environ={}).to_dict()
    trainer = manifest["spec"]["trainer"]
    assert "resourcesPerNode" not in trainer and "runtimePatches" not in manifest["spec"]
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
    from vembed.launchers.stage import stage_in, stage_out

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
    from vembed.steps.launch import inputs_uri, train_via_launcher

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


def storage_has(uri: str) -> bool:
    from vembed import storage

    return bool(storage.list(uri))


# -- RBAC: every call the SDKs made against the fake cluster must be allowed by pipelines/rbac/


def rbac_rules() -> tuple[list[dict], list[dict]]:
    docs = [d for f in sorted(RBAC_DIR.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
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
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    verb = {"POST": "create", "DELETE": "delete"}.get(method, "get" if len(rest) > 1 else "list")
    return namespaced, group, resource, verb


def allowed(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


@pytest.mark.parametrize("outcome", ["Succeeded", "Failed"])
def test_rbac_role_allows_every_trainjob_and_pytorchjob_call(outcome):
    from vembed.launchers.pytorchjob import submit_pytorchjob

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


# -- the pipeline carries a trainjob config to the train step


def test_pipeline_compiles_with_trainjob_backend(tmp_path):
    from kfp import compiler

    from pipelines.lora_finetune import build_pipeline

    overrides = [*OVERRIDES, "trainer.namespace=team-a"]
    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(
        build_pipeline(), package_path=str(path), pipeline_parameters={"config_overrides": overrides}
    )
    ir_text = path.read_text()
    ir = yaml.safe_load(ir_text.split("\n---\n")[0])
    param = ir["root"]["inputDefinitions"]["parameters"]["config_overrides"]
    assert param["defaultValue"] == overrides
    train_task = ir["root"]["dag"]["tasks"]["train"]
    assert train_task["inputs"]["parameters"]["config_overrides"] == {
        "componentInputParameter": "config_overrides"
    }
    # What the train step will receive resolves to a valid trainjob config whose TrainJob builds.
    cfg = load_config(None, param["defaultValue"])
    assert cfg.trainer.backend == "trainjob" and cfg.trainer.num_nodes == 2
    build_trainjob(cfg, name="from-ir", config_yaml=cfg.to_yaml(), output_uri="s3://b/o", environ={})
    # Secrets travel by name only.
    assert "vembed-s3/secret-key" in ir_text and SECRET_VALUE not in ir_text
