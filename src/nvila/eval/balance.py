"""Answer-balanced training questions for easy-VQA, generated from the train split's own labels and wording.

easy-VQA's yes/no questions are heavily skewed by their wording: "is there a red shape?" is "no" for 87 % of
train questions (a random colour of eight is asked about), "is there not a red shape?" is "yes" for 88 %.
A model trained on them learns to answer from the wording alone: a measured NVILA-Nano answered every
positive yes/no question "no" and every negated one "yes", whatever the image showed, and never learnt to
name colours. Balanced questions remove that shortcut, so the only way to lower the loss is to look.

Each train image's shape and colour are read off its own questions and answers ("what color is the
circle?" -> "red" gives both); the question wordings are the train split's own, with the colour or shape
word replaced; yes/no questions ask about the true attribute half of the time, so "yes" and "no" are
equally likely for every wording. Nothing from the test split is used.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

from nvila.base.errors import NvilaError
from nvila.eval.datasets import ONE_WORD, EvalItem

COLOUR, SHAPE = "{colour}", "{shape}"
NEGATION = re.compile(r"\b(not|no)\b")


@dataclass(frozen=True)
class Grammar:
    """Wordings of the train questions by kind, and the answer vocabulary."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    name_shape: tuple[str, ...]      # answer: a shape ("what shape is in the image?", "what is the {colour} shape?")
    name_colour: tuple[str, ...]     # answer: a colour ("what color is the {shape}?")
    ask_colour: tuple[str, ...]      # yes/no about a colour ("is there not a {colour} shape?")
    ask_shape: tuple[str, ...]       # yes/no about a shape


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _template(question: str, colours: Sequence[str], shapes: Sequence[str]) -> str:
    out = question.removesuffix(" " + ONE_WORD)
    for c in colours:
        out = re.sub(rf"\b{c}\b", COLOUR, out)
    for s in shapes:
        out = re.sub(rf"\b{s}\b", SHAPE, out)
    return out


def negated(template: str) -> bool:
    """Whether a yes/no wording asks for absence ("is no {shape} present?", "is there not a ...")."""
    return NEGATION.search(template.replace(COLOUR, "").replace(SHAPE, "")) is not None


def grammar(items: Sequence[EvalItem]) -> Grammar:
    """Read the answer vocabulary and the question wordings off a split of easy-VQA."""
    answers = Counter(item.answers[0] for item in items)
    asked = {a for a in answers if a not in ("yes", "no")}
    # an open answer is a shape when some question names it next to "shape"-free wording ("is there a circle?"),
    # a colour when it is followed by "shape" ("is there a red shape?")
    colours = sorted(a for a in asked if any(f"{a} shape" in item.question for item in items))
    shapes = sorted(a for a in asked if a not in colours)
    if not colours or not shapes:
        raise NvilaError("these questions do not look like easy-VQA (no colour and shape answers found)")
    kinds: dict[str, set[str]] = defaultdict(set)
    for item in items:
        t = _template(item.question, colours, shapes)
        a = item.answers[0]
        if a in shapes:
            kinds["name_shape"].add(t)
        elif a in colours:
            kinds["name_colour"].add(t)
        elif COLOUR in t:
            kinds["ask_colour"].add(t)
        elif SHAPE in t:
            kinds["ask_shape"].add(t)
    return Grammar(tuple(colours), tuple(shapes), *(tuple(sorted(kinds[k])) for k in
                                                    ("name_shape", "name_colour", "ask_colour", "ask_shape")))


def image_labels(items: Sequence[EvalItem], g: Grammar) -> dict[str, dict[str, str]]:
    """``{image: {"shape": ..., "colour": ...}}`` as far as each image's own questions and answers tell."""
    labels: dict[str, dict[str, str]] = defaultdict(dict)
    for item in items:
        a, words = item.answers[0], _words(item.question)
        named_c = [c for c in g.colours if c in words]
        named_s = [s for s in g.shapes if s in words]
        found: dict[str, str] = {}
        if a in g.shapes:
            found["shape"] = a
            if named_c:
                found["colour"] = named_c[0]
        elif a in g.colours:
            found["colour"] = a
            if named_s:
                found["shape"] = named_s[0]
        elif (a == "yes") != negated(_template(item.question, g.colours, g.shapes)):   # the named value is there
            if named_c:
                found["colour"] = named_c[0]
            if named_s:
                found["shape"] = named_s[0]
        for key, value in found.items():
            if labels[item.image].setdefault(key, value) != value:
                raise NvilaError(f"contradictory {key} answers for {item.image}: {labels[item.image][key]} and {value}")
    return dict(labels)


@dataclass(frozen=True)
class Mix:
    """Questions generated per image, by kind."""

    name_shape: int = 1
    name_colour: int = 2
    ask_colour: int = 4
    ask_shape: int = 2
    # share of yes/no questions in a negated wording; None: as the split's wordings come (half of them).
    # At one half, and with "yes"/"no" 50/50 for every wording, whether the named value is in the image
    # says nothing about the answer until negation is known too (an XOR): its gradient averages to zero
    # and a model can sit at chance on yes/no. Positive wordings only (0.0) teach the comparison first.
    negated: float | None = None


def balanced_records(items: Sequence[EvalItem], mix: Mix = Mix(), seed: int = 0) -> list[dict]:
    """One LLaVA-style conversation per train image with a complete label: ``mix`` questions in the
    split's own wordings, yes/no answers 50/50 for every wording, in a shuffled order."""
    g = grammar(items)
    rng = random.Random(seed)
    first_id = {}
    for item in items:
        first_id.setdefault(item.image, item.id)
    records = []
    for image, lab in image_labels(items, g).items():
        if "shape" not in lab or "colour" not in lab:
            continue
        colour, shape = lab["colour"], lab["shape"]
        qa: list[tuple[str, str]] = []
        for _ in range(mix.name_shape):
            qa.append((rng.choice(g.name_shape).replace(COLOUR, colour), shape))
        for _ in range(mix.name_colour):
            qa.append((rng.choice(g.name_colour).replace(SHAPE, shape), colour))
        for count, wordings, slot, truth, values in ((mix.ask_colour, g.ask_colour, COLOUR, colour, g.colours),
                                                     (mix.ask_shape, g.ask_shape, SHAPE, shape, g.shapes)):
            if mix.negated is not None:
                split = {flag: [t for t in wordings if negated(t) == flag] for flag in (False, True)}
            for _ in range(count):
                if mix.negated is None:
                    t = rng.choice(wordings)
                else:
                    t = rng.choice(split[rng.random() < mix.negated] or wordings)
                value = truth if rng.random() < 0.5 else rng.choice([v for v in values if v != truth])
                present = value == truth
                qa.append((t.replace(slot, value), "yes" if present != negated(t) else "no"))
        rng.shuffle(qa)
        turns = []
        for k, (q, a) in enumerate(qa):
            turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + f"{q} {ONE_WORD}"})
            turns.append({"from": "gpt", "value": a})
        records.append({"id": first_id[image], "image": image, "conversations": turns})
    return records


def captioned(records: Sequence[dict], labels: dict[str, dict[str, str]], share: float, seed: int = 0) -> list[dict]:
    """``records`` with, for a ``share`` of the questions, the image's description put before the question
    ("The image shows a red circle. is there a blue shape?").

    A curriculum for yes/no: a 135 M LLM does not learn to compare a named colour or shape with the image
    from images alone (measured: the yes/no loss stays at ln 2), but it learns the comparison with a
    caption in the text, and with half of the questions uncaptioned the image's visual tokens come to
    serve the same comparison. Evaluation never shows captions."""
    rng = random.Random(seed)
    out = []
    for record in records:
        lab = labels[record["image"]]
        turns = [dict(t) for t in record["conversations"]]
        for turn in turns[::2]:
            if rng.random() < share:
                head = "<image>\n" if turn["value"].startswith("<image>\n") else ""
                caption = f"The image shows a {lab['colour']} {lab['shape']}."
                turn["value"] = f"{head}{caption} {turn['value'].removeprefix(head)}"
        out.append({**record, "conversations": turns})
    return out
