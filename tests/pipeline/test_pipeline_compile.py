"""The compiled `lora-finetune` pipeline: freshness of the committed YAML and what a cluster will run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.cli import main
from pipelines.compile import COMPILED_PATH, compile_pipeline
from pipelines.lora_finetune import PipelineOptions

STEP_COMPONENTS = {"prepare", "train", "evaluate", "merge", "register", "on-exit", "deploy"}


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def committed() -> tuple[dict[str, Any], dict[str, Any]]:
    return load(COMPILED_PATH)


def all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task of every DAG (root and condition branches), by task name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def executor_of(spec: dict[str, Any], task: dict[str, Any]) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


def test_committed_yaml_is_up_to_date(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "lora_finetune.yaml", PipelineOptions())
    assert fresh.read_text() == COMPILED_PATH.read_text(), (
        "pipelines/compiled/lora_finetune.yaml is stale: run `make compile` and commit the result"
    )


def test_cli_compile_defaults_ignores_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEMBED_GPUS", "4")
    monkeypatch.setenv("VEMBED_IMAGE", "registry.example/other:1")
    out = tmp_path / "p.yaml"
    assert main(["compile", "--defaults", "--output", str(out)]) == 0
    assert out.read_text() == COMPILED_PATH.read_text()


def test_compile_to_a_directory_is_one_line_and_leaves_nothing(tmp_path: Path, capsys) -> None:
    target = tmp_path / "compiled"
    target.mkdir()
    assert main(["compile", "--output", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {target}: is a directory; give a file name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compiled"] and not any(target.iterdir())


def test_six_steps_in_order(committed) -> None:
    spec, _ = committed
    tasks = all_tasks(spec)
    step_tasks = {n: t for n, t in tasks.items() if "executorLabel" in spec["components"][t["componentRef"]["name"]]}
    assert {t["componentRef"]["name"].removeprefix("comp-").rstrip("-0123456789") for t in step_tasks.values()} == (
        STEP_COMPONENTS
    )
    root = all_tasks(spec)
    assert "dependentTasks" not in root["prepare"]
    assert root["train"]["dependentTasks"] == ["prepare"]
    assert set(root["evaluate"]["dependentTasks"]) == {"prepare", "train"}
    assert root["merge"]["dependentTasks"] == ["train"]
    # Register runs after evaluate and merge, inside the gate's branches.
    gate = next(t for n, t in root.items() if n.startswith("condition-branches"))
    assert {"evaluate", "merge"} <= set(gate["dependentTasks"])


def test_deploy_runs_after_register_champion_in_the_promotion_branch(committed) -> None:
    spec, _ = committed
    comps = spec["components"]
    def names(comp: dict[str, Any]) -> dict[str, str]:  # display name -> task key
        return {t["taskInfo"]["name"]: k for k, t in comp.get("dag", {}).get("tasks", {}).items()}

    passed = next(c for n, c in comps.items() if n.startswith("comp-condition") and "register-champion" in names(c))
    held = next(c for n, c in comps.items() if n.startswith("comp-condition") and "register-challenger" in names(c))
    inner = passed["dag"]["tasks"][names(passed)["deploy-enabled"]]
    assert inner["dependentTasks"] == [names(passed)["register-champion"]]
    assert inner["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--deploy'] == true"
    branch = comps[inner["componentRef"]["name"]]["dag"]["tasks"]
    assert list(names(comps[inner["componentRef"]["name"]])) == ["deploy"]
    reg = branch["deploy"]["inputs"]["parameters"]["registration"]
    assert reg["componentInputParameter"].endswith("-Output") and "register" in reg["componentInputParameter"]
    assert not any("deploy" in n for n in names(held))  # a held model is never served
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["deploy"]["defaultValue"] is True and params["canary_traffic_percent"]["defaultValue"] == 100


def test_promotion_is_gated_on_the_evaluate_decision(committed) -> None:
    spec, _ = committed
    branches = next(c for n, c in spec["components"].items() if n.startswith("comp-condition-branches"))
    conditions = {t["taskInfo"]["name"]: t["triggerPolicy"]["condition"] for t in branches["dag"]["tasks"].values()}
    decision = "inputs.parameter_values['pipelinechannel--evaluate-decision'] == 'promote'"
    assert conditions == {"gate-passed": decision, "gate-held": f"!({decision})"}
    registers = {
        t["taskInfo"]["name"]: t["inputs"]["parameters"]["promote"]["runtimeValue"]["constant"]
        for t in all_tasks(spec).values()
        if t["componentRef"]["name"].startswith("comp-register")
    }
    assert registers == {"register-champion": True, "register-challenger": False}


def test_resources_retries_and_caching(committed) -> None:
    spec, _ = committed
    executors = spec["deploymentSpec"]["executors"]
    for name, task in all_tasks(spec).items():
        if "executorLabel" not in spec["components"][task["componentRef"]["name"]]:
            continue
        res = executors[executor_of(spec, task)]["container"]["resources"]
        assert res.get("resourceCpuRequest") and res.get("resourceMemoryRequest"), f"{name} has no requests"
        assert res.get("resourceCpuLimit") and res.get("resourceMemoryLimit"), f"{name} has no limits"
        assert res["memoryLimit"] >= res["memoryRequest"] and res["cpuLimit"] >= res["cpuRequest"], name
        has_gpu = "accelerator" in res
        assert has_gpu == (name == "train"), f"{name}: only train asks for a GPU"
        retries = task.get("retryPolicy", {}).get("maxRetryCount", 0)
        # Permanent errors must not be retried, and KFP cannot tell them apart: the steps retry
        # transient failures themselves (vembed.retry), so no task has a KFP retry policy.
        assert retries == 0, f"{name}: retry policy"
    train_res = executors["exec-train"]["container"]["resources"]
    assert train_res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train_res["accelerator"]["resourceCount"] == "1"
    root = all_tasks(spec)
    assert not root["train"].get("cachingOptions", {}).get("enableCache"), "train must not be cached by default"


def test_images_are_run_parameters(committed) -> None:
    spec, _ = committed
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["image"]["defaultValue"].endswith("-cpu")
    assert params["train_image"]["defaultValue"].endswith("-cuda")
    images = {n: e["container"]["image"] for n, e in spec["deploymentSpec"]["executors"].items()}
    assert images["exec-train"] == "{{$.inputs.parameters['pipelinechannel--train_image']}}"
    assert images["exec-prepare"] == "{{$.inputs.parameters['pipelinechannel--image']}}"


def test_components_install_nothing_at_run_time(committed) -> None:
    spec, _ = committed
    for name, executor in spec["deploymentSpec"]["executors"].items():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command, f"{name} would pip-install at run time"
        assert "from vembed.pipeline.steps" in command, f"{name} must be a thin shell over vembed.pipeline.steps"


def test_secrets_by_name_shm_and_no_credentials(committed) -> None:
    spec, k8s = committed
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["s3_secret_name"]["parameterType"] == "STRING"
    assert params["mlflow_secret_name"]["parameterType"] == "STRING"
    for executor in ("exec-prepare", "exec-train", "exec-evaluate", "exec-register", "exec-register-2"):
        refs = k8s[executor]["secretAsEnv"]
        names = {r["secretNameParameter"]["componentInputParameter"].removeprefix("pipelinechannel--") for r in refs}
        assert "s3_secret_name" in names, executor
        assert all("secretName" not in r for r in refs), "secret names must be parameters, not literals"
        env = {m["envVar"] for r in refs for m in r["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    assert "secretAsEnv" not in k8s.get("exec-merge", {}), "merge touches no remote store"
    for executor in ("exec-train", "exec-evaluate"):
        (shm,) = k8s[executor]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"


def test_no_credential_value_reaches_the_compiled_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {
        "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYFORTEST42",
        "AWS_SECRET_ACCESS_KEY": "fake-secret-value-9f8e7d6c5b4a",
        "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-1234",
        "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-5678",
        "KFP_TOKEN": "fake-kfp-token-abcdef",
        "HF_TOKEN": "hf_fakefakefakefakefake",
    }
    for key, value in fake.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out)]) == 0
    text = out.read_text()
    leaked = [k for k, v in fake.items() if v in text]
    assert not leaked, f"credential values in the compiled pipeline: {leaked}"


def test_cluster_options(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    rc = main([
        "compile", "--output", str(out), "--gpus", "2", "--gpu-type", "nvidia.com/mig-3g.40gb",
        "--node-selector", "pool=a100", "--toleration", '{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}',
        "--model-cache-pvc", "hf-cache", "--image", "registry.example/vembed:9-cpu",
    ])  # fmt: skip
    assert rc == 0
    spec, k8s = load(out)
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]
    assert (res["resourceType"], res["resourceCount"]) == ("nvidia.com/mig-3g.40gb", "2")
    assert k8s["exec-train"]["nodeSelector"]["labels"] == {"pool": "a100"}
    assert k8s["exec-train"]["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for executor in ("exec-train", "exec-evaluate", "exec-merge"):
        (pvc,) = k8s[executor]["pvcMount"]
        assert pvc["mountPath"] == "/model-cache" and pvc["pvcNameParameter"]["runtimeValue"]["constant"] == "hf-cache"
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == "registry.example/vembed:9-cpu"


def test_local_compile_has_no_gpu_request(tmp_path: Path) -> None:
    spec, _ = load(compile_pipeline(tmp_path / "p.yaml", PipelineOptions(accelerator_limit=0)))
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]


def test_every_component_has_a_readme_and_typed_artifacts() -> None:
    from components.evaluate.component import evaluate
    from components.merge.component import merge
    from components.prepare.component import prepare
    from components.register.component import register
    from components.train.component import train

    root = Path(__file__).resolve().parents[2] / "components"
    for step in STEP_COMPONENTS:
        readme = root / step.replace("-", "_") / "README.md"
        assert readme.is_file(), f"components/{step}/README.md missing"
        text = readme.read_text()
        assert all(h in text for h in ("Inputs", "Outputs", "Example")), f"{readme}: needs inputs, outputs, example"

    def types(comp, side: str) -> dict[str, str]:
        return {k: v.type for k, v in (getattr(comp.component_spec, side) or {}).items()}

    assert types(prepare, "outputs")["dataset"] == "system.Dataset@0.0.1"
    assert types(train, "inputs")["dataset"] == "system.Dataset@0.0.1"
    assert types(train, "outputs")["model"] == "system.Model@0.0.1"
    assert types(train, "outputs")["report"] == "system.HTML@0.0.1"
    assert types(evaluate, "outputs")["metrics"] == "system.Metrics@0.0.1"
    assert types(evaluate, "outputs")["report"] == "system.Markdown@0.0.1"
    assert types(evaluate, "outputs")["decision"] == "String"
    assert types(merge, "outputs")["merged_model"] == "system.Model@0.0.1"
    assert types(register, "inputs")["metrics"] == "system.Metrics@0.0.1"


def test_component_base_image_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import components.prepare.component as prepare_module
    import components.settings as settings

    monkeypatch.setenv("VEMBED_IMAGE", "registry.example/team/vembed:7-cpu")
    try:
        importlib.reload(settings)
        reloaded = importlib.reload(prepare_module)
        image = reloaded.prepare.component_spec.implementation.container.image
        assert image == "registry.example/team/vembed:7-cpu"
    finally:
        monkeypatch.delenv("VEMBED_IMAGE")
        importlib.reload(settings)
        importlib.reload(prepare_module)


def test_every_pod_runs_as_the_images_non_root_user(committed) -> None:
    spec, k8s = committed
    for executor in spec["deploymentSpec"]["executors"]:
        ctx = k8s[executor]["securityContext"]
        assert ctx == {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}, executor
        assert "imagePullSecret" not in k8s[executor], "no pull secret unless one is given"


def test_exit_handler_wraps_every_step_and_cleans_up(committed) -> None:
    spec, k8s = committed
    root = spec["root"]["dag"]["tasks"]
    (handler_name,) = [n for n in root if n.startswith("exit-handler")]
    exit_task = root["on-exit"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert exit_task["dependentTasks"] == [handler_name]
    inputs = exit_task["inputs"]["parameters"]
    assert inputs["status"] == {"taskFinalStatus": {"producerTask": handler_name}}
    assert inputs["pipeline_root"]["runtimeValue"]["constant"] == "{{$.pipeline_root}}"
    assert inputs["pipeline_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert inputs["pipeline_name"]["runtimeValue"]["constant"] == "lora-finetune"
    # Every step runs inside the handler's DAG (or the gate's branches below it).
    inner = spec["components"][root[handler_name]["componentRef"]["name"]]["dag"]["tasks"]
    assert {"prepare", "train", "evaluate", "merge"} <= set(inner)
    # It needs the S3 and (optional) MLflow credentials, never caches, and is a thin shell over vembed.
    refs = k8s["exec-on-exit"]["secretAsEnv"]
    assert {r["secretNameParameter"]["componentInputParameter"] for r in refs} == {"s3_secret_name", "mlflow_secret_name"}
    assert not exit_task["cachingOptions"].get("enableCache")
    assert "from vembed.pipeline.steps.finalize" in " ".join(spec["deploymentSpec"]["executors"]["exec-on-exit"]["container"]["command"])


def test_default_compile_needs_no_task_config(committed) -> None:
    """TASK_CONFIG parameters need a KFP 2.15 backend; the default (local train) variant has none."""
    assert "TASK_CONFIG" not in COMPILED_PATH.read_text()
    spec, _ = committed
    assert "taskConfigPassthroughs" not in spec["components"]["comp-train"]


def test_local_compile_keeps_pipeline_outputs_without_exit_handler(tmp_path: Path) -> None:
    spec, _ = load(compile_pipeline(tmp_path / "p.yaml", PipelineOptions(accelerator_limit=0, exit_handler=False)))
    assert "on-exit" not in spec["root"]["dag"]["tasks"]
    assert set(spec["root"]["outputDefinitions"]["artifacts"]) | set(spec["root"]["outputDefinitions"]["parameters"]) == {
        "registration", "metrics_report",
    }  # fmt: skip


def test_evaluate_gpu_pull_secrets_and_digest_images(tmp_path: Path) -> None:
    digest = "registry.example/team/vembed@sha256:" + "ab" * 32
    out = tmp_path / "p.yaml"
    rc = main([
        "compile", "--output", str(out), "--evaluate-gpus", "1", "--image-pull-secret", "regcred",
        "--image-pull-secret", "mirror", "--train-image", digest,
    ])  # fmt: skip
    assert rc == 0
    spec, k8s = load(out)
    res = spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]["accelerator"]
    assert (res["resourceType"], res["resourceCount"]) == ("nvidia.com/gpu", "1")
    for executor in spec["deploymentSpec"]["executors"]:
        assert [s["secretName"] for s in k8s[executor]["imagePullSecret"]] == ["regcred", "mirror"], executor
    assert spec["root"]["inputDefinitions"]["parameters"]["train_image"]["defaultValue"] == digest


@pytest.mark.parametrize("image", ["Registry/UPPER:1", "repo@sha256:short", "repo:tag with space"])
def test_bad_image_reference_is_a_one_line_error(tmp_path: Path, capsys, image: str) -> None:
    assert main(["compile", "--output", str(tmp_path / "p.yaml"), "--image", image]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an image reference" in err and len(err.splitlines()) == 1


def test_a_step_added_without_settings_still_gets_limits_and_security(tmp_path: Path) -> None:
    """harden_tasks covers every task of the pipeline, so a step added later (e.g. deploy) is not missed."""
    from kfp import compiler, dsl

    from components.merge.component import merge
    from pipelines.lora_finetune import PipelineOptions, harden_tasks

    def extra(model_uri: str):
        model = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model)
        merge(model=model.output)  # no resources set
        harden_tasks(PipelineOptions(image_pull_secrets=["regcred"]))

    extra.__annotations__ = {"model_uri": str}  # this module's future import made them text
    out = tmp_path / "extra.yaml"
    compiler.Compiler().compile(dsl.pipeline(name="extra")(extra), str(out))
    spec, k8s = load(out)
    res = spec["deploymentSpec"]["executors"]["exec-merge"]["container"]["resources"]
    assert (res["resourceCpuLimit"], res["resourceMemoryLimit"]) == ("1", "2Gi")
    assert k8s["exec-merge"]["securityContext"]["runAsNonRoot"] is True
    assert [s["secretName"] for s in k8s["exec-merge"]["imagePullSecret"]] == ["regcred"]
    assert "exec-importer" not in k8s, "an importer has no pod of its own"
