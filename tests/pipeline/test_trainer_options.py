"""The `trainer` config section (nested keys, overrides, validation) and the local `accelerate launch` command."""

from __future__ import annotations

from pathlib import Path

import pytest

from vembed.config import TrainerOptions, load_config
from vembed.errors import ConfigError
from vembed.pipeline.launchers.command import ENTRYPOINT_MODULE, local_command

SECRET = "AKIA-looks-like-a-real-secret"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_train_locally_on_one_gpu():
    t = load_config(None).trainer
    assert t == TrainerOptions()
    assert (t.backend, t.num_nodes, t.gpus_per_node, t.runtime, t.keep_job) == (
        "local",
        1,
        1,
        "torch-distributed",
        False,
    )


def test_trainer_section_from_yaml(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            "trainer:\n  backend: trainjob\n  image: img:1\n  num_nodes: 4\n  gpus_per_node: 8\n"
            "  resources: {cpu: 32, memory: 512Gi, ephemeral: 100Gi}\n"
            "  tolerations: [{key: nvidia.com/gpu, operator: Exists}]\n"
            "  env_from_secrets: {HF_TOKEN: hf/token}\n",
        )
    )
    t = cfg.trainer
    assert (t.backend, t.image, t.num_nodes, t.gpus_per_node) == ("trainjob", "img:1", 4, 8)
    assert t.resources == {"cpu": "32", "memory": "512Gi", "ephemeral-storage": "100Gi"}
    assert t.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert t.env_from_secrets == {"HF_TOKEN": "hf/token"}


@pytest.mark.parametrize(
    ("pair", "attr", "expected"),
    [
        ("trainer.num_nodes=2", "num_nodes", 2),
        ("trainer.timeout=3600", "timeout", 3600),
        ("trainer.keep_job=true", "keep_job", True),
        ("trainer.namespace=null", "namespace", None),
        ("trainer.node_selector={pool: gpu-a100}", "node_selector", {"pool": "gpu-a100"}),
        ("trainer.resources={memory: 64Gi}", "resources", {"memory": "64Gi"}),
        (
            "trainer.tolerations=[{key: gpu, operator: Equal, value: 'true', effect: NoSchedule}]",
            "tolerations",
            [{"key": "gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
        ),
    ],
)
def test_dotted_override_coercion(pair, attr, expected):
    base = ["trainer.backend=pytorchjob", "trainer.image=img"]
    value = getattr(load_config(None, [*base, pair]).trainer, attr)
    assert value == expected and type(value) is type(expected)


def test_dotted_override_merges_into_the_yaml_section(tmp_path):
    p = write(tmp_path, "lora_r: 8\ntrainer:\n  backend: trainjob\n  image: img:1\n  gpus_per_node: 8\n")
    cfg = load_config(p, ["trainer.num_nodes=2", "lora_r=4"])
    assert (cfg.trainer.backend, cfg.trainer.image, cfg.trainer.gpus_per_node) == ("trainjob", "img:1", 8)
    assert (cfg.trainer.num_nodes, cfg.lora_r) == (2, 4)


def test_mapping_overrides_accept_dotted_keys():
    cfg = load_config(None, {"trainer.backend": "trainjob", "trainer.image": "img", "trainer.num_nodes": 3})
    assert (cfg.trainer.backend, cfg.trainer.num_nodes) == ("trainjob", 3)


def test_whole_section_override():
    cfg = load_config(None, ["trainer={backend: pytorchjob, image: img, num_nodes: 2}"])
    assert (cfg.trainer.backend, cfg.trainer.num_nodes) == ("pytorchjob", 2)


def test_unknown_nested_key_in_override_suggests():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'trainer\.num_nodez'; did you mean trainer\.num_nodes\?"
    ):
        load_config(None, ["trainer.num_nodez=2"])


def test_unknown_nested_key_in_yaml_suggests(tmp_path):
    p = write(tmp_path, "trainer:\n  gpus_per_nod: 4\n")
    with pytest.raises(
        ConfigError,
        match=r"c\.yaml: unknown config key 'trainer\.gpus_per_nod'; did you mean trainer\.gpus_per_node\?",
    ):
        load_config(p)


def test_unknown_section_suggests_the_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainr\.num_nodes'; did you mean trainer\?"):
        load_config(None, ["trainr.num_nodes=2"])


def test_dotted_key_on_a_plain_field_is_unknown():
    with pytest.raises(ConfigError, match=r"unknown config key 'lora_r\.x'"):
        load_config(None, ["lora_r.x=1"])


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (
            ["trainer.num_nodes=2"],
            r"trainer: num_nodes: more than one node needs backend trainjob or pytorchjob",
        ),
        (["trainer.backend=trainjob"], r"trainer: image: backend trainjob needs the training image"),
        (["trainer.backend=slurm"], r"trainer\.backend: Input should be 'local', 'trainjob' or 'pytorchjob'"),
        (["trainer.num_nodes=0"], r"trainer\.num_nodes"),
        (["trainer.timeout=0"], r"trainer\.timeout"),
        (["trainer.resources={gpu: 1}"], r"unknown resource 'gpu'.*GPUs come from gpus_per_node"),
        (["trainer.resources={memory: lots}"], r"memory: 'lots' is not a Kubernetes quantity"),
        (["trainer.env_from_secrets={1BAD: s/k}"], r"'1BAD' is not a valid environment variable name"),
        (["trainer.node_selector=[a, b]"], r"trainer\.node_selector"),
        (["trainer.tolerations={bad: yaml"], r"trainer\.tolerations: invalid YAML value"),
    ],
    ids=[
        "local-multinode", "no-image", "bad-backend", "zero-nodes", "zero-timeout",
        "gpu-resource", "bad-quantity", "bad-env-name", "selector-not-map", "bad-yaml",
    ],  # fmt: skip
)
def test_invalid_trainer_options_name_the_key(pairs, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, pairs)


def test_a_secret_value_pasted_into_env_from_secrets_is_refused_without_echo():
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"trainer.env_from_secrets={{AWS_SECRET_ACCESS_KEY: {SECRET}}}"])
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value) and "secret-name/key" in str(err.value)
    assert SECRET not in str(err.value)


def test_trainer_options_round_trip_through_yaml(tmp_path):
    cfg = load_config(
        None, ["trainer.backend=trainjob", "trainer.image=img", "trainer.env_from_secrets={A: s/k}"]
    )
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


# -- backend: local


def parse(cmd: list[str]):
    from accelerate.commands.launch import launch_command_parser

    assert Path(cmd[0]).name == "accelerate" and cmd[1] == "launch"
    return launch_command_parser().parse_args(cmd[2:])


def test_local_command_one_process_per_gpu():
    cmd = local_command(load_config(None, ["trainer.gpus_per_node=4"]), "/tmp/c.yaml")
    args = parse(cmd)
    assert (args.num_processes, args.num_machines, args.multi_gpu, args.use_fsdp) == (4, 1, True, False)
    assert (
        args.module
        and args.training_script == ENTRYPOINT_MODULE
        and args.training_script_args == ["/tmp/c.yaml"]
    )


def test_local_command_with_fsdp():
    args = parse(local_command(load_config(None, ["trainer.gpus_per_node=8", "use_fsdp=true"]), "c.yaml"))
    assert args.use_fsdp and not args.multi_gpu and args.num_processes == 8


def test_local_command_single_gpu_and_cpu():
    one = parse(local_command(load_config(None), "c.yaml"))
    assert (one.num_processes, one.multi_gpu, one.cpu) == (1, False, False)
    cpu = parse(local_command(load_config(None, ["trainer.gpus_per_node=0"]), "c.yaml"))
    assert (cpu.num_processes, cpu.cpu) == (1, True)


def test_local_command_uses_the_accelerate_of_this_environment():
    import sys

    cmd = local_command(load_config(None), "c.yaml")
    assert Path(cmd[0]).parent == Path(sys.executable).parent


def test_cpu_jobs_cannot_span_nodes():
    cfg = load_config(
        None,
        ["trainer.backend=trainjob", "trainer.image=i", "trainer.gpus_per_node=0", "trainer.num_nodes=2"],
    )
    with pytest.raises(ConfigError, match="gpus_per_node: 0"):
        local_command(cfg, "c.yaml")


def test_run_local_failure_is_one_line(tmp_path, monkeypatch):
    """A failing launch surfaces as one TrainingJobError line (a stand-in `accelerate` that exits 3)."""
    from vembed.pipeline.launchers import command
    from vembed.pipeline.launchers.local import run_local
    from vembed.pipeline.launchers.wait import TrainingJobError

    fake = tmp_path / "accelerate"
    fake.write_text('#!/bin/sh\necho "launching $*"\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setattr(command, "_accelerate_binary", lambda: str(fake))
    with pytest.raises(
        TrainingJobError, match=r"^accelerate launch exited with code 3; the training log above says why$"
    ):
        run_local(load_config(None), tmp_path / "c.yaml")
