"""Typed training config: defaults < YAML file < `--config_override k=v` pairs.

Every key of the LoRA guide is accepted. Unknown keys are errors that suggest
the closest valid key; invalid values are errors that name the key.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vembed.errors import ConfigError

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}

# The guide's default list mixes names from several families; only names that
# exist in the loaded model are applied (see vembed.models.lora).
DEFAULT_TARGET_MODULES = ["q_proj", "v_proj", "query", "value", "key", "dense"]

# peft init_lora_weights values; "default" is peft's True. PiSSA/OLoRA rewrite the base weights.
LORA_INITS = ("default", "gaussian", "pissa", "olora")

RESOURCE_KEYS = ("cpu", "memory", "ephemeral-storage")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_REF = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-._a-zA-Z0-9]+$")


class TrainerOptions(BaseModel):
    """Where training runs: this pod (`local`) or a Kubeflow job. See docs/multinode.md."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_nodes: int = Field(1, ge=1, description="training nodes (pods); > 1 needs trainjob or pytorchjob")
    gpus_per_node: int = Field(1, ge=0, description="one training process per GPU; 0: one CPU process")
    backend: Literal["local", "trainjob", "pytorchjob"] = "local"
    runtime: str = Field("torch-distributed", description="Kubeflow Trainer (Cluster)TrainingRuntime name")
    image: str | None = Field(None, description="job image; required for trainjob and pytorchjob")
    resources: dict[str, str] = Field(default_factory=dict, description="per node: cpu, memory, ephemeral-storage")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    timeout: int = Field(86400, gt=0, description="seconds before the job is stopped and the step fails")
    keep_job: bool = Field(False, description="keep the finished job for debugging instead of deleting it")
    namespace: str | None = Field(None, description="job namespace; default: the pipeline pod's namespace")
    env_from_secrets: dict[str, str] = Field(
        default_factory=dict, description='ENV_VAR: "secret-name/key"; the job reads the value from the secret'
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="names of docker-registry secrets the job's pods pull the image with"
    )
    run_as_user: int = Field(1000, ge=1, description="UID of the job's containers (the images' user); never root")
    work_dir: str = Field(
        "/tmp/vembed",
        description="in each job pod: staged inputs, the config and checkpoints before node 0 publishes them",
    )

    @field_validator("resources", mode="before")
    @classmethod
    def _resources(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for key, qty in v.items():
            name = "ephemeral-storage" if key == "ephemeral" else key
            if name not in RESOURCE_KEYS:
                hint = "; GPUs come from gpus_per_node" if "gpu" in str(key) else ""
                raise ValueError(f"unknown resource {key!r}; use {', '.join(RESOURCE_KEYS)}{hint}")
            from kubernetes.utils.quantity import parse_quantity  # lazy: kubernetes is slow to import

            try:
                parse_quantity(str(qty))
            except ValueError:
                raise ValueError(f"{key}: {qty!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)") from None
            out[name] = str(qty)
        return out

    @field_validator("env_from_secrets")
    @classmethod
    def _secret_refs(cls, v: dict[str, str]) -> dict[str, str]:
        for env, ref in v.items():
            if not _ENV_NAME.match(env):
                raise ValueError(f"{env!r} is not a valid environment variable name")
            if not _SECRET_REF.match(ref):
                # The value is not echoed: a user who pasted the secret itself must not see it in a log.
                raise ValueError(f"{env}: expected \"secret-name/key\", a reference to a Kubernetes secret")
        return v

    @field_validator("work_dir")
    @classmethod
    def _absolute_work_dir(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} must be an absolute path inside the job's pods")
        return v.rstrip("/") or "/"

    @model_validator(mode="after")
    def _backend_needs(self) -> TrainerOptions:
        if self.backend == "local" and self.num_nodes > 1:
            raise ValueError("num_nodes: more than one node needs backend trainjob or pytorchjob")
        if self.backend != "local" and not self.image:
            raise ValueError(f"image: backend {self.backend} needs the training image")
        return self


class TrainConfig(BaseModel):
    """All keys a training run understands. Field docs double as the config reference."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Model
    model_name: str = Field("sentence-transformers/all-MiniLM-L6-v2", description="HF id or local directory")
    torch_dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA, fp32 on CPU)")
    pooling: Literal["auto", "mean", "cls", "last_token"] = Field("auto", description="auto picks by model family")
    max_seq_length: int = Field(128, gt=0, description="tokens per text")
    query_instruction: str | None = Field(None, description="prefix (text) or system turn (VL) for queries")

    # LoRA
    use_lora: bool = True
    # r32 / alpha 48 / no dropout: the best of the three-seed means on both data sets (docs/benchmarks.md).
    lora_r: int = Field(32, gt=0, description="LoRA rank")
    lora_alpha: float = Field(48, gt=0, description="scales LoRA by alpha/r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout inside the adapter, in [0, 1)")
    lora_target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1)
    modules_to_save: list[str] | None = Field(
        None,
        description=(
            "modules trained fully and saved with the adapter; a module path or its last part(s), resolved "
            "like lora_target_modules; a module that never reaches the embedding (BERT's pooler) is refused"
        ),
    )
    use_rslora: bool = Field(False, description="rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r")
    use_dora: bool = Field(False, description="DoRA: learn a per-column magnitude next to the LoRA direction")
    lora_init: str = Field(
        "default",
        description=(
            "peft's init_lora_weights: default (B = 0, the adapter starts as a no-op) | gaussian | pissa | "
            "pissa_niter_N (fast-SVD PiSSA) | olora. PiSSA and OLoRA move the principal part of each weight into "
            "the adapter; saved adapters are converted to plain LoRA on the original base (rank 2r). "
            "Not with use_dora, use_fsdp or resume_from_checkpoint"
        ),
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        ge=1,
        description=(
            "LoRA+: the adapters' B matrices learn at this multiple of learning_rate (peft's "
            "create_loraplus_optimizer); null = one learning rate for all. Not with use_fsdp"
        ),
    )

    # Training
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(
        1e-3, gt=0, description="measured best for LoRA on all-MiniLM-L6-v2 (docs/benchmarks.md); full fine-tuning wants ~1e-4"
    )
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    seed: int = 42
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature")
    mask_false_negatives: bool = Field(
        True, description="in-batch rows with the same positive (or a positive equal to a hard negative) are not negatives"
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, description="clip gradients to this norm; null disables")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, slower steps"
    )
    use_gradient_cache: bool = False
    gradient_cache_chunk_size: int = Field(
        8,
        gt=0,
        description="rows per GradCache chunk; must be below batch_size to save memory (docs/benchmarks.md)",
    )
    use_mrl: bool = False
    mrl_dims: list[int] | None = Field(
        None,
        min_length=1,
        description="strictly descending; each gets its own loss term; default: the full dim alone (with "
        "mrl_rotation, measured best: docs/benchmarks.md)",
    )
    mrl_weights: list[float] | None = Field(None, description="one weight per mrl_dim; default all 1")
    mrl_rotation: bool = Field(
        True,
        description="with use_mrl: each checkpoint stores a rotation of the embedding space onto its principal "
        "axes (fit on the training data), so truncated dims hold more; full-dim similarities are unchanged",
    )
    use_fsdp: bool = False
    cross_device_negatives: bool = Field(True, description="gather embeddings across processes for negatives")

    # Data
    data_path: str = "data/train.jsonl"
    eval_data_path: str | None = Field(
        None, description="held-out JSONL, evaluated during training (validation loss, nDCG@10, Recall@10)"
    )
    eval_split: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="without eval_data_path: hold out this fraction of data_path (by a hash of the query)",
    )
    eval_steps: int | None = Field(
        None, gt=0, description="evaluate every N optimizer steps and at the end; null: at every save_steps"
    )
    metric_for_best_model: Literal["loss", "ndcg@10", "recall@10", "recall@1", "recall@5", "mrr@10"] | None = Field(
        None, description="validation metric that picks best_checkpoint (kept through rotation)"
    )
    greater_is_better: bool | None = Field(
        None, description="direction of metric_for_best_model; null: false for loss, true otherwise"
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="stop after this many evaluations without improving metric_for_best_model"
    )
    corpus_path: str | None = Field(
        None, description='extra documents (JSONL of {"text": ...}) that validation during training ranks too'
    )
    on_bad_record: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0, description="data loader workers")
    group_by_length: bool = Field(
        True, description="batch rows of similar length (random within windows of 8 batches): less padding"
    )
    retrieval_mode: Literal["auto", "t2t", "t2i", "i2t", "i2i"] = Field(
        "auto", description="which record fields form query and positive; auto: every field present"
    )
    allow_images_outside_data_root: bool = Field(
        False, description="accept image paths outside the data file's directory (../, absolute paths)"
    )

    # Output and checkpoints
    output_dir: str = "output"
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(
        3, gt=0, description="keep the newest N checkpoints (plus the best one with metric_for_best_model)"
    )
    resume_from_checkpoint: str | None = Field(None, description="latest | path to checkpoint-N")

    # Where training runs (vembed.pipeline.launchers); set nested keys with `trainer.num_nodes=2`
    trainer: TrainerOptions = Field(default_factory=TrainerOptions)

    @field_validator("torch_dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> str:
        name = str(v).removeprefix("torch.")
        name = DTYPE_ALIASES.get(name, name)
        if name not in TORCH_DTYPES:
            raise ValueError(f"unknown torch_dtype {v!r}; choose one of {', '.join(TORCH_DTYPES)}")
        return name

    @field_validator("lora_init")
    @classmethod
    def _lora_init(cls, v: str) -> str:
        if v not in LORA_INITS and not re.fullmatch(r"pissa_niter_\d+", v):
            raise ValueError(f"unknown lora_init {v!r}; choose one of {', '.join(LORA_INITS)} or pissa_niter_N")
        return v

    @field_validator("mrl_dims")
    @classmethod
    def _mrl_dims(cls, v: list[int] | None) -> list[int] | None:
        if v and any(d <= 0 for d in v):
            raise ValueError("every dim must be positive")
        if v and any(a <= b for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"must be strictly descending, got {v}")
        return v

    @model_validator(mode="after")
    def _mrl_weights_match(self) -> TrainConfig:
        if self.mrl_weights is not None:
            if self.mrl_dims is None:
                raise ValueError("mrl_weights: needs mrl_dims of the same length")
            if len(self.mrl_weights) != len(self.mrl_dims):
                raise ValueError(
                    f"mrl_weights: has {len(self.mrl_weights)} weights but mrl_dims has {len(self.mrl_dims)} dims"
                )
        return self

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        """Keys that need, or exclude, other keys."""
        if self.use_lora and mutates_base(self.lora_init):
            # The saved adapter is converted to plain LoRA (rank 2r) on the original base, which the
            # rank-r training model cannot load again; DoRA and FSDP shards peft cannot convert.
            for key in ("use_dora", "use_fsdp"):
                if getattr(self, key):
                    raise ValueError(f"lora_init: {self.lora_init} cannot be combined with {key}")
            if self.resume_from_checkpoint:
                raise ValueError(
                    f"lora_init: {self.lora_init} cannot resume (its checkpoints hold the adapter converted to "
                    "plain LoRA on the original base); start the run again"
                )
        if self.loraplus_lr_ratio is not None and not self.use_lora:
            raise ValueError("loraplus_lr_ratio: needs use_lora")
        # FSDP flattens parameters into shards, so peft cannot tell A from B matrices by name.
        if self.loraplus_lr_ratio is not None and self.use_fsdp:
            raise ValueError("loraplus_lr_ratio: cannot be combined with use_fsdp")
        if self.eval_split is not None and self.eval_data_path is not None:
            raise ValueError("eval_split: set either eval_data_path or eval_split, not both")
        if self.metric_for_best_model is not None and self.eval_split is None and self.eval_data_path is None:
            raise ValueError("metric_for_best_model: needs validation data (eval_data_path or eval_split)")
        if self.early_stopping_patience is not None and self.metric_for_best_model is None:
            raise ValueError("early_stopping_patience: needs metric_for_best_model")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_yaml())


def mutates_base(lora_init: str) -> bool:
    """PiSSA and OLoRA take the adapter's start out of the base weights."""
    return lora_init.startswith("pissa") or lora_init == "olora"


# The nested config sections, by key (set as `trainer.num_nodes=2`).
SECTIONS: dict[str, type[BaseModel]] = {"trainer": TrainerOptions}


def _field(key: str) -> Any:
    """The pydantic field for `key` or `section.key`; None if there is no such key."""
    section, _, name = key.partition(".")
    if not name:
        return TrainConfig.model_fields.get(key)
    model = SECTIONS.get(section)
    return model.model_fields.get(name) if model else None


def _unknown_key_error(key: str, source: str) -> ConfigError:
    section, _, name = key.rpartition(".")
    if (model := SECTIONS.get(section)) is None:  # a top-level key (or an unknown section): suggest a top-level key
        section, name, model = "", key.partition(".")[0], TrainConfig
    close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.5)
    hint = f"; did you mean {section + '.' if section else ''}{close[0]}?" if close else ""
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _nest(flat: Mapping[str, Any], source: str) -> dict[str, Any]:
    """{key or section.key: value} as {key: value, section: {key: value}}; unknown keys are errors."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if _field(key) is None:
            raise _unknown_key_error(key, source)
        section, _, name = key.partition(".")
        if name:
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def coerce_override(key: str, raw: str) -> Any:
    """Turn the text of `k=v` into a value pydantic can validate for `key`."""
    text = raw.strip()
    if text.lower() in ("null", "none", "~"):
        return None
    ann = _field(key).annotation
    containers = {typing.get_origin(a) for a in (ann, *typing.get_args(ann))}  # list, dict: bare or in Optional
    # Sections, dict fields and lists of dicts (`trainer.tolerations`) take a YAML flow value.
    if key in SECTIONS or dict in containers:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config_override {key}: invalid YAML value {raw!r}: {getattr(e, 'problem', e)}") from None
    if list in containers:
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        return [item.strip().strip("'\"") for item in inner.split(",") if item.strip()]
    # Pydantic's lax mode turns "32", "1e-4" and "true" into int, float and bool.
    return text


def parse_pairs(
    pairs: Iterable[str],
    option: str,
    coerce: Callable[[str, str], Any],
    unknown: Callable[[str], ConfigError | None],
    noun: str = "key",
) -> dict[str, Any]:
    """The one `name=value` parser (`--config_override`, `--param`): {name: coerce(name, text)}.

    `unknown(name)` returns the error for a name that is not accepted (None when it is).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"{option}: expected {noun}=value, got {pair!r}")
        name, raw = pair.split("=", 1)
        name = name.strip()
        if (error := unknown(name)) is not None:
            raise error
        out[name] = coerce(name, raw)
    return out


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """`--config_override key=value` strings as a nested {key: value} / {section: {key: value}} dict."""
    option = "--config_override"
    flat = parse_pairs(pairs, option, coerce_override, lambda k: None if _field(k) else _unknown_key_error(k, option))
    return _nest(flat, option)


def _fill_trainer_defaults(values: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """Fill the `trainer` keys that neither the file nor the overrides set (e.g. a pipeline's compiled
    backend and job image). The image only for a cluster backend: a local run has no job image."""
    section = values.get("trainer") if values.get("trainer") is not None else {}
    if not isinstance(section, Mapping):
        return  # validation reports the bad section
    filled = {k: v for k, v in defaults.items() if v not in (None, "") and section.get(k) in (None, "")}
    if (section.get("backend") or filled.get("backend") or "local") == "local":
        filled.pop("image", None)
    if filled:
        values["trainer"] = {**section, **filled}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        # An empty file is a mistake (wrong file, failed write), not "all defaults".
        raise ConfigError(f"{path}: config file is empty; give at least data_path and output_dir")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    # `1: x` or `yes: x` (a YAML bool) would reach the config as a non-string keyword: name it instead.
    if bad := [k for k in data if not isinstance(k, str)]:
        raise ConfigError(f"{path}: config key {bad[0]!r} is not a name; keys are names such as lora_r")
    return data


def _format_validation_error(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        key, msg = ".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            return _unknown_key_error(key, source)
        lines.append(f"{key}: {msg}" if key else msg)  # a model validator's message starts with its key
    return ConfigError(f"{source}: invalid config: " + "; ".join(lines))


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    trainer_defaults: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build a config from defaults, then the YAML file, then overrides.

    trainer_defaults: `trainer` keys to use where neither the file nor the overrides set them
    (the train step passes the backend and image its pipeline was compiled for).
    """
    values = _read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    if overrides:
        parsed = _nest(overrides, "override") if isinstance(overrides, Mapping) else parse_overrides(overrides)
        for key, value in parsed.items():
            # A nested override (`trainer.num_nodes`) updates the YAML's section instead of replacing it.
            if key in SECTIONS and isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}
            values[key] = value
        source = f"{source} + overrides"
    if trainer_defaults:
        _fill_trainer_defaults(values, trainer_defaults)
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise _format_validation_error(e, source) from None
