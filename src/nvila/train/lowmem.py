"""Frozen weights kept in bfloat16 while training computes in float32 (``train.frozen_dtype: bf16``).

LoRA + LayerNorm fine-tuning leaves almost every weight frozen, so those weights need no float32 master
copy: storing them in bf16 halves the model's memory. Each frozen linear / embedding is swapped (module
swap, parameter names kept) for one that upcasts its weight on the fly, so the arithmetic stays float32
(the result equals a float32 model whose frozen weights were rounded to bf16 once). With gradient
checkpointing the upcast copies live for one layer at a time. CPU bf16 GEMMs are avoided on purpose:
their backward is far slower than float32's on CPUs (see nvila.train.trainer._precision). The swapped
modules are the inference ones of :mod:`nvila.model.mixed`.
"""

from __future__ import annotations

import torch
from torch import nn

from nvila.model.mixed import UpcastEmbedding, UpcastLinear


def store_frozen_in(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Convert every frozen ``nn.Linear`` / ``nn.Embedding`` weight under ``model`` to ``dtype``.

    Modules with any trainable parameter are left alone (peft LoRA layers keep their own float32
    adapters; only their frozen ``base_layer`` is converted). Returns the bytes saved.
    """
    saved = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, nn.Embedding) or any(p.requires_grad for p in module.parameters()):
            continue
        compute = module.weight.dtype
        for p in module.parameters(recurse=False):
            if p.dtype != dtype:
                saved += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
                p.data = p.data.to(dtype)          # in place: a tied LM head sees the same storage
        if isinstance(module, nn.Linear):
            module.__class__ = UpcastLinear
        else:
            module.__class__ = UpcastEmbedding
            module.compute_dtype = compute
    return saved
