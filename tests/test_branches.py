"""Independent turns (nvila.train.branches): one row per conversation, each turn trained as its own
single-turn prompt. Reference: the single-turn prompts built and scored one by one."""

from __future__ import annotations

import pytest
import torch
from conftest import CHECKPOINTS, MEDIA

import nvila
from nvila.base.errors import ConfigError, PromptError
from nvila.processing.processor import IGNORE_INDEX
from nvila.train.branches import PREFIX, branch_positions, branched_prompt, single_turns
from nvila.train.loss import answer_loss
from nvila.train.step import collate

IMAGE = str(MEDIA / "hopper_64x64.png")
CONVERSATION = [
    {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "what is the blue shape?"}]},
    {"role": "assistant", "content": "circle"},
    {"role": "user", "content": [{"type": "text", "text": "what color is the circle?"}]},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "is there a red shape?"},
    {"role": "assistant", "content": "no, there is none"},
]


@pytest.fixture(scope="module")
def pipe() -> nvila.Pipeline:
    return nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32", device="cpu")


def test_single_turns_carry_the_media_of_the_first_question() -> None:
    system = {"role": "system", "content": "Be brief."}
    turns = single_turns([system, *CONVERSATION])
    assert len(turns) == 3 and all(t[0] == system and len(t) == 3 for t in turns)
    assert [p["type"] for p in turns[2][1]["content"]] == ["image", "text"]
    assert turns[2][1]["content"][1]["text"] == "is there a red shape?" and turns[2][2]["content"] == "no, there is none"
    late_image = CONVERSATION[:2] + [{"role": "user", "content": [{"type": "image", "image": IMAGE}]},
                                     {"role": "assistant", "content": "x"}]
    with pytest.raises(PromptError, match="first question"):
        single_turns(late_image)
    with pytest.raises(PromptError, match="ending with an answer"):
        single_turns(CONVERSATION[:3])


def test_branched_prompt_layout(pipe: nvila.Pipeline) -> None:
    prompt = branched_prompt(pipe.processor, CONVERSATION)
    singles = [pipe.processor(c, training=True) for c in single_turns(CONVERSATION)]
    prefix = prompt.branch.count(PREFIX)
    assert prompt.input_ids[:prefix] == singles[0].input_ids[:prefix]
    for k, s in enumerate(singles):                 # prefix + branch k == single-turn prompt k, token for token
        own = [t for t, b in zip(prompt.input_ids, prompt.branch) if b in (PREFIX, k)]
        assert own == s.input_ids
    supervised = sum(label != IGNORE_INDEX for label in prompt.labels)
    assert supervised == sum(sum(label != IGNORE_INDEX for label in s.labels) for s in singles)
    assert len(prompt.input_ids) < sum(len(s.input_ids) for s in singles)          # the prefix is stored once
    assert branch_positions([-1, -1, 0, 0, 1, 1, 1]) == [0, 1, 2, 3, 2, 3, 4]


def test_branched_prompt_reads_the_shared_image_once(pipe: nvila.Pipeline, monkeypatch) -> None:
    from nvila.processing import media as media_io

    reads = []
    load = media_io.load_image
    monkeypatch.setattr(media_io, "load_image", lambda *a, **k: reads.append(a[0]) or load(*a, **k))
    prompt = branched_prompt(pipe.processor, CONVERSATION)
    assert reads == [IMAGE]                                     # 3 turns, one read
    alone = pipe.processor(single_turns(CONVERSATION)[0], training=True)
    assert len(reads) == 2                                      # outside a branched prompt nothing is kept
    torch.testing.assert_close(prompt.media[0].pixels, alone.media[0].pixels, rtol=0, atol=0)
    assert prompt.media[0].plan == alone.media[0].plan


def test_branched_loss_equals_single_turn_losses(pipe: nvila.Pipeline) -> None:
    model = pipe.model
    prompt = branched_prompt(pipe.processor, CONVERSATION)
    plain = pipe.processor(CONVERSATION[:2], training=True)          # a plain prompt in the same batch
    with torch.no_grad():
        batch = collate(model, [prompt, plain])
        assert batch["attention_mask"].shape[1] == 1 and batch["attention_mask"].dim() == 4
        logits = model.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False).logits
        per_row = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                    ignore_index=IGNORE_INDEX, reduction="none").sum(1)
        singles = [answer_loss(model, collate(model, [s]))[0]
                   for s in (pipe.processor(c, training=True) for c in single_turns(CONVERSATION))]
        alone = answer_loss(model, collate(model, [plain]))[0]
    torch.testing.assert_close(per_row[0], sum(singles), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_row[1], alone, rtol=1e-4, atol=1e-4)


def test_recipe_refuses_independent_turns_with_packing(tmp_path) -> None:
    from nvila.train.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: x\ndata:\n  datasets: [{path: d.jsonl}]\n  packing: true\n  independent_turns: true\n")
    with pytest.raises(ConfigError, match="independent_turns and data.packing"):
        load_recipe(path)
