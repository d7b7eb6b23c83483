"""The cluster job's own script, run for real once: stage in -> accelerate launch -> stage out.

The Kubernetes API is tests/support/fake_k8s.py (no API server can run here). When the TrainJob is created,
this test plays the node-0 pod the way the cluster would start it: the container's env as the kubelet
resolves it (values, plus `secretKeyRef`s read from a Secret), the `PET_*` variables that Kubeflow
Trainer's torch plugin injects, and the container command (`bash -c <job script>`) executed by bash.
Storage is moto's S3 server on loopback, training is two steps on a tiny random BERT, on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port, write_pairs
from tests.support.fake_k8s import fake_kube
from vembed.config import load_config

ROOT = Path(__file__).resolve().parents[2]
POD_TIMEOUT_S = 600


def kubelet_env(container_env: list[dict], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's env as the kubelet hands it to the process: plain values and secret references."""
    env = {}
    for e in container_env:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def trainer_env(trainer: dict, node_rank: int, master_port: int) -> dict[str, str]:
    """What Kubeflow Trainer's torch plugin sets in every node (MASTER_ADDR is node 0's headless-Service
    name on a cluster; loopback here)."""
    return {
        "PET_NNODES": str(trainer.get("numNodes", 1)),
        "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", 1)),
        "PET_NODE_RANK": str(node_rank),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(master_port),
    }


def image_env() -> dict[str, str]:
    """What the training image provides: this interpreter's `python`/`accelerate` first on PATH, this
    checkout importable, no network for models. No credentials: those come only from the Secret."""
    keep = ("HOME", "LANG", "TMPDIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def node0_pod(secrets: dict[str, dict[str, str]], pod: dict):
    """fake_kube's on_create: run the created TrainJob's node-0 container command for real."""

    def run(body: dict) -> None:
        trainer = body["spec"]["trainer"]
        env = {**image_env(), **kubelet_env(trainer["env"], secrets), **trainer_env(trainer, 0, free_port())}
        proc = subprocess.run(trainer["command"], env=env, capture_output=True, text=True, timeout=POD_TIMEOUT_S)
        pod.update(env=env, returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
        if proc.returncode:  # the job fails with the container's last words as its reason
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")

    return run


@pytest.mark.slow
def test_job_script_trains_for_real_between_stage_in_and_stage_out(s3_env, tiny_bert, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    from vembed.artifacts import storage
    from vembed.inference.predictor import Predictor
    from vembed.pipeline.steps.launch import train_via_launcher

    s3_env.client().create_bucket(Bucket="runs")
    secrets = {"vembed-s3": {"access-key": s3_env.access_key, "secret-key": s3_env.secret_key}}
    (tmp_path / "dataset").mkdir()
    data = write_pairs(tmp_path / "dataset" / "train.jsonl", n=16)
    work_dir = tmp_path / "pod"
    cfg = load_config(None, [
        "trainer.backend=trainjob", "trainer.image=registry.example/vembed-train:cpu", "trainer.gpus_per_node=0",
        "trainer.env_from_secrets={AWS_ACCESS_KEY_ID: vembed-s3/access-key, AWS_SECRET_ACCESS_KEY: vembed-s3/secret-key}",
        f"trainer.work_dir={work_dir}", f"model_name={tiny_bert}", f"data_path={data}",
        "max_steps=2", "batch_size=8", "logging_steps=1", "max_seq_length=32", "lora_r=4", "learning_rate=1e-2",
        "lora_target_modules=[query,value]",
    ])  # fmt: skip
    output_uri = "s3://runs/run-1/model"
    pod: dict = {}
    with fake_kube(phases=["Running", "Succeeded"], log_lines=["training..."]) as fake:
        fake.on_create = node0_pod(secrets, pod)
        summary = train_via_launcher(
            cfg, tmp_path / "step", output_uri=output_uri,
            client_configuration=fake.configuration(), poll_interval=0.01, log=lambda line: None,
        )  # fmt: skip
    assert pod["returncode"] == 0, pod["stderr"][-3000:]
    assert pod["env"]["PET_NODE_RANK"] == "0" and pod["env"]["PET_NNODES"] == "1"
    assert pod["env"]["AWS_SECRET_ACCESS_KEY"] == s3_env.secret_key  # from the Secret, by reference

    # stage in: the config under trainer.work_dir, data downloaded from the job's S3 inputs, local output.
    job_cfg = load_config(work_dir / "config.yaml")
    assert Path(job_cfg.data_path).is_relative_to(work_dir / "inputs")
    assert Path(job_cfg.data_path).read_text() == Path(data).read_text()
    assert job_cfg.output_dir == str(work_dir / "output")
    # accelerate launch trained two steps there; stage out (node 0) published the final checkpoint.
    assert (work_dir / "output" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert f"published checkpoint-2 to {output_uri}" in pod["stdout"]
    assert storage.exists(storage.join(output_uri, storage.MANIFEST))

    # What came back to the step is the real adapter: it loads, it moved, and it changes the embeddings.
    final = Path(summary["checkpoint_dir"])
    assert final.name == "checkpoint-2" and summary["global_step"] == 2
    steps = [ln for ln in Path(summary["log_path"]).read_text().splitlines() if ln.startswith("step=")]
    assert [ln.split()[0] for ln in steps] == ["step=1", "step=2"]
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(final))
    assert any("lora_B" in name for name, _ in peft.named_parameters())
    lora_b = [t for k, t in load_file(str(final / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(t) > 0 for t in lora_b), "LoRA B starts at zero; training moved it"
    texts = ["alpha beta gamma", "about gamma and beta and alpha"]
    assert not np.allclose(Predictor(str(final)).encode_text(texts), Predictor(tiny_bert).encode_text(texts), atol=1e-4)
