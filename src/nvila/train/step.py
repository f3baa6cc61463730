"""From labelled prompts to a training loss: fuse media into embeddings, right-pad, causal LM loss.

Placeholders expand to media embeddings whose labels are IGNORE_INDEX, so the labels stay aligned with
the fused sequence. The LLM computes the usual shifted cross-entropy over supervised tokens, averaged
over every supervised token of the batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from nvila.errors import PromptError
from nvila.processing.processor import IGNORE_INDEX, Prompt


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


def collate(model: Any, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
    """Embed and right-pad a batch: inputs_embeds (B, L, D), attention_mask, position_ids, labels (B, L).

    The attention mask is (B, L) 0/1 padding, or, when a prompt has independent turns
    (:mod:`nvila.train.branches`), a (B, 1, L, L) additive mask that keeps every turn to itself.
    """
    media_ids = set(model.media_token_ids.values())
    branched = any(p.branch is not None for p in prompts)
    embeds, labels, branches = [], [], []
    for prompt in prompts:
        blocks = model.embed_media(prompt.media)
        embeds.append(model.fuse(prompt.input_ids, blocks))
        labels.append(fused_labels(prompt, blocks, media_ids))
        if branched:
            from nvila.train.branches import fused_branches

            # a prompt without turns is one branch: plain causal attention
            branches.append(fused_branches(prompt, blocks, media_ids) if prompt.branch is not None
                            else [0] * embeds[-1].shape[0])
    if branched:
        return _collate_branched(model, embeds, labels, branches)
    L = max(e.shape[0] for e in embeds)
    B, D = len(embeds), embeds[0].shape[1]
    x = embeds[0].new_zeros(B, L, D)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=x.device)
    mask = torch.zeros(B, L, dtype=torch.long, device=x.device)
    for b, (e, y) in enumerate(zip(embeds, labels)):
        x[b, : e.shape[0]] = e
        lab[b, : len(y)] = torch.tensor(y, device=x.device)
        mask[b, : e.shape[0]] = 1
    positions = torch.arange(L, device=x.device).expand(B, L)
    return {"inputs_embeds": x, "attention_mask": mask, "position_ids": positions, "labels": lab}


def _collate_branched(model: Any, embeds: list[torch.Tensor], labels: list[list[int]],
                      branches: list[list[int]]) -> dict[str, torch.Tensor]:
    from nvila.train.branches import PAD, PREFIX, branch_positions
    from nvila.train.packing import _check_attention, block_causal_mask

    _check_attention(model)
    L = max(e.shape[0] for e in embeds)
    B, D = len(embeds), embeds[0].shape[1]
    x = embeds[0].new_zeros(B, L, D)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=x.device)
    seg = torch.full((B, L), PAD, dtype=torch.long, device=x.device)
    positions = torch.zeros(B, L, dtype=torch.long, device=x.device)
    for b, (e, y, br) in enumerate(zip(embeds, labels, branches)):
        n = e.shape[0]
        x[b, :n] = e
        lab[b, :n] = torch.tensor(y, device=x.device)
        seg[b, :n] = torch.tensor(br, device=x.device)
        positions[b, :n] = torch.tensor(branch_positions(br), device=x.device)
        positions[b, n:] = torch.arange(L - n, device=x.device)
    return {"inputs_embeds": x, "attention_mask": block_causal_mask(seg, x.dtype, shared=PREFIX), "position_ids": positions,
            "labels": lab}


def lm_loss(model: Any, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy over supervised tokens (``mean`` or ``sum``), and their count.

    The trainer uses ``sum`` and divides by the token count of the whole global batch, so every
    supervised token weighs the same however the batch is split over micro-batches and processes.
    """
    logits = model.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits      # (B, L, V)
    targets = batch["labels"][:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    if n == 0:
        raise PromptError("the batch has no supervised tokens (no assistant answers)")
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)
    return loss, n


def supervised_tokens(prompt: Prompt) -> int:
    """Tokens of a labelled prompt that carry loss (known before the model runs)."""
    if prompt.labels is None:
        raise PromptError("the prompt has no labels; prepare it with training=True")
    return sum(1 for label in prompt.labels[1:] if label != IGNORE_INDEX)
