"""The CPU fast path (bf16 + single-row decode kernel): same function, measured deviation from fp32."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nvila
from conftest import CHECKPOINTS, OUTPUTS, case_messages, fixture_cases
from nvila.model.fast import DecodeLinear, use_decode_linear

CASES = fixture_cases()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_linear_equals_linear(bias: bool, rows: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias).bfloat16()
    x = torch.randn(rows, 1, 96).bfloat16()
    ref = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    fast = nn.Linear(96, 40, bias=bias).bfloat16()
    fast.load_state_dict(lin.state_dict())
    assert use_decode_linear(fast) == 1 and isinstance(fast, DecodeLinear)
    out = fast(x)
    assert out.shape == (rows, 1, 40) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)   # bf16 output rounding
    assert torch.equal(fast.weight, lin.weight)


@pytest.mark.parametrize("fast", [True, False])
def test_lm_head_gets_a_contiguous_input(fast: bool) -> None:
    """Last-position logits of a batch arrive as a strided view; the head multiplies a contiguous copy."""
    pipe = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32", device="cpu", fast=fast)
    head = pipe.model.llm.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    hidden = torch.randn(3, 5, head.in_features)
    strided = hidden[:, -1:, :]
    assert not strided.is_contiguous()
    out = head(strided)
    assert seen == [True]
    torch.testing.assert_close(out, F.linear(hidden[:, -1:, :].contiguous(), head.weight, head.bias))


def test_swap_keeps_parameters_and_ties() -> None:
    pipe = nvila.load(CHECKPOINTS / "nvila-lite", dtype="bfloat16", device="cpu", fast=True)
    llm = pipe.model.llm
    assert all(type(m) is not nn.Linear for m in llm.modules())
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    plain = nvila.load(CHECKPOINTS / "nvila-lite", dtype="bfloat16", device="cpu", fast=False)
    assert set(plain.model.llm.state_dict()) == set(llm.state_dict())


def _greedy_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("variant", ["nvila", "nvila-lite", "nvila-video"])
def test_fast_path_tracks_references(variant: str) -> None:
    """Measured deviation of the fast path (documented in the README):

    * against plain bf16 (F.linear everywhere) the decode kernel changes only bf16 rounding: prefill logits
      are identical and greedy tokens agree;
    * against the fp32 reference fixtures, bf16 weights/activations move logits by up to ~0.6 on these
      random models (logit range +-20); the first greedy token matches in at least 12 of 13 cases, later
      tokens drift where top-2 margins are tiny (down to 0.005), which no bf16 path can follow exactly.
    """
    fast = nvila.load(CHECKPOINTS / variant, dtype="bfloat16", device="cpu", fast=True)
    eager = nvila.load(CHECKPOINTS / variant, dtype="bfloat16", device="cpu", fast=False)
    first, worst, agree, total = 0, 0.0, 0, 0
    for case, spec in CASES.items():
        if not case.startswith(variant + "/"):
            continue
        messages = case_messages(spec)
        ref = np.load(OUTPUTS / f"{case}.npz")["last_logits"]
        logits = fast.next_token_logits(messages)
        assert torch.equal(logits, eager.next_token_logits(messages))
        worst = max(worst, float(np.abs(logits.numpy() - ref).max()))
        first += int(int(logits.argmax()) == int(ref.argmax()))
        a = fast.generate(messages, max_new_tokens=8).output_token_ids
        b = eager.generate(messages, max_new_tokens=8).output_token_ids
        agree, total = agree + _greedy_prefix(a, b), total + len(b)
    assert worst < 1.0, f"max |logit - fp32 reference| = {worst:.3f}"
    assert first >= 12, f"first greedy token matches the fp32 reference in only {first}/13 cases"
    assert agree / total >= 0.75, f"fast vs plain bf16 greedy agreement {agree}/{total}"
