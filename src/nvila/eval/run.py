"""Run a model over an evaluation set: batched greedy answers, normalised exact match, a JSON report."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any, Sequence

from nvila.base.progress import ProgressBar
from nvila.eval.datasets import EvalItem

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """VQA-style answer normalisation: lower case, no punctuation or articles, single spaces."""
    text = PUNCT.sub(" ", text.lower())
    return " ".join(ARTICLES.sub(" ", text).split())


def is_correct(prediction: str, answers: Sequence[str]) -> bool:
    return normalize(prediction) in {normalize(a) for a in answers}


def evaluate(pipe: Any, items: Sequence[EvalItem], batch_size: int = 16, max_new_tokens: int = 8,
             progress: bool = True) -> dict[str, Any]:
    """Answer every item greedily and score exact match; returns the report with per-item predictions.

    A batch holds questions about one image only: the image is encoded once and the prompt prefix the
    questions share (system prompt, image tokens) is prefilled once for the whole batch.
    """
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_image[item.image].append(i)
    chunks = [group[b : b + batch_size] for group in by_image.values() for b in range(0, len(group), batch_size)]
    predictions: dict[int, str] = {}
    start = time.perf_counter()
    with ProgressBar("eval", len(items), "items", enabled=progress) as bar:
        for chunk in chunks:
            convs = [[{"role": "user", "content": [{"type": items[i].kind, items[i].kind: items[i].image},
                                                   {"type": "text", "text": items[i].question}]}] for i in chunk]
            for i, g in zip(chunk, pipe.generate_batch(convs, max_new_tokens=max_new_tokens)):
                predictions[i] = g.text
            bar.advance(len(chunk))
    seconds = time.perf_counter() - start
    correct = [is_correct(predictions[i], items[i].answers) for i in range(len(items))]
    by_answer: dict[str, list[bool]] = defaultdict(list)
    by_type: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, correct):
        by_answer[item.answers[0]].append(ok)
        if item.question_type:
            by_type[item.question_type].append(ok)
    per_type = {q: sum(v) / len(v) for q, v in sorted(by_type.items())}
    return {
        "accuracy": sum(correct) / max(1, len(items)), "n": len(items), "correct": sum(correct),
        "seconds": seconds, "items_per_s": len(items) / seconds if seconds else 0.0,
        "accuracy_by_answer": {a: sum(v) / len(v) for a, v in sorted(by_answer.items())},
        **({"accuracy_by_question_type": per_type} if per_type else {}),
        "predictions": [{"id": items[i].id, "question": items[i].question, "prediction": predictions[i],
                         "answers": list(items[i].answers), "correct": correct[i]} for i in range(len(items))],
    }
