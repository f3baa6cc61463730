"""Evaluation datasets as adapters: name -> function(split) -> list of :class:`EvalItem`.

Each adapter reads its data locally (packages or files) and returns questions with their reference
answers; the prompt wording used for every dataset lives here too, so training data made for a dataset
(``to_training_records``) asks its questions exactly as evaluation does.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nvila.base.errors import NvilaError

ONE_WORD = "Answer with one word."
NANO_VIDEO_DEFAULT = "data/nano-video"     # where `nvila nano video-data` writes by default


@dataclass(frozen=True)
class EvalItem:
    id: str
    image: str                 # path of the image the question is about (kind "video": a video or frame folder)
    question: str              # the text sent to the model (instruction included)
    answers: tuple[str, ...]   # accepted answers
    kind: str = "image"        # the media's content part type: "image" or "video"
    question_type: str = ""    # when set, evaluation reports accuracy_by_question_type


def easy_vqa(split: str, data: str | os.PathLike | None = None) -> list[EvalItem]:
    """easy-VQA (pip package ``easy-vqa``): 64x64 images of one coloured shape; 13 one-word answers."""
    if data is not None:
        raise NvilaError("easy-vqa is read from its pip package; --data does not apply")
    if split not in ("train", "test"):
        raise NvilaError(f"easy-vqa has splits 'train' and 'test', not {split!r}")
    try:
        root = Path(str(md.distribution("easy-vqa").locate_file("easy_vqa/data")))
    except md.PackageNotFoundError:
        raise NvilaError("the easy-vqa dataset is not installed: pip install easy-vqa==1.0") from None
    questions = json.loads((root / split / "questions.json").read_text())
    return [EvalItem(f"{split}-{i}", str(root / split / "images" / f"{image_id}.png"), f"{text} {ONE_WORD}",
                     (answer,)) for i, (text, answer, image_id) in enumerate(questions)]


def nano_video(split: str, data: str | os.PathLike | None = None) -> list[EvalItem]:
    """NVILA-Nano's synthetic video questions (:mod:`nvila.eval.video_shapes`, one per clip) from the folder
    ``data`` (default ``data/nano-video``), as ``nvila nano video-data`` wrote it."""
    if split not in ("train", "test"):
        raise NvilaError(f"nano-video has splits 'train' and 'test', not {split!r}")
    root = Path(data or NANO_VIDEO_DEFAULT).absolute()
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise NvilaError(f"the nano-video {split} split is missing ({path} does not exist); generate it with "
                         f"`nvila nano video-data --out {root}`, or pass the folder it was written to with --data")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
            video, text = rec["messages"][0]["content"]
            meta = rec["metadata"]
            items.append(EvalItem(rec["id"], str(root / video["video"]), text["text"], tuple(meta["answers"]),
                                  kind="video", question_type=meta["question_type"]))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise NvilaError(f"{path} line {n} is not a nano-video record ({type(e).__name__}: {e}); "
                             "regenerate the folder with `nvila nano video-data`") from None
    return items


DATASETS: dict[str, Callable[..., list[EvalItem]]] = {"easy-vqa": easy_vqa, "nano-video": nano_video}


def load_eval(name: str, split: str, data: str | os.PathLike | None = None) -> list[EvalItem]:
    """The questions of a dataset split; ``data``: the dataset's folder, for datasets generated on disk."""
    if name not in DATASETS:
        raise NvilaError(f"unknown evaluation dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](split, data)


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
