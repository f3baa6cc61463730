"""FP8 training (``precision: fp8`` / ``fp8-emulated``): torchao's ``Float8Linear`` swapped into the LLM and ViT.

The module swap is PyTorch's own (``torchao.float8.convert_to_float8_training``, parameter names kept): each
chosen linear casts its input, weight and output gradient to FP8 with dynamic scales (one per tensor,
``tensorwise``, or one per row, ``rowwise``) right before each of its three matmuls, and keeps its weight,
bias and gradients in their stored precision. Everything else runs under the trainer's bf16 autocast.

Which linears: ``nn.Linear`` layers of the LLM and of the ViT layers that run, whose two dimensions are
multiples of 16 (the FP8 GEMM's requirement). Never the LM head (its logits feed the loss directly and the
loss module runs it in float32 on supervised rows only), never the projector (a small share of the FLOPs,
and its accuracy in FP8 has not been measured), never LoRA's own ``lora_A`` / ``lora_B`` (rank-r matmuls
gain nothing). peft's LoRA layers wrap any ``nn.Linear`` subclass, so the frozen
``base_layer`` under each LoRA layer is converted: its forward and input-gradient matmuls run in FP8.
torchao 0.18's backward also computes the weight-gradient matmul of a frozen weight, which autograd then
drops (``float8_linear.py`` does not look at ``needs_input_grad``).

``fp8`` needs FP8 tensor cores (CUDA compute capability 8.9+: Ada, Hopper, Blackwell); ``fp8-emulated``
runs the same conversion with torchao's emulation (FP8 casts, float32 matmuls) on any device, for tests.
Exported checkpoints hold ordinary linears: :func:`restore_linears` swaps them back before saving.
Under FSDP2 the weights are all-gathered in their stored dtype and cast to FP8 after the gather (torchao's
FP8 all-gather, ``enable_fsdp_float8_all_gather``, is not used).

``train.optimizer: adamw-fp8`` (:func:`make_optimizer`) keeps AdamW's two moments in FP8 (torchao's
``AdamWFp8``); it is independent of the precision. torchao is imported only for these settings.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import nn

from nvila.base.errors import ConfigError
from nvila.base.hardware import FP8_MIN_CAPABILITY, fp8_device

FP8_PRECISIONS = ("fp8", "fp8-emulated")
FP8_RECIPES = ("tensorwise", "rowwise")     # torchao's Float8LinearRecipeName values nvila offers
ALIGN = 16                                  # torch._scaled_mm needs both GEMM dimensions divisible by 16
LORA_MARK = "lora_"                         # peft's adapter sub-modules (lora_A, lora_B, lora_embedding_*)


def require_torchao() -> Any:
    """The ``torchao.float8`` module, or a ConfigError saying how to install it."""
    try:
        import torchao.float8 as float8  # noqa: PLR0402 -- a submodule import: fails when torchao.float8 is missing
    except ImportError:
        raise ConfigError("train.precision fp8 / fp8-emulated and train.optimizer adamw-fp8 need PyTorch's torchao "
                          "package: pip install 'nvila[train]'") from None
    return float8


def check_fp8_device(precision: str, device: torch.device) -> None:
    """Refuse ``precision: fp8`` on a device without FP8 tensor cores (``fp8-emulated`` runs anywhere)."""
    if precision != "fp8":
        return
    native, where = fp8_device(device)
    if native:
        return
    raise ConfigError(f"train.precision fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability "
                      f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+: Ada, Hopper, Blackwell); this run's device is "
                      f"{where}. Use precision fp8-emulated to test the FP8 conversion (same casts, float32 "
                      "matmuls, slow), or precision bf16 to train")


def fp8_targets(model: Any) -> list[str]:
    """Names (under ``model``, an NvilaModel; LLM first, in module order) of the linears :func:`convert_to_fp8`
    converts."""
    head = model.llm.get_output_embeddings()
    idle = {id(p) for p in model.vision.idle_parameters()}      # ViT layers after the selected one never run
    names = []
    for part, root in (("llm", model.llm), ("vision", model.vision)):
        for name, module in root.named_modules():
            if type(module) is not nn.Linear or module is head or LORA_MARK in name or id(module.weight) in idle:
                continue
            out_features, in_features = module.weight.shape
            if out_features % ALIGN == 0 and in_features % ALIGN == 0:
                names.append(f"{part}.{name}")
    return names


def convert_to_fp8(model: Any, recipe: str, emulate: bool, frozen_dtype: torch.dtype | None = None) -> list[str]:
    """Swap torchao's ``Float8Linear`` into the linears :func:`fp8_targets` names; returns their names.

    ``recipe``: ``tensorwise`` or ``rowwise`` scaling. ``emulate``: FP8 casts with float32 matmuls (any
    device). ``frozen_dtype``: store frozen converted weights in this dtype (``train.frozen_dtype: bf16``:
    the FP8 cast reads them directly, no upcast copy). Call it after LoRA is applied and before DDP/FSDP.
    """
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"train.fp8_recipe must be one of {list(FP8_RECIPES)}, got {recipe!r}")
    float8 = require_torchao()
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    targets = set(fp8_targets(model))
    float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda _, fqn: fqn in targets)
    if frozen_dtype is not None:
        for name in targets:
            weight = model.get_submodule(name).weight
            if not weight.requires_grad:
                weight.data = weight.data.to(frozen_dtype)
    return sorted(targets)


def fp8_layers(model: nn.Module) -> list[str]:
    """Names of the torchao Float8Linear modules under ``model`` (none unless it was converted)."""
    linear = sys.modules.get("torchao.float8.float8_linear")    # not imported: nothing can have been converted
    if linear is None:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, linear.Float8Linear)]


def restore_linears(model: nn.Module) -> int:
    """Swap every Float8Linear under ``model`` back to ``nn.Linear`` with the same parameters (the export and
    the state dict then hold no torchao objects); returns how many."""
    names = fp8_layers(model)
    for name in names:
        old = model.get_submodule(name)
        with torch.device("meta"):
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
        new.weight, new.bias = old.weight, old.bias
        new.train(old.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return len(names)


# ---- FP8 optimizer states (train.optimizer: adamw-fp8) -------------------------------------------------


def make_optimizer(name: str, groups: list[dict[str, Any]], betas: tuple[float, float], eps: float) -> Any:
    """AdamW over ``groups`` (each with its lr and weight decay): PyTorch's (``adamw``) or torchao's
    ``AdamWFp8`` (``adamw-fp8``), whose two moment buffers are FP8 (E4M3) codes with one float32 scale per
    256 values, for every parameter of >= 4096 elements, a multiple of 256 (others keep float32 moments):
    about 2 bytes per parameter instead of 8. Its update is one ``torch.compile``-d function per parameter shape (CPU:
    a C++ compiler, several seconds per shape on first use). Its state is saved by ``torch.save`` as torchao's
    ``OptimStateFp8`` tensors, which torchao registers for ``torch.load(weights_only=True)``."""
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=eps)
    if name != "adamw-fp8":
        raise ConfigError(f"train.optimizer must be adamw or adamw-fp8, got {name!r}")
    require_torchao()
    from torchao.optim import AdamWFp8

    return AdamWFp8(groups, betas=betas, eps=eps)

