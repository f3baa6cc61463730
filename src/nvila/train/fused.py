"""The fused sequence of a labelled prompt: per-position values over media blocks, and attention masks.

A placeholder id stands for a whole media block in the sequence the LLM sees; everything attached to
token positions (labels, branch ids) is expanded the same way. Several samples or independent turns in
one row are kept apart by an explicit additive 4D mask, because transformers infers packing from
restarting ``position_ids`` only when the attention mask is None and there is no cache, and
``Qwen2Model.forward`` creates a cache whenever ``use_cache`` is on (the config default): a plain call
would attend across samples without a warning. A 4D mask is passed through as-is for every cache setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nvila.base.errors import ConfigError, PromptError
from nvila.formats.plans import IGNORE_INDEX, Prompt

# attention implementations that take an additive (B, 1, L, L) float mask; flash-attention kernels take no
# dense mask (they pack through position_ids / cu_seqlens instead)
MASKED_ATTENTION = ("sdpa", "eager")


def per_fused_position(input_ids: Sequence[int], values: Sequence[Any], blocks: Sequence[torch.Tensor],
                       media_ids: set[int], media_value: Any = None) -> list[Any]:
    """One value per position of the fused sequence: each placeholder's value (or ``media_value``) repeated
    over its media block's length."""
    out: list[Any] = []
    blocks_iter = iter(blocks)
    for token, value in zip(input_ids, values):
        if token in media_ids:
            out += [value if media_value is None else media_value] * next(blocks_iter).shape[0]
        else:
            out.append(value)
    return out


def fused_labels(prompt: Prompt, blocks: Sequence[torch.Tensor], media_ids: set[int]) -> list[int]:
    """Labels of the fused sequence: each placeholder becomes its block's length of IGNORE_INDEX."""
    if prompt.labels is None:
        raise PromptError("the prompt has no labels; prepare it with training=True")
    return per_fused_position(prompt.input_ids, prompt.labels, blocks, media_ids, IGNORE_INDEX)


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype, shared: int | None = None) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) additive mask: 0 where query q may see key k, dtype min elsewhere.

    q sees k when k <= q and both are in the same segment, or k is in the ``shared`` segment (the prefix
    that independent turns share, :mod:`nvila.train.branches`).
    """
    L = segments.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()     # (L, L)
    allowed = segments[:, :, None] == segments[:, None, :]                          # (B, L, L)
    if shared is not None:
        allowed |= (segments == shared)[:, None, :]
    allowed &= causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def check_attention(model: Any) -> None:
    """The dense 4D mask is honoured only by some attention implementations and only without sliding windows."""
    cfg = model.llm.config
    impl = cfg._attn_implementation
    if impl not in MASKED_ATTENTION:
        raise ConfigError(
            f"packed batches and independent turns need an attention implementation that takes a 4D mask "
            f"({', '.join(MASKED_ATTENTION)}); the LLM uses {impl!r}. Load it with attn_implementation='sdpa', "
            "or train without packing / independent turns"
        )
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        # one 4D mask is handed to every layer, so sliding-window layers would silently attend too far
        raise ConfigError("packed batches do not support LLMs with sliding-window attention layers; "
                          "train this model without packing")
