"""Sequence packing: several labelled prompts share one row of the batch, isolated from each other.

As in the NVILA reference, packed samples are concatenated along the sequence axis and the first label of
every sample is IGNORE_INDEX, so no token is trained to predict across a sample boundary. On top of that
each sample sees only itself: ``position_ids`` restart at 0 for every sample (RoPE then sees each sample
exactly as when alone), and the attention mask is an explicit 4D block-diagonal causal mask
(:func:`nvila.train.fused.block_causal_mask`, which says why it must be explicit). Padding at the end of a
row is its own segment (attending causally to itself), so no query row of the mask is fully masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nvila.base.errors import ConfigError, PromptError
from nvila.formats.plans import IGNORE_INDEX, Prompt
from nvila.train.features import media_blocks
from nvila.train.fused import block_causal_mask, check_attention, fused_labels


def plan_packs(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices into rows whose summed lengths are <= ``max_length``.

    Greedy first-fit over the given order: each sample goes into the first row that still has room, else
    it opens a new row. It is deterministic, rows come out in the order they were opened and indices inside
    a row ascend, so a shuffled order given by the caller stays (nearly) intact while short samples fill
    gaps left earlier. ``lengths`` are fused lengths (``Prompt.fused_length``). A sample longer than
    ``max_length`` raises: truncating or skipping is the caller's decision, never a silent drop here.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    rows: list[list[int]] = []
    room: list[int] = []                                   # free length of each row, parallel to rows
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PromptError(f"sample {i} has length {n!r}; lengths must be positive integers")
        if n > max_length:
            raise PromptError(
                f"sample {i} has {n} fused positions but a packed row holds at most {max_length}; "
                "truncate or skip it before packing, or raise max_length"
            )
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def collate_packed(model: Any, prompts: Sequence[Prompt], packs: list[list[int]],
                   features: Any = None) -> dict[str, torch.Tensor]:
    """Embed ``prompts`` and lay them out one row per pack, right-padded to the longest row.

    Returns the keys of ``nvila.train.step.collate``, so the loss takes the result as is:
    inputs_embeds (B, L, D), attention_mask (B, 1, L, L) additive float block-diagonal causal mask in the
    embeddings' dtype, position_ids (B, L) restarting at 0 for every sample (and for the padding), and
    labels (B, L) with IGNORE_INDEX at the first position of every sample and on padding. B = len(packs).
    ``features``: as for ``collate``.
    """
    check_attention(model)
    _check_packs(packs, len(prompts))
    media_ids = set(model.media_token_ids.values())
    rows = []                                              # per row: [(embeds (n, D), labels), ...]
    for pack in packs:
        row = []
        for i in pack:
            blocks = media_blocks(model, prompts[i].media, features)
            labels = fused_labels(prompts[i], blocks, media_ids)
            labels[0] = IGNORE_INDEX                       # the previous sample's last token must not predict it
            row.append((model.fuse(prompts[i].input_ids, blocks), labels))
        rows.append(row)
    first = rows[0][0][0]
    B, L, D = len(rows), max(sum(e.shape[0] for e, _ in row) for row in rows), first.shape[1]
    x = first.new_zeros(B, L, D)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=x.device)
    positions = torch.zeros(B, L, dtype=torch.long, device=x.device)
    segments = torch.zeros(B, L, dtype=torch.long, device=x.device)   # sample number inside the row
    for b, row in enumerate(rows):
        start = 0
        for s, (e, y) in enumerate(row):
            n = e.shape[0]
            x[b, start : start + n] = e
            lab[b, start : start + n] = torch.tensor(y, device=x.device)
            positions[b, start : start + n] = torch.arange(n, device=x.device)
            segments[b, start : start + n] = s
            start += n
        # the padding is one more segment: it attends to itself, so no mask row is empty
        positions[b, start:] = torch.arange(L - start, device=x.device)
        segments[b, start:] = len(row)
    return {"inputs_embeds": x, "attention_mask": block_causal_mask(segments, x.dtype),
            "position_ids": positions, "labels": lab}


def _check_packs(packs: list[list[int]], n_prompts: int) -> None:
    if not packs:
        raise PromptError("no packs given: collate_packed needs at least one row")
    seen: set[int] = set()
    for r, pack in enumerate(packs):
        if not pack:
            raise PromptError(f"pack {r} is empty")
        for i in pack:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_prompts:
                raise PromptError(f"pack {r} names sample {i!r}, but there are {n_prompts} prompts")
            if i in seen:
                raise PromptError(f"sample {i} appears in more than one place of the packs")
            seen.add(i)
