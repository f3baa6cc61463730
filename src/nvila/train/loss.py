"""The log-probability of answers: the one computation behind the training loss and DeltaLoss scores.

:func:`answer_token_logprobs` runs the decoder over a collated batch (:mod:`nvila.train.step`,
:mod:`nvila.train.packing`) and the LM head on supervised positions only, in float32: answers are a small
share of a multimodal sequence, full-vocabulary logits for every position would dominate time and memory,
and CPU bf16 GEMMs that contract over the vocabulary (the head's backward) fall off the fast kernels.
:func:`answer_loss` sums it into the training loss, :func:`answer_logprobs` into per-prompt scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nvila.base.errors import PromptError
from nvila.formats.plans import IGNORE_INDEX, Prompt
from nvila.train.packing import collate_packed, plan_packs
from nvila.train.step import collate

HEAD_ROWS = 512   # supervised positions per LM-head call: bounds the (rows, vocabulary) float32 logits


class HeadLogits(torch.autograd.Function):
    """``h @ W.T`` in float32 for a weight stored in any dtype, upcast one vocabulary chunk at a time in both
    passes, so a bf16 LM head never has a whole float32 copy alive (151648 x 1536 would be 0.9 GB)."""

    CHUNK = 16384

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:   # (n, D), (V, D) -> (n, V)
        ctx.save_for_backward(h, weight)
        return torch.cat([h @ w.float().T for w in weight.split(HeadLogits.CHUNK)], dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h, weight = ctx.saved_tensors
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = sum(g @ w.float() for g, w in zip(grad.split(HeadLogits.CHUNK, dim=1), weight.split(HeadLogits.CHUNK)))
        if ctx.needs_input_grad[1]:
            grad_w = (grad.T @ h).to(weight.dtype)
        return grad_h, grad_w


def answer_token_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) of every supervised token of a collated batch (float32, (n,)) and its batch row ((n,)).

    Position t predicts token t + 1; labels IGNORE_INDEX carry no loss. Differentiable.
    """
    llm = model.llm
    hidden = llm.get_decoder()(inputs_embeds=batch["inputs_embeds"], attention_mask=batch.get("attention_mask"),
                               position_ids=batch["position_ids"], use_cache=False).last_hidden_state  # (B, L, D)
    targets = batch["labels"][:, 1:]                                                                   # (B, L-1)
    supervised = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][supervised], targets[supervised]                                             # (n, D), (n,)
    head = llm.get_output_embeddings()
    pieces = []
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, y.shape[0], HEAD_ROWS):
            logits = HeadLogits.apply(h[s : s + HEAD_ROWS].float(), head.weight)                       # (rows, V)
            if head.bias is not None:
                logits = logits + head.bias.float()
            pieces.append(logits.log_softmax(-1).gather(1, y[s : s + HEAD_ROWS, None])[:, 0])         # (rows,)
    token_logp = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
    return token_logp, supervised.nonzero()[:, 0]


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised tokens of a batch, and their count.

    The trainer divides the sum by the token count of the whole global batch, so every supervised token
    weighs the same however the batch is split over micro-batches and processes.
    """
    token_logp, _ = answer_token_logprobs(model, batch)
    return -token_logp.sum(), int(token_logp.shape[0])


def answer_logprobs(model: Any, prompts: Sequence[Prompt]) -> list[tuple[float, int]]:
    """Summed log-probability of each labelled prompt's answer tokens, and their count (no gradients).

    Right padding never changes a sequence's scores, so the batch size is only a speed knob.
    """
    with torch.inference_mode():
        token_logp, rows = answer_token_logprobs(model, collate(model, prompts))
        sums = torch.zeros(len(prompts), dtype=torch.float64, device=token_logp.device)
        sums.index_add_(0, rows, token_logp.double())                                                 # (B,)
        counts = torch.bincount(rows, minlength=len(prompts))
        return [(float(v), int(c)) for v, c in zip(sums.tolist(), counts.tolist())]


class LossModule(nn.Module):
    """What DDP/FSDP wrap: labelled prompts -> (summed token cross-entropy, supervised tokens)."""

    def __init__(self, model: nn.Module, packing: bool, max_length: int, features: Any = None) -> None:
        super().__init__()
        self.model = model
        self.packing = packing
        self.max_length = max_length
        self.features = features            # a FeatureCache: the frozen tower's tokens, computed once

    def forward(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, int]:
        if self.packing:
            batch = collate_packed(self.model, prompts, plan_packs([p.fused_length for p in prompts], self.max_length),
                                   self.features)
        else:
            batch = collate(self.model, prompts, self.features)
        return answer_loss(self.model, batch)


def supervised_tokens(prompt: Prompt) -> int:
    """Tokens of a labelled prompt that carry loss (known before the model runs)."""
    if prompt.labels is None:
        raise PromptError("the prompt has no labels; prepare it with training=True")
    return sum(1 for label in prompt.labels[1:] if label != IGNORE_INDEX)
