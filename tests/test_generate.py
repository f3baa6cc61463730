"""Decoding: KV cache vs full forwards, batching vs single runs, sampling, stop handling, streaming, limits.

References: plain full forwards of the transformers LLM without a cache (recomputed here with a python loop),
the reference's recorded greedy tokens / responses / last logits (tests/fixtures/official/outputs), the
tokenizer's own ``decode``, and distributions whose allowed support is known in closed form.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import OUTPUTS, VARIANTS, case_messages, fixture_cases, fixture_pipeline

from nvila import generate
from nvila.base.errors import PromptError
from nvila.generate import SamplingParams, TextStream, decode_step, left_pad, prefill, sample, shared_prefix

CASES = fixture_cases()


def _ref(case: str) -> dict:
    return json.loads((OUTPUTS / f"{case}.json").read_text())


def _messages(case: str) -> list[dict]:
    return case_messages(CASES[case])


# ---- KV cache == full forward -----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["nvila/img_china_800x600", "nvila-lite/img_hopper_gray_320x480"])
def test_kv_cache_decoding_equals_full_forwards(case: str) -> None:
    n = 12
    pipe = fixture_pipeline(case.split("/")[0])
    messages = _messages(case)
    out = pipe.generate(messages, max_new_tokens=n)
    assert len(out.output_token_ids) == n and out.finish_reason == "length"

    llm = pipe.model.llm
    embeds = pipe.embed(pipe.prepare(messages))                    # (L, D)
    table = llm.get_input_embeddings()

    # our cached path, step by step
    x, mask, pos = left_pad([embeds])
    logits, cache = prefill(llm, x, mask, pos)
    cached_logits, cached_tokens = [logits[0]], []
    p = pos[:, -1]
    for _ in range(n):
        tok = logits.argmax(-1)
        cached_tokens.append(int(tok))
        if len(cached_tokens) == n:
            break
        p = p + 1
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        logits, cache = decode_step(llm, tok, cache, mask, p)
        cached_logits.append(logits[0])

    # reference: full forwards without a cache, re-embedding every generated token
    full_tokens: list[int] = []
    with torch.inference_mode():
        for step in range(n):
            ids = torch.tensor(full_tokens, dtype=torch.long)
            seq = torch.cat([embeds, table(ids)]) if full_tokens else embeds
            full = llm(inputs_embeds=seq[None], use_cache=False).logits[0, -1].float()
            err = float((full - cached_logits[step]).abs().max())
            assert err < 1e-4, f"step {step}: cached vs full logits differ by {err:.2e}"
            full_tokens.append(int(full.argmax()))

    assert cached_tokens == full_tokens
    assert out.output_token_ids == full_tokens
    assert full_tokens == _ref(case)["generation"]["output_ids"][:n]


# ---- batch == single --------------------------------------------------------------------------------
BATCH = ["text_only", "img_china_800x600", "video_avi"]


@pytest.mark.parametrize("variant", ["nvila", "nvila-lite"])
def test_batch_equals_single(variant: str) -> None:
    n = 10
    pipe = fixture_pipeline(variant)
    convs = [_messages(f"{variant}/{c}") for c in BATCH]
    prompts = [pipe.prepare(c) for c in convs]
    lengths = [p.fused_length for p in prompts]
    assert len(set(lengths)) == 3                                  # really different lengths -> real padding

    batch = pipe.generate_batch(convs, max_new_tokens=n)
    singles = [pipe.generate(c, max_new_tokens=n) for c in convs]
    for b, (got, one) in enumerate(zip(batch, singles)):
        ref = _ref(f"{variant}/{BATCH[b]}")
        assert got.output_token_ids == one.output_token_ids == ref["generation"]["output_ids"][:n]
        assert got.text == one.text
        assert got.prompt_length == one.prompt_length == ref["prefill"]["seq_len"]
        assert got.finish_reason == "length"

    # first-step logits: padded batch prefill vs single prefill vs the reference's recorded logits
    embeds = [pipe.embed(p) for p in prompts]
    x, mask, pos = left_pad(embeds)
    batch_logits, _ = prefill(pipe.model.llm, x, mask, pos)
    for b, e in enumerate(embeds):
        single_logits, _ = prefill(pipe.model.llm, *left_pad([e]))
        err = float((batch_logits[b] - single_logits[0]).abs().max())
        assert err < 1e-4, f"batch row {b}: {err:.2e}"
        want = np.load(OUTPUTS / f"{variant}/{BATCH[b]}.npz")["last_logits"]
        assert float(np.abs(batch_logits[b].numpy() - want).max()) < 1e-4


@pytest.mark.parametrize("variant", ["nvila", "nvila-lite"])
def test_questions_about_one_image_share_the_prefix_prefill(variant: str, monkeypatch) -> None:
    """Questions about the same image run the common prefix (system, image tokens) once; every row still
    produces what its prompt alone produces (tokens equal, first-step logits within 1e-4)."""
    pipe = fixture_pipeline(variant)
    image = _messages(f"{variant}/{BATCH[0]}")[0]["content"][0]
    questions = ["What is this?", "Describe the colours in the picture in detail, please.", "Count the objects."]
    convs = [[{"role": "user", "content": [image, {"type": "text", "text": q}]}] for q in questions]
    embeds = [pipe.embed(pipe.prepare(c)) for c in convs]
    shared = shared_prefix(embeds)
    assert shared > pipe.prepare(convs[0]).num_media_embeddings          # the image block is in the prefix
    calls = []
    real = generate.prefill_shared
    monkeypatch.setattr(generate, "prefill_shared", lambda *a: calls.append(a[2]) or real(*a))
    batch = pipe.generate_batch(convs, max_new_tokens=6)
    assert calls == [shared]
    monkeypatch.setattr(generate, "MIN_SHARED_PREFIX", 10**9)                # the plain padded batch
    singles = [pipe.generate(c, max_new_tokens=6) for c in convs]
    assert [g.output_token_ids for g in batch] == [g.output_token_ids for g in singles]
    logits, *_ = real(pipe.model.llm, embeds, shared)
    for b, e in enumerate(embeds):
        single, _ = prefill(pipe.model.llm, *left_pad([e]))
        assert float((logits[b] - single[0]).abs().max()) < 1e-4


def test_shared_prefix_length() -> None:
    a = torch.arange(12.0).view(6, 2)
    b = a.clone()
    b[4] = -1
    assert shared_prefix([a, b]) == 4
    assert shared_prefix([a, a.clone()]) == 5            # the last position always runs in the batched pass
    assert shared_prefix([a, a[:3].clone()]) == 2
    assert shared_prefix([a]) == 0
    c = a.clone()
    c[0] = 7
    assert shared_prefix([a, b, c]) == 0


def test_left_pad_positions_and_mask() -> None:
    embeds = [torch.ones(2, 3), torch.ones(4, 3) * 2, torch.ones(1, 3) * 3]
    x, mask, pos = left_pad(embeds)
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    for b, e in enumerate(embeds):
        n = e.shape[0]
        assert pos[b, -n:].tolist() == list(range(n))             # real tokens start at position 0
        assert torch.equal(x[b, -n:], e) and torch.all(x[b, : 4 - n] == 0)


def test_batch_with_one_sequence_stopping_early(monkeypatch) -> None:
    pipe = fixture_pipeline("nvila")
    convs = [_messages(f"nvila/{c}") for c in BATCH]
    refs = [_ref(f"nvila/{c}")["generation"]["output_ids"] for c in BATCH]
    stop = refs[1][3]
    assert all(stop not in r[:8] for i, r in enumerate(refs) if i != 1) and stop not in refs[1][:3]
    monkeypatch.setattr(pipe.checkpoint, "stop_token_ids", [stop])
    out = pipe.generate_batch(convs, max_new_tokens=8)
    assert out[1].output_token_ids == refs[1][:3] and out[1].finish_reason == "stop"
    for b in (0, 2):
        assert out[b].output_token_ids == refs[b][:8] and out[b].finish_reason == "length"


# ---- sampling ---------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_temperature_zero_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    got = sample(logits, SamplingParams(temperature=0.0), None)
    assert got.tolist() == [int(torch.argmax(row)) for row in logits]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    flat = torch.zeros(4, 1000)
    params = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        g = _gen(seed)
        return [t for _ in range(10) for t in sample(flat, params, g).tolist()]

    a, b, c = draws(1), draws(1), draws(2)
    assert a == b
    assert a != c
    assert len(set(a)) > 20                                        # a flat distribution really spreads


def test_top_k_1_and_tiny_top_p_are_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 40) * 0.1                              # nearly flat: sampling would differ
    want = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
                   SamplingParams(temperature=5.0, top_k=1, top_p=0.3)):
        g = _gen(0)
        for _ in range(20):
            assert sample(logits, params, g).tolist() == want


def test_top_k_3_stays_in_top_3() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 30) * 0.5
    top3 = set(logits[0].topk(3).indices.tolist())
    g = _gen(3)
    seen = {int(sample(logits, SamplingParams(temperature=2.0, top_k=3), g)) for _ in range(200)}
    assert seen <= top3
    assert seen == top3                                            # all three are reachable (p > 0.2 each)


def test_top_p_half_keeps_smallest_covering_set() -> None:
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    g = _gen(4)
    seen = [int(sample(logits, SamplingParams(temperature=1.0, top_p=0.5), g)) for _ in range(300)]
    assert set(seen) == {0, 1}
    # renormalised over {0, 1}: p(0) = 0.4 / 0.7
    assert abs(seen.count(0) / len(seen) - 4 / 7) < 0.1
    # with top_p 0.75 the third token enters, the fourth never does
    seen = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.75), g)) for _ in range(300)}
    assert seen == {0, 1, 2}


def test_sampling_params_validation() -> None:
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(PromptError):
            SamplingParams(**bad)


def test_seeded_generation_is_reproducible() -> None:
    pipe = fixture_pipeline("nvila-video")
    msgs = _messages("nvila-video/text_only")
    a = pipe.generate(msgs, max_new_tokens=8, temperature=1.0, seed=11)
    b = pipe.generate(msgs, max_new_tokens=8, temperature=1.0, seed=11)
    c = pipe.generate(msgs, max_new_tokens=8, temperature=1.0, seed=12)
    assert a.output_token_ids == b.output_token_ids
    assert a.output_token_ids != c.output_token_ids


# ---- stop handling ----------------------------------------------------------------------------------
def test_stop_token_on_first_step_gives_empty_output(monkeypatch) -> None:
    case = "nvila/img_china_800x600"
    pipe = fixture_pipeline("nvila")
    first = _ref(case)["generation"]["output_ids"][0]
    monkeypatch.setattr(pipe.checkpoint, "stop_token_ids", [first])
    out = pipe.generate(_messages(case), max_new_tokens=8)
    assert out.output_token_ids == [] and out.text == "" and out.finish_reason == "stop"
    assert "".join(pipe.stream(_messages(case), max_new_tokens=8)) == ""


def test_stop_token_mid_generation_is_not_emitted(monkeypatch) -> None:
    case = "nvila-lite/text_only"
    pipe = fixture_pipeline("nvila-lite")
    ref = _ref(case)["generation"]["output_ids"]
    stop = ref[5]
    assert stop not in ref[:5]
    monkeypatch.setattr(pipe.checkpoint, "stop_token_ids", [stop])
    out = pipe.generate(_messages(case), max_new_tokens=12)
    assert out.output_token_ids == ref[:5] and out.finish_reason == "stop"
    assert out.text == pipe.tokenizer.decode(ref[:5], skip_special_tokens=True).strip()


def test_real_stop_token_is_im_end() -> None:
    pipe = fixture_pipeline("nvila")
    assert pipe.checkpoint.stop_token_ids == _ref("nvila/text_only")["model"]["stop_token_ids"]


# tokens of the case's greedy answer: 'target', ' him', 'acc', ' ren', ' Direct', 'iving', ' >\n', 'ape', ' grid',
# '\ufffd' (a lone byte), 'Al', ' pointer', ...: stops inside one token, across tokens and after a broken byte
@pytest.mark.parametrize("stop", ["him", "ren Dir", "ivi", "Al p"])
def test_stop_string_truncates_text(stop: str) -> None:
    case = "nvila/text_only"
    pipe = fixture_pipeline("nvila")
    response = _ref(case)["generation"]["response"]
    assert stop in response
    want = response[: response.find(stop)].strip()
    out = pipe.generate(_messages(case), max_new_tokens=16, stop=[stop])
    assert out.text == want
    assert out.finish_reason == "stop"
    assert "".join(pipe.stream(_messages(case), max_new_tokens=16, stop=stop)) == want


def test_stop_string_not_in_output_changes_nothing() -> None:
    case = "nvila/text_only"
    pipe = fixture_pipeline("nvila")
    out = pipe.generate(_messages(case), max_new_tokens=16, stop=["zzzz-not-there"])
    assert out.text == _ref(case)["generation"]["response"] and out.finish_reason == "length"


@pytest.mark.parametrize("case", [f"{v}/text_only" for v in VARIANTS] + ["nvila-lite/img_hopper_64x64"])
def test_stream_pieces_concatenate_to_chat(case: str) -> None:
    variant = case.split("/")[0]
    pipe = fixture_pipeline(variant)
    msgs = _messages(case)
    pieces = list(pipe.stream(msgs, max_new_tokens=16))
    text = pipe.chat(msgs, max_new_tokens=16)
    assert "".join(pieces) == text == _ref(case)["generation"]["response"]
    assert len(pieces) > 1


TEXT = "héllo 世界 🙂 naïve — ok"


def test_text_stream_never_emits_partial_utf8() -> None:
    tok = fixture_pipeline("nvila").tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    # the test is only meaningful if some multi-byte character is split over tokens
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == TEXT


def test_text_stream_stop_string_across_tokens() -> None:
    tok = fixture_pipeline("nvila").tokenizer
    text = "héllo 世界 STOPWORD and more"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=["STOPWORD"])
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        assert "S" not in "".join(pieces)[len("héllo 世界 "):]   # nothing of the stop string leaks out
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert stream.stopped
    assert "".join(pieces) == "héllo 世界 "


def test_text_stream_skips_special_tokens() -> None:
    pipe = fixture_pipeline("nvila")
    tok = pipe.tokenizer
    ids = tok("ab", add_special_tokens=False)["input_ids"] + [8189] + tok(" cd", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    assert "".join([stream.push(i) for i in ids] + [stream.finish()]) == "ab cd"


# ---- limits -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_respected(n: int) -> None:
    case = "nvila-video/img_hopper_64x64"
    pipe = fixture_pipeline("nvila-video")
    out = pipe.generate(_messages(case), max_new_tokens=n)
    assert out.output_token_ids == _ref(case)["generation"]["output_ids"][:n]
    assert out.finish_reason == "length"


def test_max_new_tokens_zero_rejected() -> None:
    pipe = fixture_pipeline("nvila-video")
    with pytest.raises(PromptError):
        pipe.generate("hi", max_new_tokens=0)


def _limit_context(monkeypatch, pipe, n: int) -> None:
    cfg = dataclasses.replace(pipe.config, model_max_length=n)
    monkeypatch.setattr(pipe, "config", cfg)
    monkeypatch.setattr(pipe.processor, "cfg", cfg)


def test_prompt_filling_the_context_raises(monkeypatch) -> None:
    case = "nvila-video/img_china_800x600"
    pipe = fixture_pipeline("nvila-video")
    msgs = _messages(case)
    L = pipe.prepare(msgs).fused_length
    assert L == _ref(case)["prefill"]["seq_len"]

    _limit_context(monkeypatch, pipe, L - 1)                       # prompt longer than the context
    with pytest.raises(PromptError):
        pipe.generate(msgs, max_new_tokens=4)
    _limit_context(monkeypatch, pipe, L)                           # prompt exactly fills it: no room left
    with pytest.raises(PromptError):
        pipe.generate(msgs, max_new_tokens=4)
    _limit_context(monkeypatch, pipe, L + 2)                       # room for two new positions
    out = pipe.generate(msgs, max_new_tokens=10)
    assert out.output_token_ids == _ref(case)["generation"]["output_ids"][:2]
    assert out.finish_reason == "length"
