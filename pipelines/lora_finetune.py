"""The `lora-finetune` Kubeflow pipeline: prepare -> train -> evaluate -> merge -> register -> deploy,
then on-exit.

Run parameters (set per run in the KFP UI, `vembed pipeline submit --param k=v`, or a schedule) are the
arguments of the pipeline function below. Cluster layout that rarely changes is fixed at compile time by
`PipelineOptions` (flags of `vembed pipeline compile`, or `VEMBED_*` environment variables): GPU type and
count, resource requests, node selector, tolerations, the model-cache PVC and the train backend.

With `train_backend` trainjob / pytorchjob (docs/multinode.md) the train task only launches a cluster job:
its pod runs the CPU image without a GPU, and the task's resources, node selector and tolerations pass
through to the job's nodes instead (`components.train.component.train_on_cluster`).

Promotion is explicit in the DAG: evaluate outputs `decision`, and a `dsl.If` / `dsl.Else` pair runs the
register component either with `promote=True` (new version gets `challenger` and `champion`) or with
`promote=False` (new version gets `challenger` only). Every trained model is registered, so a held model
can still be inspected and promoted by hand (`vembed registry promote`). In the promote branch, with
`deploy` on (the default), the deploy component then serves the new champion as a KServe
InferenceService (`components/deploy`, RBAC in `pipelines/rbac/deployer.yaml`).

Every pod gets CPU/memory requests and limits, the image's non-root user, and the compile-time image
pull secrets (`harden_tasks`). An exit handler (`components/on_exit`) runs after every run: it deletes
the cluster job's `-job` copies and, when the run failed, tags its MLflow run with the failed task and
reason. Version floors (KFP backend, Trainer, ...) are in docs/compatibility.md.

Credentials never appear here: S3 and MLflow credentials come from Kubernetes secrets whose *names* are run
parameters (`s3_secret_name`, `mlflow_secret_name`), mounted as environment variables.
"""

import contextlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Markdown

from components.deploy.component import deploy as deploy_component
from components.evaluate.component import evaluate
from components.merge.component import merge
from components.on_exit.component import on_exit
from components.prepare.component import prepare
from components.register.component import register
from components.settings import DEFAULT_IMAGE, DEFAULT_TRAIN_IMAGE
from components.train.component import train, train_on_cluster
from vembed.errors import ConfigError

PIPELINE_NAME = "lora-finetune"
DEFAULT_MODEL_NAME = "vembed-embedding"

# Secret data keys -> environment variables. Only the secret *names* are parameters.
S3_SECRET_KEYS = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
MLFLOW_SECRET_KEYS = {k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")}
MODEL_CACHE_MOUNT = "/model-cache"
TRAIN_BACKENDS = ("local", "trainjob", "pytorchjob")


class PipelineOutputs(NamedTuple):
    registration: str  # JSON from the register step that ran: model name, version, aliases
    metrics_report: Markdown  # evaluate's metrics table and gate decision


@dataclass(frozen=True)
class Resources:
    """Requests and limits of one step's pod. The memory limit defaults to the request: a pod that outgrows
    it is OOM-killed with a clear reason instead of starving its node."""

    cpu: str
    memory: str
    cpu_limit: str = ""  # default: 2 x cpu
    memory_limit: str = ""  # default: memory

    @property
    def limits(self) -> tuple[str, str]:
        from kubernetes.utils.quantity import parse_quantity  # lazy: kubernetes is slow to import

        cpu = self.cpu_limit or f"{parse_quantity(self.cpu) * 2}"
        return cpu, self.memory_limit or self.memory


# An image reference, by tag or by digest (`repo@sha256:<64 hex>`); a digest pins the exact build.
_IMAGE_REF = re.compile(r"^[a-z0-9]+([._/:-][a-z0-9]+)*(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?$")
# The images' user (images/Dockerfile.*: USER 1000:1000); every pod runs as it, never as root.
IMAGE_UID = 1000


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


# VEMBED_* environment variable -> (PipelineOptions field, how to read the value)
_ENV_OPTIONS = {
    "VEMBED_IMAGE": ("image", str), "VEMBED_TRAIN_IMAGE": ("train_image", str),
    "VEMBED_GPU_TYPE": ("accelerator_type", str), "VEMBED_GPUS": ("accelerator_limit", int),
    "VEMBED_NODE_SELECTOR": ("node_selector", json.loads), "VEMBED_TOLERATIONS": ("tolerations", json.loads),
    "VEMBED_MODEL_CACHE_PVC": ("model_cache_pvc", str), "VEMBED_TRAIN_BACKEND": ("train_backend", str),
    "VEMBED_EVALUATE_GPUS": ("evaluate_accelerator_limit", int), "VEMBED_IMAGE_PULL_SECRETS": ("image_pull_secrets", _names),
}  # fmt: skip


@dataclass(frozen=True)
class PipelineOptions:
    """Compile-time settings. The defaults produce the committed `pipelines/compiled/lora_finetune.yaml`."""

    image: str = DEFAULT_IMAGE  # default of the `image` run parameter (CPU steps)
    train_image: str = DEFAULT_TRAIN_IMAGE  # default of the `train_image` run parameter (train, evaluate, merge)
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = 1  # 0 compiles without a GPU request (local runs, CPU clusters)
    node_selector: dict[str, str] = field(default_factory=dict)  # train pod only: where the GPUs are
    tolerations: list[dict[str, str]] = field(default_factory=list)  # train pod only
    model_cache_pvc: str = ""  # PVC mounted at /model-cache as HF_HOME for train, evaluate and merge
    evaluate_accelerator_limit: int = 0  # GPUs for the evaluate step (same accelerator_type as train)
    image_pull_secrets: list[str] = field(default_factory=list)  # every pod, and the cluster job's pods
    # KFP allows pipeline outputs only outside an exit handler: the cluster pipeline has the handler and
    # no outputs; `vembed pipeline run --local` compiles without it to print the registration.
    exit_handler: bool = True  # False: no on-exit task (KFP backends before 2.14, docs/compatibility.md)
    security_context: bool = True  # False: no securityContext in the platform spec (backends that predate it)
    cache_train: bool = False  # training is expensive but not reproducible byte for byte; rerun by default
    # local: the train pod trains on its own GPUs. trainjob / pytorchjob: it launches a cluster job and
    # requests no GPU (accelerator_* are ignored); train resources, node selector and tolerations go to
    # the job's nodes. A model-cache PVC is then mounted by every node too, so it must be ReadWriteMany.
    train_backend: str = "local"
    resources: dict[str, Resources] = field(
        default_factory=lambda: {
            "prepare": Resources("1", "2Gi"),
            "train": Resources("4", "32Gi"),
            "evaluate": Resources("2", "16Gi"),
            "merge": Resources("2", "16Gi"),
            "register": Resources("1", "4Gi"),
            # With a cluster backend the train pod only waits for the job: it keeps these small ones and
            # `train` goes to the job's nodes.
            "train-launcher": Resources("500m", "2Gi", "1", "4Gi"),
            "deploy": Resources("500m", "1Gi"),
            "on-exit": Resources("250m", "1Gi", "500m", "1Gi"),
            # Any task added without requests and limits of its own (see harden_tasks).
            "default": Resources("500m", "2Gi", "1", "2Gi"),
        }
    )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "PipelineOptions":
        """Defaults < VEMBED_* environment variables < explicit keyword overrides."""
        env = dict(os.environ if env is None else env)
        values = {key: read(env[name]) for name, (key, read) in _ENV_OPTIONS.items() if env.get(name)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)

    def __post_init__(self) -> None:
        if self.train_backend not in TRAIN_BACKENDS:
            raise ConfigError(f"train_backend: {self.train_backend!r} is not one of {', '.join(TRAIN_BACKENDS)}")
        for key, image in (("image", self.image), ("train_image", self.train_image)):
            if not _IMAGE_REF.match(image):
                raise ConfigError(f"{key}: {image!r} is not an image reference (repo:tag or repo@sha256:<64 hex>)")

    @property
    def on_cluster(self) -> bool:
        """True when the train task launches a cluster job instead of training in its own pod."""
        return self.train_backend != "local"


def _requests(task: dsl.PipelineTask, res: Resources) -> dsl.PipelineTask:
    cpu_limit, memory_limit = res.limits
    task.set_cpu_request(res.cpu).set_memory_request(res.memory)
    return task.set_cpu_limit(cpu_limit).set_memory_limit(memory_limit)


def harden_tasks(opts: PipelineOptions) -> None:
    """On every task of the pipeline being defined (steps added later included): run as the image's
    non-root user, pull with the image pull secrets, and default requests/limits where a step set none.

    kfp-kubernetes 2.17 sets runAsUser / runAsGroup / runAsNonRoot (`set_security_context`); the other
    fields the `restricted` Pod Security Standard needs (allowPrivilegeEscalation false, drop ALL,
    seccomp RuntimeDefault) have no SDK field: the KFP backend's driver sets them (docs/compatibility.md).
    """
    from kfp.dsl import pipeline_context

    for task in pipeline_context.Pipeline.get_default_pipeline().tasks.values():
        if task.container_spec is None:  # a nested pipeline or an importer: no pod of its own
            continue
        if opts.security_context:
            kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True)
        if opts.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, list(opts.image_pull_secrets))
        res = task.container_spec.resources
        if res is None or not (res.cpu_limit and res.memory_limit):
            _requests(task, opts.resources["default"])


def _job_resources(res: Resources) -> dict[str, dict[str, str]]:
    cpu_limit, memory_limit = res.limits
    return {"requests": {"cpu": res.cpu, "memory": res.memory}, "limits": {"cpu": cpu_limit, "memory": memory_limit}}


def build_pipeline(opts: PipelineOptions | None = None):
    """Return the `lora-finetune` pipeline compiled against `opts` (a fresh function per call)."""
    opts = opts or PipelineOptions()
    res = opts.resources
    train_component = train_on_cluster if opts.on_cluster else train
    # What the cluster job's pods get from the compile options (the waiting pod keeps its own resources).
    cluster_args = (
        {"job_settings": {"resources": _job_resources(res["train"]), "image_pull_secrets": opts.image_pull_secrets}}
        if opts.on_cluster
        else {}
    )

    def lora_finetune(
        data_uri: str,
        base_model: str = "",  # empty: the training config's model_name (a default here would replace it)
        config_overrides: list = [],  # noqa: B006 - KFP reads the default from the signature; never mutated
        config_path: str = "",
        registered_model_name: str = DEFAULT_MODEL_NAME,
        promotion_metric: str = "ndcg@10",
        min_delta: float = 0.0,
        eval_fraction: float = 0.1,
        split_seed: int = 0,
        on_bad_record: str = "error",
        image: str = opts.image,
        train_image: str = opts.train_image,
        s3_secret_name: str = "vembed-s3",
        mlflow_secret_name: str = "vembed-mlflow",
        s3_endpoint_url: str = "",
        mlflow_tracking_uri: str = "",
        deploy: bool = True,
        serving_namespace: str = "",
        serving_service_name: str = "",
        serving_service_account: str = "",
        serving_image: str = "",
        canary_traffic_percent: int = 100,
        deploy_timeout_s: int = 900,
        mlflow_artifacts_destination: str = "",
        mine_negatives: str = "",
    ) -> PipelineOutputs:
        # Runs after everything below, whatever the outcome. The handler is entered without a `with`
        # block so that the step definitions keep their place (and their indentation).
        # Inputs several steps take alike.
        endpoints = {"mlflow_tracking_uri": mlflow_tracking_uri, "s3_endpoint_url": s3_endpoint_url}
        this_run = {"pipeline_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "pipeline_run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER}
        gate = {"promotion_metric": promotion_metric, "min_delta": min_delta}

        steps, exit_tasks = contextlib.ExitStack(), []
        if opts.exit_handler:
            exit_tasks = [
                on_exit(pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER, pipeline_name=PIPELINE_NAME, **this_run, **endpoints)
            ]
            steps.enter_context(dsl.ExitHandler(exit_tasks[0], name="steps"))

        prepare_task = prepare(
            raw_uri=data_uri,
            eval_fraction=eval_fraction,
            seed=split_seed,
            on_bad_record=on_bad_record,
            s3_endpoint_url=s3_endpoint_url,
            mine_negatives=mine_negatives,  # a model to mine hard negatives with; "" = off
        )
        train_task = train_component(
            dataset=prepare_task.outputs["dataset"],
            base_model=base_model,
            config_overrides=config_overrides,
            config_path=config_path,
            s3_endpoint_url=s3_endpoint_url,
            # "" keeps the config's trainer.backend; a cluster backend is enforced (this pod has no GPU).
            train_backend=opts.train_backend if opts.on_cluster else "",
            job_image=train_image,  # what a cluster job runs when trainer.image is unset
            **cluster_args,
        )
        evaluate_task = evaluate(
            dataset=prepare_task.outputs["dataset"],
            model=train_task.outputs["model"],
            base_model=base_model,
            registered_model_name=registered_model_name,
            **gate,
            **endpoints,
        )
        merge_task = merge(model=train_task.outputs["model"])

        def register_task(promote: bool) -> dsl.PipelineTask:
            task = register(
                adapter=train_task.outputs["model"],
                merged_model=merge_task.outputs["merged_model"],
                metrics=evaluate_task.outputs["metrics"],
                dataset=prepare_task.outputs["dataset"],
                model_name=registered_model_name,
                promote=promote,
                **gate,
                **endpoints,
                **this_run,
            )
            task.set_display_name("register-champion" if promote else "register-challenger")
            return task

        # The gate: evaluate's decision picks the branch; only the first one moves `champion`.
        with dsl.If(evaluate_task.outputs["decision"] == "promote", name="gate-passed"):
            promoted = register_task(promote=True)
            # register -> deploy: the new champion becomes the serving endpoint (KServe).
            with dsl.If(deploy == True, name="deploy-enabled"):  # noqa: E712 - a KFP condition, not a Python test
                deploy_task = deploy_component(
                    registration=promoted.output, model_name=registered_model_name, image=serving_image,
                    default_image=image, namespace=serving_namespace, service_name=serving_service_name,
                    service_account=serving_service_account, canary_traffic_percent=canary_traffic_percent,
                    timeout_s=deploy_timeout_s, mlflow_artifacts_destination=mlflow_artifacts_destination,
                    mlflow_tracking_uri=mlflow_tracking_uri,
                )  # fmt: skip
        with dsl.Else(name="gate-held"):
            held = register_task(promote=False)

        # Images are run parameters (KFP resolves them when the pod starts).
        # A train task that only launches a cluster job needs no CUDA image.
        for task in (prepare_task, promoted, held, deploy_task, *exit_tasks, *([train_task] if opts.on_cluster else [])):
            task.set_container_image(image)
        for task in (evaluate_task, merge_task, *([] if opts.on_cluster else [train_task])):
            task.set_container_image(train_image)

        for task, key in (
            (prepare_task, "prepare"), (train_task, "train-launcher" if opts.on_cluster else "train"),
            (evaluate_task, "evaluate"), (merge_task, "merge"), (promoted, "register"), (held, "register"),
            (deploy_task, "deploy"), *((t, "on-exit") for t in exit_tasks),
        ):  # fmt: skip
            _requests(task, res[key])

        # No task-level retry: KFP would rerun a step on any failure, a missing data file included
        # (minutes of backoff for an error that cannot change). The steps retry transient failures
        # (network, 5xx, throttling) themselves and fail at once on permanent ones (vembed.retry).

        # Caching: prepare may read a moving `.../latest` snapshot, evaluate compares against a champion
        # that changes, and register has side effects, so none of them may reuse an old result.
        train_task.set_caching_options(enable_caching=opts.cache_train)
        for task in (prepare_task, evaluate_task, promoted, held, deploy_task, *exit_tasks):
            task.set_caching_options(enable_caching=False)

        # With a cluster backend, the job's GPUs come from trainer.gpus_per_node and this pod needs none.
        gpus = ((train_task, 0 if opts.on_cluster else opts.accelerator_limit), (evaluate_task, opts.evaluate_accelerator_limit))
        for task, count in gpus:
            if count > 0:
                task.set_accelerator_type(opts.accelerator_type).set_accelerator_limit(count)
        for key, value in opts.node_selector.items():
            kubernetes.add_node_selector(train_task, label_key=key, label_value=value)
        for toleration in opts.tolerations:
            kubernetes.add_toleration_json(train_task, toleration)

        # Data loaders share tensors through /dev/shm, which is 64 MiB in a default pod.
        for task in (train_task, evaluate_task):
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        for task in (train_task, evaluate_task, merge_task) if opts.model_cache_pvc else ():
            kubernetes.mount_pvc(task, pvc_name=opts.model_cache_pvc, mount_path=MODEL_CACHE_MOUNT)
            task.set_env_variable("HF_HOME", f"{MODEL_CACHE_MOUNT}/huggingface")

        for task in (prepare_task, train_task, evaluate_task, promoted, held, *exit_tasks):
            kubernetes.use_secret_as_env(task, secret_name=s3_secret_name, secret_key_to_env=S3_SECRET_KEYS)
        for task in (evaluate_task, promoted, held, deploy_task, *exit_tasks):
            # Optional: an MLflow server without authentication needs no secret.
            kubernetes.use_secret_as_env(
                task, secret_name=mlflow_secret_name, secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True
            )

        steps.close()  # leaves the exit handler's group, if entered
        harden_tasks(opts)

        if opts.exit_handler:
            return None
        return PipelineOutputs(
            registration=dsl.OneOf(promoted.output, held.output),
            metrics_report=evaluate_task.outputs["report"],
        )

    if opts.exit_handler:
        del lora_finetune.__annotations__["return"]
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description="LoRA fine-tuning of an embedding model with an evaluation-gated promotion in MLflow.",
    )(lora_finetune)


lora_finetune = build_pipeline()
