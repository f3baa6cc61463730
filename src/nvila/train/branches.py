"""Independent turns: a conversation of several questions about the same media, trained as that many
single-turn prompts that share one prefix.

VQA data often asks many questions about one image. Training them as one multi-turn conversation is
cheap (one image, one set of visual tokens, ~10 answers) but teaches the wrong thing for a model that is
asked one question at a time: later turns can read their answer off earlier ones ("what is the blue
shape?" tells a later "what color is the shape?" the answer), so the model learns to copy from the
conversation instead of looking at the image. Single-turn prompts fix that at ~4x the LLM tokens.

A branched prompt keeps the cost and the single-turn semantics. Each turn i is first built as its own
single-turn conversation ``[system] + user(media + question_i) + assistant(answer_i)`` by the normal
processor; all of them share a token prefix (system prompt, user header, media placeholders), stored
once, followed by every turn's remaining tokens::

    input_ids   [ prefix ........ | suffix_0 ...... | suffix_1 ...... | ... ]
    branch      [ -1 -1 ... -1    | 0 0 ... 0       | 1 1 ... 1       | ... ]

In training, token q attends to token k when k <= q and k is in the prefix or in q's own branch (the
``shared`` segment of :func:`nvila.train.fused.block_causal_mask`), and
each branch's positions continue from the end of the prefix, so every branch sees exactly its
single-turn prompt (tested: the loss equals the single-turn prompts' summed loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from nvila.base.errors import PromptError
from nvila.formats.plans import IGNORE_INDEX, Prompt
from nvila.train.fused import per_fused_position

MEDIA_TYPES = ("image", "video")
PREFIX = -1                  # branch id of the shared prefix
PAD = -2                     # branch id of padding: a segment of its own


def single_turns(messages: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split a conversation into single-turn conversations, each with the first user turn's media.

    Messages: optional system messages, then alternating user / assistant turns. Media may appear only in
    the first user turn (the shared prefix).
    """
    system = [m for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) < 2 or len(turns) % 2:
        raise PromptError("independent turns need alternating user/assistant turns, ending with an answer")
    media: list[dict[str, Any]] = []
    out = []
    for i in range(0, len(turns), 2):
        user, answer = turns[i], turns[i + 1]
        if user.get("role") != "user" or answer.get("role") != "assistant":
            raise PromptError(f"turns {i} and {i + 1} are not a user question followed by an assistant answer")
        content = user.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        turn_media = [p for p in parts if isinstance(p, dict) and p.get("type") in MEDIA_TYPES]
        if i == 0:
            media = turn_media
        elif turn_media:
            raise PromptError("independent turns need every image/video in the first question (the shared prefix); "
                              f"question {i // 2 + 1} has its own")
        text = [p for p in parts if not (isinstance(p, dict) and p.get("type") in MEDIA_TYPES)]
        out.append(system + [{"role": "user", "content": media + text}, answer])
    return out


def branched_prompt(processor: Any, messages: Sequence[dict[str, Any]]) -> Prompt:
    """The single-turn training prompts of ``messages`` sharing their common prefix (one Prompt)."""
    with processor.reusing_media():     # the turns share their media: read and tile each once
        singles = [processor(conv, training=True) for conv in single_turns(messages)]
    if len(singles) == 1:
        return singles[0]
    first = singles[0].input_ids
    n = min(len(s.input_ids) for s in singles)
    common = next((j for j in range(n) if any(s.input_ids[j] != first[j] for s in singles)), n)
    media_ids = {processor.image_token_id, processor.video_token_id}
    last_media = max((j for j, t in enumerate(first) if t in media_ids), default=-1)
    if last_media >= common:
        raise PromptError("the single-turn prompts do not share their media placeholders; cannot branch them")
    if any(len(s.input_ids) == common for s in singles):
        raise PromptError("a turn adds no tokens after the shared prefix; cannot branch it")
    ids, labels, branch = list(first[:common]), list(singles[0].labels[:common]), [PREFIX] * common
    if any(label != IGNORE_INDEX for label in labels):
        raise PromptError("the shared prefix of the turns contains answer tokens; cannot branch them")
    for k, s in enumerate(singles):
        suffix = s.input_ids[common:]
        ids += suffix
        # a branch's first token follows the previous branch in the row: it must not be a target
        labels += [IGNORE_INDEX] + list(s.labels[common + 1:])
        branch += [k] * len(suffix)
    return replace(singles[0], input_ids=ids, labels=labels, text="".join(s.text for s in singles), branch=branch)


def fused_branches(prompt: Prompt, blocks: Sequence[torch.Tensor], media_ids: set[int]) -> list[int]:
    """The branch id of every fused position (media expanded; all media lie in the prefix)."""
    assert prompt.branch is not None
    return per_fused_position(prompt.input_ids, prompt.branch, blocks, media_ids)


def branch_positions(branch: Sequence[int]) -> list[int]:
    """Positions: 0.. over the prefix, then every branch continues from the prefix's end."""
    prefix = sum(1 for b in branch if b == PREFIX)
    seen: dict[int, int] = {}
    out = []
    for i, b in enumerate(branch):
        if b == PREFIX:
            out.append(i)
        else:
            out.append(prefix + seen.get(b, 0))
            seen[b] = seen.get(b, 0) + 1
    return out

