"""Autoregressive decoding over fused embeddings: prefill, one decode step, sampling, streaming.

The LLM is a transformers causal LM used directly (not ``.generate``): prefill runs the fused media+text
embeddings once and keeps only the last position's logits; each decode step feeds one token per sequence
through the KV cache. A batch is left-padded, with explicit position ids so padding never shifts RoPE.
Prompts that share a prefix (several questions about one image) prefill that prefix once.
A sequence with a grammar (structured output, :mod:`nvila.grammar`) has its logits masked before sampling.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch

from nvila.base.errors import PromptError


class Constraint(Protocol):
    """What one sequence may generate next (a grammar's state, :class:`nvila.grammar.GrammarConstraint`)."""

    def mask(self, logits: torch.Tensor) -> None:
        """(V,) float logits of the sequence: tokens not allowed next set to -inf, in place."""

    def accept(self, token: int) -> None:
        """Advance past the token taken (one the mask allowed)."""


class Grammar(Protocol):
    """A compiled grammar (:class:`nvila.grammar.JsonGrammar`), shared by every sequence that uses it."""

    def constraint(self) -> Constraint:
        """A fresh state at the start of an answer."""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. ``temperature == 0`` means greedy (the reference default). ``grammar`` constrains
    the answer (structured output; ``Pipeline.response_grammar`` makes one); it is not a sampling setting,
    so rows that differ only in it still sample together."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise PromptError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PromptError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PromptError(f"top_k must be >= 0, got {self.top_k}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))


def left_pad(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """List of (L_i, D) -> inputs (B, L, D), attention mask (B, L), position ids (B, L)."""
    L = max(e.shape[0] for e in embeds)
    B, D = len(embeds), embeds[0].shape[1]
    x = embeds[0].new_zeros(B, L, D)
    mask = torch.zeros(B, L, dtype=torch.long, device=x.device)
    for b, e in enumerate(embeds):
        x[b, L - e.shape[0] :] = e
        mask[b, L - e.shape[0] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return x, mask, positions


@functools.lru_cache(maxsize=None)
def _cache_arg(cls: type) -> str:
    """The KV-cache keyword of a transformers model class: ``cache`` in newer releases (where
    ``past_key_values`` is deprecated and slated for removal), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _with_cache(llm: Any, cache: Any) -> dict[str, Any]:
    return {_cache_arg(type(llm)): cache}


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def prefill(llm: Any, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Run the prompt; returns last-position logits (B, V) float32 and the KV cache."""
    out = llm(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), _cache_of(out)


MIN_SHARED_PREFIX = 16    # shorter common prefixes are not worth a second forward call


def shared_prefix(embeds: Sequence[torch.Tensor]) -> int:
    """Length of the prefix all prompts of a batch share exactly (0 for a single prompt). The last position
    of every prompt is left out: it must run in the batched pass, which produces the first logits."""
    if len(embeds) < 2:
        return 0
    first, limit = embeds[0], min(e.shape[0] for e in embeds) - 1
    same = torch.ones(limit, dtype=torch.bool, device=first.device)
    for e in embeds[1:]:
        same &= (e[:limit] == first[:limit]).all(-1)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else limit


@torch.inference_mode()
def prefill_shared(
    llm: Any, embeds: Sequence[torch.Tensor], shared: int
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Prefill a batch whose prompts start with the same ``shared`` embeddings (questions about one image):
    the prefix runs once, its KV cache is repeated over the batch, then the suffixes run left-padded after it.

    Row b's cache is [prefix | padding | suffix b]: the padding sits between prefix and suffix, is masked
    out, and the position ids skip it, so every row computes exactly what its unpadded prompt would.
    Returns last-position logits (B, V), the cache, the attention mask (B, shared + S) and the position
    ids (B, shared + S) of the whole padded sequence.
    """
    B = len(embeds)
    prefix = embeds[0][:shared][None]
    out = llm(inputs_embeds=prefix, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    cache.batch_repeat_interleave(B)
    x, suffix_mask, suffix_pos = left_pad([e[shared:] for e in embeds])
    mask = torch.cat([suffix_mask.new_ones(B, shared), suffix_mask], dim=1)
    positions = torch.cat([torch.arange(shared, device=x.device).expand(B, shared), suffix_pos + shared], dim=1)
    out = llm(inputs_embeds=x, attention_mask=mask, position_ids=positions[:, shared:],
              use_cache=True, logits_to_keep=1, **_with_cache(llm, cache))
    return out.logits[:, -1].float(), _cache_of(out), mask, positions


@torch.inference_mode()
def decode_step(
    llm: Any, tokens: torch.Tensor, cache: Any, mask: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """One token per sequence (B,) at ``positions`` (B,) -> logits (B, V) float32 and the cache."""
    out = llm(
        input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
        use_cache=True, **_with_cache(llm, cache),
    )
    return out.logits[:, -1].float(), _cache_of(out)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids: argmax, or temperature / top-k / top-p sampling."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p   # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).flatten().to(logits.device)


@torch.inference_mode()
def apply_constraints(logits: torch.Tensor, constraints: Sequence[Constraint | None], done: Sequence[Any]) -> None:
    """Mask (B, V) logits in place: each running sequence with a constraint keeps only what it allows."""
    for b, c in enumerate(constraints):
        if c is not None and not done[b]:
            c.mask(logits[b])


@dataclass
class StepOutput:
    """Tokens produced in one step: ``tokens[b]`` is None for sequences already finished."""

    tokens: list[int | None]
    finished: list[str | None]      # finish reason per sequence once it ends: "stop" | "length"


def decode(
    llm: Any,
    embeds: Sequence[torch.Tensor],
    params: SamplingParams | Sequence[SamplingParams],
    stop_token_ids: Sequence[int],
    max_positions: int,
) -> Iterator[StepOutput]:
    """Generate for a batch of fused prompts; yields every step's new tokens.

    ``params`` is shared or given per sequence (a server batches requests with different settings).
    A sequence ends on a stop token (not emitted), after ``max_new_tokens``, or when it reaches
    ``max_positions`` (the model's context). Stop strings are handled by the caller, which can close the
    generator early. A sequence whose params carry a grammar samples from masked logits: only tokens that
    keep its answer valid, and once the answer is complete only the stop tokens.
    """
    per_seq = [params] * len(embeds) if isinstance(params, SamplingParams) else list(params)
    if len(per_seq) != len(embeds):
        raise ValueError(f"{len(per_seq)} sampling settings for {len(embeds)} sequences")
    lengths = [e.shape[0] for e in embeds]
    budget = [min(p.max_new_tokens, max_positions - n) for p, n in zip(per_seq, lengths)]
    if min(budget) < 1:
        raise PromptError(f"the prompt fills the whole context ({max(lengths)} of {max_positions} positions)")
    generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in per_seq]
    # one sampling call for the batch unless rows differ in settings or have their own seeded generator
    vectorized = len(embeds) == 1 or (all(p == per_seq[0] for p in per_seq) and all(g is None for g in generators))
    stops = set(stop_token_ids)
    constraints = [None if p.grammar is None else p.grammar.constraint() for p in per_seq]
    shared = shared_prefix(embeds)
    if shared >= MIN_SHARED_PREFIX:
        logits, cache, mask, positions = prefill_shared(llm, embeds, shared)
    else:
        x, mask, positions = left_pad(embeds)
        logits, cache = prefill(llm, x, mask, positions)
    pos = positions[:, -1]
    done: list[str | None] = [None] * len(embeds)
    for step in range(max(budget)):
        apply_constraints(logits, constraints, done)
        if vectorized:
            tokens = sample(logits, per_seq[0], generators[0])
        else:
            tokens = torch.cat([sample(logits[b : b + 1], p, g) for b, (p, g) in enumerate(zip(per_seq, generators))])
        out: list[int | None] = []
        for b, t in enumerate(tokens.tolist()):
            if done[b] or t in stops:
                done[b] = done[b] or "stop"
                out.append(None)
            else:
                out.append(t)
                if constraints[b] is not None:
                    constraints[b].accept(t)
                if step + 1 >= budget[b]:
                    done[b] = "length"
        yield StepOutput(out, list(done))
        if all(done):
            return
        pos = pos + 1
        mask = torch.cat([mask, mask.new_ones(len(embeds), 1)], dim=1)
        logits, cache = decode_step(llm, tokens, cache, mask, pos)


@dataclass
class TextStep:
    """One decoding step as text: per sequence the token taken (None once finished or on a stop token),
    the text that became final (the tail is flushed in the step a sequence ends), and the finish reason."""

    tokens: list[int | None]
    pieces: list[str]
    finished: list[str | None]


def decode_text(
    llm: Any,
    tokenizer: Any,
    embeds: Sequence[torch.Tensor],
    params: SamplingParams | Sequence[SamplingParams],
    stop_token_ids: Sequence[int],
    max_positions: int,
) -> Iterator[TextStep]:
    """:func:`decode` plus detokenization and stop strings: the one loop behind chat, stream and serve.

    A sequence whose text reaches one of its stop strings ends with reason "stop" (its text is cut before
    the stop string); the generator ends once every sequence has ended.
    """
    per_seq = [params] * len(embeds) if isinstance(params, SamplingParams) else list(params)
    streams = [TextStream(tokenizer, p.stop) for p in per_seq]
    done: list[str | None] = [None] * len(embeds)
    steps = decode(llm, embeds, per_seq, stop_token_ids, max_positions)
    try:
        for step in steps:
            tokens: list[int | None] = []
            pieces: list[str] = []
            for b, stream in enumerate(streams):
                token = None if done[b] else step.tokens[b]
                piece = stream.push(token) if token is not None else ""
                if not done[b]:
                    done[b] = "stop" if stream.stopped else step.finished[b]
                    if done[b]:
                        piece += stream.finish()
                tokens.append(token)
                pieces.append(piece)
            yield TextStep(tokens, pieces, list(done))
            if all(done):
                return
    finally:
        steps.close()


class TextStream:
    """Incremental detokenizer: feed ids, get the new text; holds back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""          # text emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one id; returns the newly finished text (may be empty)."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""                                    # wait for the rest of a multi-byte character
        for s in self.stop:
            cut = full.find(s)
            if cut >= 0:
                full, self.stopped = full[:cut], True
        # hold back a suffix that may be the start of a stop string
        hold = 0 if self.stopped else max((_overlap(full, s) for s in self.stop), default=0)
        new = full[len(self.text) : len(full) - hold]
        self.text += new
        return new

    def finish(self) -> str:
        """Flush held-back text at the end of generation."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = full[len(self.text) :]
        self.text = full
        return new


class Trim:
    """Strip a text stream's leading whitespace and hold trailing whitespace until more text follows,
    so streamed pieces concatenate to exactly ``full_text.strip()``."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def push(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        piece = self.pending + piece
        body = piece.rstrip()
        self.pending = piece[len(body):]
        return body


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
