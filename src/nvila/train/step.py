"""From labelled prompts to a batch: fuse media into embeddings and right-pad (the loss: nvila.train.loss).

Placeholders expand to media embeddings whose labels are IGNORE_INDEX, so the labels stay aligned with
the fused sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nvila.formats.plans import IGNORE_INDEX, Prompt
from nvila.train.branches import PAD, PREFIX, branch_positions, fused_branches
from nvila.train.features import media_blocks
from nvila.train.fused import block_causal_mask, check_attention, fused_labels


def collate(model: Any, prompts: Sequence[Prompt], features: Any = None) -> dict[str, torch.Tensor]:
    """Embed and right-pad a batch: inputs_embeds (B, L, D), attention_mask, position_ids, labels (B, L).

    The attention mask is (B, L) 0/1 padding, or, when a prompt has independent turns
    (:mod:`nvila.train.branches`), a (B, 1, L, L) additive mask that keeps every turn to itself.
    ``features``: a :class:`nvila.train.features.FeatureCache` supplying the frozen tower's tokens.
    """
    media_ids = set(model.media_token_ids.values())
    branched = any(p.branch is not None for p in prompts)
    embeds, labels, branches = [], [], []
    for prompt in prompts:
        blocks = media_blocks(model, prompt.media, features)
        embeds.append(model.fuse(prompt.input_ids, blocks))
        labels.append(fused_labels(prompt, blocks, media_ids))
        if branched:
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
    check_attention(model)
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
