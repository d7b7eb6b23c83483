"""LoRA wiring with peft: resolve the configured target names against the model."""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from vembed.config import TrainConfig, mutates_base
from vembed.errors import ConfigError
from vembed.models.base import Embedder

log = logging.getLogger(__name__)


def resolve_target_modules(model: nn.Module, requested: list[str], model_name: str = "model") -> list[str]:
    """Keep the requested names that exist; the guide's list mixes several families' names."""
    present = {full.rsplit(".", 1)[-1] for full, m in model.named_modules() if isinstance(m, nn.Linear)}
    matched = [name for name in requested if name in present]
    what = f"Linear module of {model_name}; its Linear module names are: {', '.join(sorted(present))}"
    _report_matches("lora_target_modules", requested, matched, model_name, what, "applying", logging.INFO)
    return matched


def _report_matches(key: str, requested: list[str], matched: list[str], model: str, what: str, verb: str, level: int) -> None:
    """None of `requested` matched: an error; some did not: a log line naming them."""
    if not matched:
        raise ConfigError(f"{key}: none of {requested} is a {what}")
    if skipped := [n for n in requested if n not in matched]:
        log.log(level, "%s: %s not in %s, %s %s", key, skipped, model, verb, matched)


def _under(name: str, roots: dict[str, str]) -> str | None:
    """The unused root that `name` is, or lies inside; None if on the embedding's path."""
    return next((r for r in roots if name == r or name.startswith(r + ".")), None)


def resolve_modules_to_save(embedder: Embedder, requested: list[str], model_name: str = "model") -> list[str]:
    """Resolve `modules_to_save` as LoRA targets are: a name is a module path or the last part(s) of
    one; missing names are skipped, none matching is an error. A module that does not reach the
    embedding (its family says which, e.g. BERT's pooler) is refused by name.

    Returns the matched module paths (see `_keep_only` for why full paths)."""
    backbone = embedder.backbone
    paths = [n for n, _ in backbone.named_modules() if n]
    unused = embedder.unused_modules()
    matched: list[str] = []
    resolved: list[str] = []
    for name in requested:
        hits = [p for p in paths if p == name or p.endswith("." + name)]
        if not hits:
            continue
        for hit in hits:
            if (root := _under(hit, unused)) is not None:
                raise ConfigError(
                    f"modules_to_save: {name!r} ({hit}) does not reach the embedding of {model_name}: "
                    f"{unused[root]}. Training it would only add parameters without gradient; "
                    "remove it, or name a module on the embedding's path"
                )
        matched.append(name)
        resolved.extend(hit for hit in hits if hit not in resolved)
    top = ", ".join(sorted({p.split(".", 1)[0] for p in paths}))
    what = f"module of {model_name}; its top-level modules are: {top} (a dotted path or its last part, e.g. layers.0.mlp)"
    _report_matches("modules_to_save", requested, matched, model_name, what, "saving", logging.WARNING)
    return resolved


def apply_lora(embedder: Embedder, cfg: TrainConfig) -> Embedder:
    """Wrap the embedder's backbone in a PeftModel; returns the same embedder."""
    backbone = embedder.backbone
    targets = resolve_target_modules(backbone, cfg.lora_target_modules, cfg.model_name)
    # Linear layers the family says never reach the embedding (BERT's pooler): adapting them
    # would add dead parameters that DDP/FSDP then trip over.
    unused = embedder.unused_modules()
    excluded = [full for full, m in backbone.named_modules() if isinstance(m, nn.Linear) and _under(full, unused)]
    modules_to_save = resolve_modules_to_save(embedder, cfg.modules_to_save, cfg.model_name) if cfg.modules_to_save else None
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        exclude_modules=excluded or None,
        modules_to_save=modules_to_save,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=True if cfg.lora_init == "default" else cfg.lora_init,
        bias="none",
    )
    embedder.backbone = get_peft_model(backbone, lora_config)
    if mutates_base(cfg.lora_init):
        save_as_plain_lora(embedder.backbone)
    if modules_to_save:
        _keep_only(embedder.backbone, modules_to_save)
    # Record the configured name, not a machine-specific resolved path.
    embedder.backbone.peft_config["default"].base_model_name_or_path = embedder.spec.model_name
    trainable, total = count_parameters(embedder)
    log.info("LoRA on %s: %d trainable of %d parameters (%.3f%%)", targets, trainable, total, 100 * trainable / total)
    return embedder


def save_as_plain_lora(peft_model: PeftModel) -> None:
    """PiSSA/OLoRA subtract the adapter's start B0·A0 from the base weights, so the trained adapter is
    only right on that residual base. Make every later `save_pretrained` of this model write peft's
    conversion instead: rank 2r, [B, -B0]·[A; A0], right on the original base model, so checkpoints,
    `vembed merge` and Predictor load it as any LoRA adapter. The start is kept in a temp directory
    for as long as the model lives (peft's conversion reads it from disk)."""
    tmp = Path(tempfile.mkdtemp(prefix="vembed-lora-init-"))
    weakref.finalize(peft_model, shutil.rmtree, tmp, ignore_errors=True)
    initial = tmp / "initial"
    config = peft_model.peft_config["default"]
    mode = config.init_lora_weights
    # Saved as plain LoRA: loading it must not decompose the (residual) weights a second time.
    config.init_lora_weights = True
    try:
        PeftModel.save_pretrained(peft_model, str(initial), save_embedding_layers=False)
    finally:
        config.init_lora_weights = mode
    peft_model.save_pretrained = functools.partial(_save_converted, peft_model, str(initial))


def _save_converted(peft_model: PeftModel, initial: str, directory: Any, **kwargs: Any) -> None:
    kwargs.setdefault("save_embedding_layers", False)
    with warnings.catch_warnings():
        # peft loads the start as a second adapter to convert, and warns that the base was changed: it was, on purpose.
        warnings.filterwarnings("ignore", message=".*changes the base weights", category=UserWarning)
        PeftModel.save_pretrained(peft_model, directory, path_initial_model_for_weight_conversion=initial, **kwargs)


def _keep_only(peft_model: nn.Module, paths: list[str]) -> None:
    """peft wraps every module whose name ends with a modules_to_save entry as a plain string, so
    the top-level `norm` of a decoder also catches each `input_layernorm` and `q_norm`. Unwrap the
    modules that were not asked for. (Loading the adapter later wraps them again as untrained
    copies of the originals, which changes no output.)"""
    from peft.utils import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper) and name not in paths:
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, child, module.original_module)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing lets gradients reach LoRA weights even though
    # the (frozen) inputs do not require grad; input grads cover the reentrant path.
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
