"""Shared test fixtures: the official tiny checkpoints and reference outputs under tests/fixtures/official."""

from __future__ import annotations

import io
import json
import struct
import zlib
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


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR is rewritten (with a valid CRC) to claim ``width x height``.

    Layout: 8-byte signature, then the IHDR chunk: length(4) type(4) data(13) crc(4); width/height lead data.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (1, 2, 3)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)
