"""Shared test fixtures: the official tiny checkpoints and reference outputs under tests/fixtures/official."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CHECKPOINTS = FIXTURES / "checkpoints"
MEDIA = FIXTURES / "media"
OUTPUTS = FIXTURES / "outputs"
VARIANTS = ("nvila", "nvila-lite", "nvila-video")


def fixture_cases() -> dict[str, dict]:
    """'<variant>/<case>' -> index entry (commit, checkpoint, images, video, prompt)."""
    return json.loads((OUTPUTS / "index.json").read_text())


def case_messages(spec: dict) -> list[dict]:
    """The reference's prompt for a case: all media first, then the text, in one user turn."""
    parts = [{"type": "image", "image": str(FIXTURES / p)} for p in spec["images"]]
    if spec["video"]:
        parts.append({"type": "video", "video": str(FIXTURES / spec["video"])})
    parts.append({"type": "text", "text": spec["prompt"]})
    return [{"role": "user", "content": parts}]


_PIPES: dict[str, object] = {}


def fixture_pipeline(variant: str):
    """A float32 CPU pipeline of a fixture checkpoint, loaded once per test session."""
    import nvila

    if variant not in _PIPES:
        _PIPES[variant] = nvila.load(CHECKPOINTS / variant, dtype="float32", device="cpu")
    return _PIPES[variant]


@pytest.fixture(params=VARIANTS)
def pipe(request):
    return fixture_pipeline(request.param)
