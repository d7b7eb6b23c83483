"""The `accelerate launch` command lines: for this pod, and for every node of a cluster job."""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from vembed.config import TrainConfig, TrainerOptions
from vembed.errors import ConfigError

ENTRYPOINT_MODULE = "vembed.entrypoints.train"

# Inside a job pod: the config arrives in an env var (it holds no secrets) and is written under
# trainer.work_dir (default JOB_WORKDIR), with the run's local output next to it.
CONFIG_ENV = "VEMBED_CONFIG"
OUTPUT_URI_ENV = "VEMBED_OUTPUT_URI"
JOB_WORKDIR = TrainerOptions.model_fields["work_dir"].default
JOB_CONFIG_PATH = f"{JOB_WORKDIR}/config.yaml"


def job_config_path(work_dir: str) -> str:
    return f"{work_dir}/config.yaml"


def job_output_dir(work_dir: str) -> str:
    return f"{work_dir}/output"


# The FSDP settings (sharding, use_orig_params for LoRA, wrapping, state dict) are the Accelerator's
# plugin in vembed.training.fsdp; the flag only makes accelerate start the processes for FSDP.
FSDP_ARGS = ("--use_fsdp",)


@dataclass(frozen=True)
class Rendezvous:
    """Names of the env vars through which the job controller tells each node where it stands."""

    node_rank: str
    master_addr: str
    master_port: str


# Kubeflow Trainer v2 (torch plugin) and Training Operator v1 set different variables.
TRAINJOB_RENDEZVOUS = Rendezvous("PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
PYTORCHJOB_RENDEZVOUS = Rendezvous("RANK", "MASTER_ADDR", "MASTER_PORT")


def processes_per_node(cfg: TrainConfig) -> int:
    return max(cfg.trainer.gpus_per_node, 1)


def accelerate_args(cfg: TrainConfig, config_path: str, rendezvous: Rendezvous | None = None) -> list[str]:
    """Arguments after `accelerate launch`: one process per GPU on each of num_nodes machines.

    With `rendezvous`, the node rank and master address are `${VAR}` references that the job's
    shell expands on each node.
    """
    t = cfg.trainer
    if t.gpus_per_node == 0 and t.num_nodes > 1:
        raise ConfigError(
            "trainer.gpus_per_node: 0 (CPU) runs on one node only; set num_nodes: 1 or add GPUs"
        )
    nprocs = processes_per_node(cfg) * t.num_nodes
    args = ["--num_processes", str(nprocs), "--num_machines", str(t.num_nodes), "--dynamo_backend", "no"]
    if t.gpus_per_node == 0:
        args.append("--cpu")
    elif cfg.use_fsdp:
        args.extend(FSDP_ARGS)
    elif nprocs > 1:
        args.append("--multi_gpu")
    if t.num_nodes > 1:
        if rendezvous is None:
            raise ConfigError("trainer.num_nodes: more than one node needs backend trainjob or pytorchjob")
        args += [
            "--machine_rank", f"${{{rendezvous.node_rank}}}",
            "--main_process_ip", f"${{{rendezvous.master_addr}}}",
            "--main_process_port", f"${{{rendezvous.master_port}}}",
        ]  # fmt: skip
    return [*args, "--module", ENTRYPOINT_MODULE, config_path]


def _accelerate_binary() -> str:
    """The `accelerate` next to this interpreter, so the launch uses this environment."""
    return shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"


def local_command(cfg: TrainConfig, config_path: str | Path) -> list[str]:
    """`accelerate launch ...` for the GPUs of this pod."""
    return [_accelerate_binary(), "launch", *accelerate_args(cfg, str(config_path))]


def _shell_word(arg: str) -> str:
    # `${VAR}` must stay expandable; everything else is quoted literally.
    if arg.startswith("${") and arg.endswith("}") and arg[2:-1].replace("_", "").isalnum():
        return f'"{arg}"'
    return shlex.quote(arg)


def job_command(cfg: TrainConfig, rendezvous: Rendezvous) -> list[str]:
    """`bash -c` with the script each job node runs: stage inputs in, train, then node 0 publishes the output."""
    launch = " ".join(
        _shell_word(a)
        for a in ["accelerate", "launch", *accelerate_args(cfg, job_config_path(cfg.trainer.work_dir), rendezvous)]
    )
    script = [
        "set -euo pipefail",
        "python -m vembed.pipeline.launchers.stage in",
        launch,
        f'if [ "${{{rendezvous.node_rank}:-0}}" = "0" ]; then python -m vembed.pipeline.launchers.stage out; fi',
    ]
    return ["bash", "-c", "\n".join(script)]
