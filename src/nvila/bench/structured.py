"""Decode speed with and without a JSON schema (``nvila bench --json-schema FILE``): what the grammar mask costs.

One model is loaded once; each round decodes the same prefilled prompt twice, free and constrained by the
schema (``response_format``), in alternating order, so a machine whose speed drifts slows both alike.
Decode tokens/s counts the steps after the first token (prefill excluded), through ``Pipeline.decode``,
the loop the API and the server use: the constrained figure includes filling and applying the mask.
Medians over ``runs`` rounds after ``warmup`` untimed ones. Also timed: compiling the schema (first use)
and looking it up again (the cache).
"""

from __future__ import annotations

import importlib.metadata
import statistics
import time
from typing import Any

from nvila import api
from nvila.base.errors import ConfigError
from nvila.base.files import write_json
from nvila.base.provenance import provenance
from nvila.bench.timing import SETUPS
from nvila.generate import SamplingParams


class _TimedGrammar:
    """A grammar whose constraints add the time they spend masking and accepting to ``seconds``: the grammar's
    own share of each step, measured directly (the difference of two decode rates is noisier)."""

    def __init__(self, grammar: Any) -> None:
        self.grammar, self.seconds, self.steps = grammar, 0.0, 0

    def constraint(self) -> _TimedConstraint:
        return _TimedConstraint(self, self.grammar.constraint())


class _TimedConstraint:
    def __init__(self, owner: _TimedGrammar, inner: Any) -> None:
        self.owner, self.inner = owner, inner

    def mask(self, logits: Any) -> None:
        t = time.perf_counter()
        self.inner.mask(logits)
        self.owner.seconds += time.perf_counter() - t
        self.owner.steps += 1

    def accept(self, token: int) -> None:
        t = time.perf_counter()
        self.inner.accept(token)
        self.owner.seconds += time.perf_counter() - t


def _decode_rate(pipe: Any, embeds: Any, params: SamplingParams) -> tuple[float, int, str]:
    """(decode tokens/s after the first token, tokens generated, text) of one answer."""
    stamps, tokens, text = [], 0, ""
    for step in pipe.decode([embeds], params):
        stamps.append(time.perf_counter())
        tokens += step.tokens[0] is not None
        text += step.pieces[0]
    if len(stamps) < 2:
        raise ConfigError("the answer ended after its first token: nothing to time (raise --new-tokens or use a "
                          "schema with a free-text string)")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens, text


def bench_structured(model: str, response_format: dict[str, Any], messages: list[dict[str, Any]],
                     media_options: dict[str, Any], setup: str = "auto", device: str = "cpu", runs: int = 5,
                     warmup: int = 1, new_tokens: int = 64) -> dict[str, Any]:
    """Medians of decode tokens/s free and constrained by ``response_format``, their ratio, the per-token cost
    of the mask, and the schema's compile and cached-lookup times; with the provenance of the run."""
    if setup not in SETUPS:
        raise ConfigError(f"unknown setup {setup!r}; known: {sorted(SETUPS)}")
    pipe = api.load(model, device=device, **SETUPS[setup])
    t0 = time.perf_counter()
    grammar = pipe.response_grammar(response_format)
    t1 = time.perf_counter()
    pipe.response_grammar(response_format)                  # the cache's answer
    t2 = time.perf_counter()
    if grammar is None:
        raise ConfigError("the benchmark needs a JSON response_format, not free text")
    embeds = pipe.embed(pipe.prepare(messages, **media_options))
    timed = _TimedGrammar(grammar)
    params = {"free": SamplingParams(max_new_tokens=new_tokens),
              "schema": SamplingParams(max_new_tokens=new_tokens, grammar=timed)}
    rates: dict[str, list[float]] = {"free": [], "schema": []}
    tokens: dict[str, list[int]] = {"free": [], "schema": []}
    grammar_ms: list[float] = []
    sample = {}
    for round_ in range(warmup + runs):
        for label in ("free", "schema") if round_ % 2 == 0 else ("schema", "free"):
            timed.seconds, timed.steps = 0.0, 0
            rate, n, text = _decode_rate(pipe, embeds, params[label])
            if round_ >= warmup:
                rates[label].append(rate)
                tokens[label].append(n)
                if label == "schema":
                    grammar_ms.append(1e3 * timed.seconds / timed.steps)
            sample[label] = text
    free, constrained = (statistics.median(rates[k]) for k in ("free", "schema"))
    return {
        "decode_tokens_per_s": {"free": free, "schema": constrained},
        "schema_vs_free": constrained / free,
        "grammar_ms_per_token": statistics.median(grammar_ms),       # mask + accept, timed inside the loop
        "step_ms": {"free": 1e3 / free, "schema": 1e3 / constrained},
        "compile_s": t1 - t0,
        "cached_lookup_s": t2 - t1,
        "tokens_per_answer": {k: statistics.median(v) for k, v in tokens.items()},
        "runs": {"rates": rates, "tokens": tokens},
        "logits_width": grammar.vocab_size,
        "tokenizer_tokens": len(pipe.tokenizer),
        "prompt_length": int(embeds.shape[0]),
        "answers": sample,
        "provenance": provenance(model=model, setup=setup, device=device, response_format=response_format,
                                 messages=messages, runs=runs, warmup=warmup, new_tokens=new_tokens,
                                 xgrammar=importlib.metadata.version("xgrammar")),
    }


def print_structured(result: dict[str, Any]) -> None:
    """The comparison as a small table."""
    rates = result["decode_tokens_per_s"]
    print("decode tokens/s (median)   free      schema    schema/free")
    print(f"                           {rates['free']:<9.2f} {rates['schema']:<9.2f} {result['schema_vs_free']:.3f}")
    print(f"grammar work per token (mask + accept): {result['grammar_ms_per_token']:.3f} ms of a "
          f"{result['step_ms']['schema']:.1f} ms step; schema compile: {result['compile_s'] * 1e3:.1f} ms "
          f"(cached lookup {result['cached_lookup_s'] * 1e6:.0f} us); logits width {result['logits_width']}")


def run(model: str, response_format: dict[str, Any], messages: list[dict[str, Any]], media_options: dict[str, Any],
        json_out: str | None = None, **options: Any) -> dict[str, Any]:
    """Measure, print, and write the JSON (with provenance) to ``json_out``."""
    result = bench_structured(model, response_format, messages, media_options, **options)
    print_structured(result)
    if json_out:
        write_json(json_out, result)
        print(f"wrote {json_out}")
    return result
