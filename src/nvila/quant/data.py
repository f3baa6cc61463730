"""Calibration data: a folder of images or a training file -> processed prompts.

* A folder: every image in it (sorted by name), each asked :data:`IMAGE_PROMPT` as a one-turn question.
* A ``.json`` / ``.jsonl`` training file (LLaVA or OpenAI form, :func:`nvila.train.data.load_dataset`):
  whole conversations, answers included, so the LLM is calibrated on text like it will generate.
* Nothing: the example images of the source tree (``recipes/examples/data/images``). An installed
  package has no such folder and asks for ``calib`` instead.

At most ``limit`` prompts are used: the first ones, or with ``seed`` a random draw of them (files are often
sorted by source or by question type, so the first ones need not be representative). Calibration only
needs activations that look like real ones; a few dozen prompts are plenty.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from nvila.base.errors import ConfigError
from nvila.processing.media import IMAGE_EXTENSIONS

IMAGE_PROMPT = "Describe this image in detail."
DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "recipes" / "examples" / "data" / "images"


def calibration_conversations(source: str | Path | None = None, limit: int = 64,
                              seed: int | None = None) -> list[tuple[list[dict[str, Any]], bool]]:
    """(messages, ends with an answer) pairs from ``source`` (see the module docstring)."""
    if limit < 1:
        raise ConfigError(f"the number of calibration prompts must be at least 1, got {limit}")
    if source is None:
        if not DEFAULT_IMAGES.is_dir():
            raise ConfigError(f"no default calibration images ({DEFAULT_IMAGES} is missing); pass a folder of "
                              "images or a training .json/.jsonl file as calibration data")
        source = DEFAULT_IMAGES
    path = Path(source)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise ConfigError(f"calibration folder {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [([{"role": "user", "content": [{"type": "image", "image": str(p)},
                                               {"type": "text", "text": IMAGE_PROMPT}]}], False)
                for p in _pick(images, limit, seed)]
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        from nvila.train.data import load_dataset

        samples = load_dataset(path)
        if not samples:
            raise ConfigError(f"calibration file {path} holds no conversations")
        return [(s.messages, s.messages[-1]["role"] == "assistant") for s in _pick(samples, limit, seed)]
    if not path.exists():
        raise ConfigError(f"calibration data {path} does not exist")
    raise ConfigError(f"calibration data {path} must be a folder of images or a .json/.jsonl training file")


def calibration_prompts(processor: Any, source: str | Path | None = None, limit: int = 64,
                        seed: int | None = None) -> list[Any]:
    """Processed prompts (:class:`~nvila.processing.processor.Prompt`) for :func:`nvila.quant.quantize_model`."""
    return [processor(messages, training=answered)
            for messages, answered in calibration_conversations(source, limit, seed)]


def _pick(items: list, limit: int, seed: int | None) -> list:
    """The first ``limit`` items, or ``limit`` drawn at random with ``seed`` (kept in their file order)."""
    if seed is None or limit >= len(items):
        return items[:limit]
    chosen = random.Random(seed).sample(range(len(items)), limit)
    return [items[i] for i in sorted(chosen)]
