"""Parity with the reference implementation on every official fixture case (float32, CPU).

For each case the reference recorded the prompt token ids, the number of spliced media embeddings, the
last-position logits and 16 greedy tokens (tests/fixtures/official/outputs). We must reproduce the ids and
counts exactly, the logits within 1e-4 and the greedy tokens exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import OUTPUTS, case_messages, fixture_cases, fixture_pipeline

CASES = fixture_cases()


def _reference(case: str) -> tuple[dict, dict]:
    return json.loads((OUTPUTS / f"{case}.json").read_text()), dict(np.load(OUTPUTS / f"{case}.npz"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_counts(case: str) -> None:
    spec = CASES[case]
    ref, arrays = _reference(case)
    pipe = fixture_pipeline(case.split("/")[0])
    messages = case_messages(spec)
    prompt = pipe.prepare(messages)
    assert prompt.input_ids == ref["prompt"]["input_ids"]
    assert prompt.num_media_embeddings == ref["num_visual_tokens"]
    assert prompt.fused_length == ref["prefill"]["seq_len"]
    logits = pipe.next_token_logits(messages).numpy()
    assert logits.shape == arrays["last_logits"].shape
    err = float(np.abs(logits - arrays["last_logits"]).max())
    assert err < 1e-4, f"{case}: max |logit error| {err:.2e}"
    assert int(logits.argmax()) == ref["prefill"]["last_logits_argmax"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens(case: str) -> None:
    ref, _ = _reference(case)
    pipe = fixture_pipeline(case.split("/")[0])
    out = pipe.generate(case_messages(CASES[case]), max_new_tokens=16)
    assert out.output_token_ids == ref["generation"]["output_ids"]
    assert out.text == ref["generation"]["response"]
    assert out.finish_reason == "length"


def test_every_fixture_case_is_covered() -> None:
    assert len(CASES) == 39
    assert {c.split("/")[0] for c in CASES} == {"nvila", "nvila-lite", "nvila-video"}
