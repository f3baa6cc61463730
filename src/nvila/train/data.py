"""Training conversations from LLaVA-style and OpenAI-style JSON/JSONL files.

LLaVA form::

    {"id": "1", "image": "a.jpg" | "images": ["a.jpg", ...] | "video": "v.mp4",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}

``<image>`` / ``<video>`` markers place the media inside the human turns; without markers all media go
before the first human text, as the reference's training data pipeline does. OpenAI form::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", ...}]},
                  {"role": "assistant", "content": "A cat."}]}

Relative media paths resolve against ``media_root`` (default: the data file's folder). The result is
nvila's own message format, so training prompts are built by the same Processor as inference prompts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvila.base.errors import NvilaError, PromptError
from nvila.formats.plans import Prompt
from nvila.train.branches import branched_prompt

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MARKER = re.compile(r"<image>|<video>")


@dataclass(frozen=True)
class Sample:
    """One training conversation in nvila's message format."""

    id: str
    dataset: str
    messages: list[dict[str, Any]]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``.json`` (a list) or ``.jsonl`` (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise NvilaError(f"dataset file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise NvilaError(f"{path} is not valid JSON{' lines' if path.suffix == '.jsonl' else ''}: {e}") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise NvilaError(f"{path} must hold a list of objects (or one object per line for .jsonl)")
    return records


def load_dataset(path: str | Path, media_root: str | Path | None = None, name: str | None = None) -> list[Sample]:
    """All samples of one file; errors name the file and the record index."""
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    samples = []
    for i, rec in enumerate(read_records(path)):
        try:
            messages = openai_messages(rec, root) if "messages" in rec else llava_messages(rec, root)
        except PromptError as e:
            raise PromptError(f"{path} record {i}: {e}") from None
        samples.append(Sample(str(rec.get("id", i)), name or path.stem, messages))
    return samples


def _resolve(root: Path, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise PromptError(f"{what} must be a non-empty path string, got {value!r}")
    return str((root / value) if not Path(value).is_absolute() else Path(value))


def llava_messages(rec: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Convert one LLaVA record (``conversations`` with human/gpt turns) to nvila messages."""
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise PromptError("a LLaVA record needs a non-empty 'conversations' list")
    images = rec.get("images", [rec["image"]] if "image" in rec else [])
    images = [images] if isinstance(images, str) else images
    media = [{"type": "image", "image": _resolve(root, p, "image")} for p in images]
    if "video" in rec:
        media.append({"type": "video", "video": _resolve(root, rec["video"], "video")})
    text = " ".join(t.get("value", "") for t in turns if isinstance(t, dict))
    markers = MARKER.findall(text)
    if markers and len(markers) != len(media):
        raise PromptError(f"{len(markers)} <image>/<video> markers for {len(media)} media files")
    queue = list(media)
    messages = []
    for t in turns:
        role = ROLES.get(t.get("from")) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise PromptError(f"turn {t!r} needs 'from' in {sorted(ROLES)} and a string 'value'")
        parts: list[dict[str, Any]] = []
        if role == "user" and not markers and queue:
            parts, queue = queue, []                      # no markers: all media before the first question
        for piece in re.split(r"(<image>|<video>)", t["value"]):
            if piece in ("<image>", "<video>"):
                if role != "user":
                    raise PromptError("media markers may only appear in human turns")
                parts.append(queue.pop(0))
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n")})
        messages.append({"role": role, "content": parts if role == "user" else t["value"]})
    return messages


def openai_messages(rec: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Resolve relative media paths of an OpenAI-style ``messages`` record."""
    if not isinstance(rec["messages"], list):
        raise PromptError("'messages' must be a list")
    out = []
    for msg in rec["messages"]:
        if not isinstance(msg, dict):
            raise PromptError("every message must be an object")
        content = msg.get("content")
        if isinstance(content, list):
            content = [
                {**p, p["type"]: _resolve(root, p.get(p["type"]), p["type"])}
                if isinstance(p, dict) and p.get("type") in ("image", "video") else p
                for p in content
            ]
        out.append({**msg, "content": content})
    return out


def training_prompt(processor: Any, sample: Sample, independent_turns: bool = False) -> Prompt:
    """The labelled prompt of a training sample: one conversation, or its questions as independent turns
    sharing the media prefix (:mod:`nvila.train.branches`). Errors name the sample and its dataset."""
    try:
        if independent_turns:
            return branched_prompt(processor, sample.messages)
        return processor(sample.messages, training=True)
    except NvilaError as e:
        raise type(e)(f"sample {sample.id} of dataset {sample.dataset}: {e}") from None
