"""LoRA wiring with peft: resolve the configured target names against the model."""

from __future__ import annotations

import logging

from peft import LoraConfig, get_peft_model
from torch import nn

from vembed.config import TrainConfig
from vembed.errors import ConfigError
from vembed.models.base import Embedder

log = logging.getLogger(__name__)

# Modules that exist in checkpoints but never feed our embeddings (BERT's pooler):
# adapting them would add dead parameters that DDP/FSDP then trip over.
UNUSED_BRANCHES = ("pooler",)


def linear_module_names(model: nn.Module) -> dict[str, list[str]]:
    """Leaf name -> full module paths, for every nn.Linear in the model."""
    names: dict[str, list[str]] = {}
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names.setdefault(full.rsplit(".", 1)[-1], []).append(full)
    return names


def resolve_target_modules(model: nn.Module, requested: list[str], model_name: str = "model") -> list[str]:
    """Keep the requested names that exist; the guide's list mixes several families' names."""
    present = linear_module_names(model)
    matched = [name for name in requested if name in present]
    if not matched:
        raise ConfigError(
            f"lora_target_modules: none of {requested} is a Linear module of {model_name}; "
            f"its Linear module names are: {', '.join(sorted(present))}"
        )
    skipped = [n for n in requested if n not in present]
    if skipped:
        log.info("lora_target_modules: %s not in %s, applying %s", skipped, model_name, matched)
    return matched


def apply_lora(embedder: Embedder, cfg: TrainConfig) -> Embedder:
    """Wrap the embedder's backbone in a PeftModel; returns the same embedder."""
    backbone = embedder.backbone
    targets = resolve_target_modules(backbone, cfg.lora_target_modules, cfg.model_name)
    excluded = [
        full
        for full, m in backbone.named_modules()
        if isinstance(m, nn.Linear) and any(part in UNUSED_BRANCHES for part in full.split("."))
    ]
    modules_to_save = None
    if cfg.modules_to_save:
        top = {n for n, _ in backbone.named_modules() if n}
        leaves = {n.rsplit(".", 1)[-1] for n in top}
        modules_to_save = [m for m in cfg.modules_to_save if m in leaves or m in top]
        missing = sorted(set(cfg.modules_to_save) - set(modules_to_save))
        if not modules_to_save:
            raise ConfigError(f"modules_to_save: none of {cfg.modules_to_save} is a module of {cfg.model_name}")
        if missing:
            log.warning("modules_to_save: %s not in %s, saving %s", missing, cfg.model_name, modules_to_save)
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
        bias="none",
    )
    embedder.backbone = get_peft_model(backbone, lora_config)
    # Record the configured name, not a machine-specific resolved path.
    embedder.backbone.peft_config["default"].base_model_name_or_path = embedder.spec.model_name
    trainable, total = count_parameters(embedder)
    log.info("LoRA on %s: %d trainable of %d parameters (%.3f%%)", targets, trainable, total, 100 * trainable / total)
    return embedder


def enable_gradient_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing lets gradients reach LoRA weights even though
    # the (frozen) inputs do not require grad; input grads cover the reentrant path.
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
