"""Sequence packing: the packed batch must train exactly like the samples one at a time.

Each packed segment's logits equal the sample's logits alone (attention and RoPE positions stay inside a
sample), and the packed loss and its projector gradients equal the token-weighted mean of the per-sample
losses computed by ``nvila.train.step`` without packing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from conftest import MEDIA, fixture_pipeline

from nvila.base.errors import ConfigError, PromptError
from nvila.processing.processor import IGNORE_INDEX, Prompt
from nvila.train.fused import fused_labels
from nvila.train.loss import answer_loss
from nvila.train.packing import collate_packed, plan_packs
from nvila.train.step import collate

# two rows of different lengths, so the shorter one is padded; mixed image / text-only samples; sample 4 is
# supervised from its first token on, so masking the first label of each packed sample is observable
PACKS = [[0, 1, 4, 2], [3]]


def _conversations() -> list[list[dict]]:
    def image(name: str) -> dict:
        return {"type": "image", "image": str(MEDIA / name)}

    return [
        [{"role": "user", "content": [image("hopper_64x64.png"), {"type": "text", "text": "What is shown?"}]},
         {"role": "assistant", "content": "A face in grey."}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red, of course."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how can I help?"}],
        [{"role": "user", "content": [image("china_1000x250.png"), {"type": "text", "text": "Describe it."}]},
         {"role": "assistant", "content": "A wide landscape with a wall."}],
    ]


@pytest.fixture(scope="module")
def pipe():
    return fixture_pipeline("nvila-lite")


@pytest.fixture(scope="module")
def prompts(pipe) -> list[Prompt]:
    chats = [pipe.processor(c, training=True) for c in _conversations()]
    ids = pipe.processor.tokenizer("plain text trained on every token", add_special_tokens=False)["input_ids"]
    return chats + [Prompt(list(ids), [], "", labels=list(ids))]


@contextmanager
def _attention(llm: torch.nn.Module, impl: str) -> Iterator[None]:
    """Switch the LLM's attention implementation for a block (the fixture pipeline is shared)."""
    before = llm.config._attn_implementation
    llm.set_attn_implementation(impl)
    try:
        yield
    finally:
        llm.set_attn_implementation(before)


# ---- planning --------------------------------------------------------------------------------------
def test_plan_packs_first_fit_keeps_order_and_limit() -> None:
    lengths = [5, 3, 4, 2, 6, 1]
    packs = plan_packs(lengths, max_length=8)
    assert packs == [[0, 1], [2, 3, 5], [4]]
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 8 for p in packs)
    # a later short sample fills the gap an earlier row left
    assert plan_packs([6, 5, 2], max_length=8) == [[0, 2], [1]]
    assert plan_packs([8, 8], max_length=8) == [[0], [1]]
    assert plan_packs([], max_length=8) == []


def test_plan_packs_raises_on_oversize_and_bad_input() -> None:
    with pytest.raises(PromptError, match=r"sample 2 has 9 fused positions .* at most 8"):
        plan_packs([3, 4, 9, 1], max_length=8)
    with pytest.raises(PromptError, match="sample 1"):
        plan_packs([3, 0], max_length=8)
    with pytest.raises(ConfigError, match="max_length"):
        plan_packs([3], max_length=0)


# ---- layout ----------------------------------------------------------------------------------------
def test_layout_positions_restart_and_first_labels_ignored(pipe, prompts) -> None:
    batch = collate_packed(pipe.model, prompts, PACKS)
    lengths = [p.fused_length for p in prompts]
    rows = [sum(lengths[i] for i in pack) for pack in PACKS]
    B, L = len(PACKS), max(rows)
    assert batch["inputs_embeds"].shape[:2] == (B, L)
    assert batch["attention_mask"].shape == (B, 1, L, L)
    media_ids = set(pipe.model.media_token_ids.values())
    for b, pack in enumerate(PACKS):
        want_pos: list[int] = []
        want_lab: list[int] = []
        for i in pack:
            want_pos += list(range(lengths[i]))
            labels = fused_labels(prompts[i], pipe.model.embed_media(prompts[i].media), media_ids)
            want_lab += [IGNORE_INDEX] + labels[1:]
        want_pos += list(range(L - rows[b]))                     # padding restarts too
        want_lab += [IGNORE_INDEX] * (L - rows[b])
        assert batch["position_ids"][b].tolist() == want_pos
        assert batch["labels"][b].tolist() == want_lab
    assert rows[0] != rows[1]                                    # the fixture really pads a row
    assert prompts[4].labels[0] != IGNORE_INDEX                  # so its packed first label is really masked


# ---- isolation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_segments_equal_samples_alone(pipe, prompts, impl: str) -> None:
    llm = pipe.model.llm
    with torch.no_grad(), _attention(llm, impl):
        batch = collate_packed(pipe.model, prompts, PACKS)
        packed = llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits                        # (B, L, V)
        assert torch.isfinite(packed).all()                                         # padded rows included
        # without the block mask (a plain 2D mask, same restarting positions) later samples see earlier ones
        lengths = [sum(prompts[i].fused_length for i in pack) for pack in PACKS]
        real = (torch.arange(batch["position_ids"].shape[1]) < torch.tensor(lengths)[:, None]).long()  # (B, L)
        leaky = llm(inputs_embeds=batch["inputs_embeds"], attention_mask=real,
                    position_ids=batch["position_ids"]).logits
        for b, pack in enumerate(PACKS):
            start = 0
            for k, i in enumerate(pack):
                alone = collate(pipe.model, [prompts[i]])
                want = llm(**{key: alone[key] for key in ("inputs_embeds", "attention_mask", "position_ids")}).logits[0]
                n = want.shape[0]
                torch.testing.assert_close(packed[b, start : start + n], want, atol=1e-4, rtol=1e-4)
                if k > 0:
                    assert (leaky[b, start : start + n] - want).abs().max() > 1e-2
                start += n


# ---- loss and gradients ---------------------------------------------------------------------------
def test_packed_loss_and_projector_grads_equal_unpacked(pipe, prompts) -> None:
    model = pipe.model
    params = [p for p in model.projector.parameters() if p.requires_grad]
    assert params
    loss, n = answer_loss(model, collate_packed(model, prompts, PACKS))
    grads = torch.autograd.grad(loss, params)

    losses, counts = zip(*(answer_loss(model, collate(model, [p])) for p in prompts))
    want = sum(losses)                                                            # summed over every token
    want_grads = torch.autograd.grad(want, params)

    assert n == sum(counts)
    assert abs(loss.item() - want.item()) < 1e-5 * n
    assert any(g.abs().sum() > 0 for g in want_grads)                           # images reach the projector
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5 * n, rtol=1e-4)   # sums over n tokens


# ---- errors ---------------------------------------------------------------------------------------
def test_collate_packed_rejects_bad_packs_and_unmaskable_attention(pipe, prompts) -> None:
    for packs, match in [([[0, 1], [1]], "sample 1 appears"), ([[0, 7]], "sample 7"), ([[0], []], "pack 1 is empty"),
                         ([], "no packs")]:
        with pytest.raises(PromptError, match=match):
            collate_packed(pipe.model, prompts, packs)
    cfg = pipe.model.llm.config
    before = cfg._attn_implementation
    cfg._attn_implementation = "flash_attention_2"        # only the config is read; nothing runs
    try:
        with pytest.raises(ConfigError, match="flash_attention_2"):
            collate_packed(pipe.model, prompts, PACKS)
    finally:
        cfg._attn_implementation = before
