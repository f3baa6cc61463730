"""Evaluation datasets as adapters: name -> function(split) -> list of :class:`EvalItem`.

Each adapter reads its data locally (packages or files) and returns questions with their reference
answers; the prompt wording used for every dataset lives here too, so training data made for a dataset
(``to_training_records``) asks its questions exactly as evaluation does.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nvila.base.errors import NvilaError

ONE_WORD = "Answer with one word."


@dataclass(frozen=True)
class EvalItem:
    id: str
    image: str                 # path of the image the question is about
    question: str              # the text sent to the model (instruction included)
    answers: tuple[str, ...]   # accepted answers


def easy_vqa(split: str) -> list[EvalItem]:
    """easy-VQA (pip package ``easy-vqa``): 64x64 images of one coloured shape; 13 one-word answers."""
    if split not in ("train", "test"):
        raise NvilaError(f"easy-vqa has splits 'train' and 'test', not {split!r}")
    try:
        root = Path(str(md.distribution("easy-vqa").locate_file("easy_vqa/data")))
    except md.PackageNotFoundError:
        raise NvilaError("the easy-vqa dataset is not installed: pip install easy-vqa==1.0") from None
    questions = json.loads((root / split / "questions.json").read_text())
    return [EvalItem(f"{split}-{i}", str(root / split / "images" / f"{image_id}.png"), f"{text} {ONE_WORD}",
                     (answer,)) for i, (text, answer, image_id) in enumerate(questions)]


DATASETS: dict[str, Callable[[str], list[EvalItem]]] = {"easy-vqa": easy_vqa}


def load_eval(name: str, split: str) -> list[EvalItem]:
    if name not in DATASETS:
        raise NvilaError(f"unknown evaluation dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](split)


def to_training_records(items: list[EvalItem], per_conversation: int = 0, shuffle_seed: int | None = None) -> list[dict]:
    """LLaVA-style training records: the questions of each image as turns of one conversation
    (``per_conversation`` > 0 splits an image's questions into several conversations of that many).

    ``shuffle_seed`` shuffles the questions of each image first (a fixed permutation per seed), so no
    question type always comes first and later turns cannot lean on a fixed order of earlier answers.
    """
    by_image: dict[str, list[EvalItem]] = defaultdict(list)
    for item in items:
        by_image[item.image].append(item)
    records = []
    rng = random.Random(shuffle_seed)
    for image, group in by_image.items():
        if shuffle_seed is not None:
            group = rng.sample(group, len(group))
        size = per_conversation or len(group)
        for start in range(0, len(group), size):
            turns = []
            for k, item in enumerate(group[start : start + size]):
                turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + item.question})
                turns.append({"from": "gpt", "value": item.answers[0]})
            records.append({"id": group[start].id, "image": image, "conversations": turns})
    return records
