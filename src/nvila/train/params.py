"""Which parameters train, and with which learning rate: the part of a recipe that touches the model.

Parts are ``vision`` (the ViT), ``projector`` and ``llm``. Modes: ``full`` (every parameter), ``frozen``,
and for the vision tower ``layernorm`` (only LayerNorm weights and biases, NVILA's cheap ViT tuning).
ViT layers after the selected feature layer never run, so they stay frozen in every mode.
LoRA on the LLM is applied separately (peft) and composes with these modes.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from nvila.base.errors import ConfigError

Mode = Literal["full", "frozen", "layernorm"]
PARTS = ("vision", "projector", "llm")


def part_modules(model: Any) -> dict[str, nn.Module]:
    """The three trainable parts of an NvilaModel."""
    return {"vision": model.vision, "projector": model.projector, "llm": model.llm}


def set_trainable(model: Any, modes: dict[str, Mode]) -> dict[str, int]:
    """Set ``requires_grad`` per part; returns trainable parameter counts per part."""
    unknown = sorted(set(modes) - set(PARTS))
    if unknown:
        raise ConfigError(f"unknown model parts {unknown}; parts are {list(PARTS)}")
    counts = {}
    for part, module in part_modules(model).items():
        mode = modes.get(part, "frozen")
        if mode not in ("full", "frozen", "layernorm"):
            raise ConfigError(f"{part}: training mode {mode!r} is not one of full, frozen, layernorm")
        if mode == "layernorm" and part != "vision":
            raise ConfigError("layernorm-only tuning applies to the vision tower")
        for p in module.parameters():
            p.requires_grad_(mode == "full")
        if mode == "layernorm":
            for sub in module.modules():
                if isinstance(sub, nn.LayerNorm):
                    for p in sub.parameters():
                        p.requires_grad_(True)
        if part == "vision":
            for p in module.idle_parameters():
                p.requires_grad_(False)
        counts[part] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return counts


def param_groups(model: Any, lrs: dict[str, float], weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups, one per part with trainable parameters, each with its own learning rate."""
    groups = []
    for part, module in part_modules(model).items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            continue
        if part not in lrs:
            raise ConfigError(f"part {part!r} is trainable but the recipe gives it no learning rate")
        groups.append({"name": part, "params": params, "lr": float(lrs[part]), "weight_decay": weight_decay})
    if not groups:
        raise ConfigError("nothing to train: every part is frozen")
    return groups
