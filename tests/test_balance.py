"""Answer-balanced easy-VQA training questions (nvila.eval.balance)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict

import pytest

from nvila.base.errors import NvilaError
from nvila.eval.balance import COLOUR, SHAPE, Mix, balanced_records, captioned, grammar, image_labels, negated
from nvila.eval.datasets import ONE_WORD, EvalItem, load_eval

pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def train() -> list[EvalItem]:
    return load_eval("easy-vqa", "train")


def _truth(question: str, answer: str, colour: str, shape: str) -> bool:
    """Independent check of a generated pair from the literal question text."""
    q = question.removesuffix(" " + ONE_WORD)
    if answer not in ("yes", "no"):
        return answer in (colour, shape)
    named = set(re.findall(r"[a-z]+", q))
    asks_present = not ({"not", "no"} & named)
    value_there = colour in named or shape in named
    return (answer == "yes") == (value_there == asks_present)


def test_grammar_reads_the_vocabulary_and_wordings(train) -> None:
    g = grammar(train)
    assert g.colours == ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
    assert g.shapes == ("circle", "rectangle", "triangle")
    assert "what is the {colour} shape?" in g.name_shape and "what color is the {shape}?" in g.name_colour
    assert len(g.ask_colour) == len(g.ask_shape) == 8
    assert sum(map(negated, g.ask_colour)) == sum(map(negated, g.ask_shape)) == 4
    assert negated("is no {shape} present?") and not negated("is a {shape} present?")


def test_labels_predict_held_out_answers(train) -> None:
    """Labels read off half of each image's questions answer the other half exactly (a real check: a wrong
    negation rule or slot parser makes some yes/no answers disagree)."""
    g = grammar(train)
    rng = random.Random(0)
    fit, held = [], []
    for item in train:
        (fit if rng.random() < 0.5 else held).append(item)
    labels = image_labels(fit, g)
    checked = 0
    for item in held:
        lab = labels.get(item.image, {})
        if "colour" in lab and "shape" in lab:
            assert _truth(item.question, item.answers[0], lab["colour"], lab["shape"]), item
            checked += 1
    assert checked > 10000


def test_balanced_records_are_balanced_and_correct(train) -> None:
    g = grammar(train)
    labels = image_labels(train, g)
    records = balanced_records(train, Mix(1, 2, 4, 2), seed=0)
    complete = [img for img, lab in labels.items() if len(lab) == 2]
    assert len(records) == len(complete) == len({r["image"] for r in records})
    per_wording: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        turns = r["conversations"]
        assert len(turns) == 18 and turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        lab = labels[r["image"]]
        for q, a in zip(turns[::2], turns[1::2]):
            question = q["value"].removeprefix("<image>\n")
            assert question.endswith(ONE_WORD)
            assert _truth(question, a["value"], lab["colour"], lab["shape"]), (question, a, lab)
            if a["value"] in ("yes", "no"):
                wording = re.sub(r"\b(" + "|".join(g.colours) + r")\b", COLOUR, question)
                per_wording[re.sub(r"\b(" + "|".join(g.shapes) + r")\b", SHAPE, wording)][a["value"]] += 1
    assert len(per_wording) == 16
    for wording, counts in per_wording.items():          # the wording alone no longer predicts the answer
        assert 0.4 < counts["yes"] / sum(counts.values()) < 0.6, (wording, counts)
    assert balanced_records(train, seed=0) == records and balanced_records(train, seed=1) != records


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_negated_share_of_yes_no_wordings(train, share) -> None:
    g = grammar(train)
    labels = image_labels(train, g)
    records = balanced_records(train, Mix(1, 1, 5, 2, negated=share), seed=2)
    flags, answers = [], Counter()
    for r in records:
        lab = labels[r["image"]]
        turns = r["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            question = q["value"].removeprefix("<image>\n")
            assert _truth(question, a["value"], lab["colour"], lab["shape"]), (question, a, lab)
            if a["value"] in ("yes", "no"):
                flags.append(bool(re.search(r"\b(not|no)\b", question.removesuffix(ONE_WORD))))
                answers[a["value"]] += 1
    assert len(flags) == 7 * len(records)
    assert abs(sum(flags) / len(flags) - share) < 0.02
    assert 0.48 < answers["yes"] / len(flags) < 0.52       # still 50/50: only the wordings change


def test_captions_describe_the_image_and_change_nothing_else(train) -> None:
    labels = image_labels(train, grammar(train))
    records = balanced_records(train, Mix(1, 1, 5, 2), seed=4)
    before = json.dumps(records)
    out = captioned(records, labels, 0.25, seed=4)
    assert json.dumps(records) == before                                  # the input is not modified
    assert captioned(records, labels, 0.0) == records
    shown = total = 0
    for r, c in zip(records, out):
        lab = labels[r["image"]]
        assert c["image"] == r["image"] and c["conversations"][1::2] == r["conversations"][1::2]   # same answers
        for plain, new in zip(r["conversations"][::2], c["conversations"][::2]):
            total += 1
            if new == plain:
                continue
            shown += 1
            head = "<image>\n" if plain["value"].startswith("<image>\n") else ""
            assert new["value"] == f"{head}The image shows a {lab['colour']} {lab['shape']}. " + plain["value"][len(head):]
    assert abs(shown / total - 0.25) < 0.02


def test_contradictions_and_foreign_data_are_refused() -> None:
    items = [EvalItem("a", "img.png", f"what shape is in the image? {ONE_WORD}", ("circle",)),
             EvalItem("b", "img.png", f"is there a red shape? {ONE_WORD}", ("yes",)),
             EvalItem("c", "img.png", f"what color is the shape? {ONE_WORD}", ("red",)),
             EvalItem("d", "img.png", f"what is the red shape? {ONE_WORD}", ("triangle",))]
    with pytest.raises(NvilaError, match="contradictory shape"):
        image_labels(items, grammar(items))
    with pytest.raises(NvilaError, match="easy-VQA"):
        grammar([EvalItem("x", "i.png", "what animal is this?", ("cat",))])

