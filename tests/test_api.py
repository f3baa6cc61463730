"""Pipeline behaviour beyond single-turn parity: media caching across turns."""

from __future__ import annotations

from conftest import MEDIA, fixture_pipeline


def test_media_encoded_once_across_turns(monkeypatch) -> None:
    """A multi-turn conversation re-sends its image every turn; the vision tower must run once for it."""
    pipe = fixture_pipeline("nvila")
    pipe.media_cache.clear()
    calls = []
    original = pipe.model.encode_tiles
    monkeypatch.setattr(pipe.model, "encode_tiles", lambda px: calls.append(px.shape[0]) or original(px))
    image = {"type": "image", "image": str(MEDIA / "hopper_64x64.png")}
    turn1 = [{"role": "user", "content": [image, {"type": "text", "text": "What is shown?"}]}]
    first = pipe.generate(turn1, max_new_tokens=3)
    turn2 = turn1 + [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": [{"type": "image", "image": (MEDIA / "flower_300x900.png").read_bytes()},
                                                  {"type": "text", "text": "And this?"}]}]
    pipe.generate(turn2, max_new_tokens=3)
    pipe.generate(turn2, max_new_tokens=3)
    # turn 1: 14 S2 tiles; turn 2: only the new image (2 images -> 1 squashed tile each, a new plan for
    # the first image too); turn 2 again: everything cached
    assert calls == [14, 2]
    cached = pipe.next_token_logits(turn2)
    pipe.media_cache.clear()
    assert (cached - pipe.next_token_logits(turn2)).abs().max() == 0
