"""The media tokens: placeholder strings of the prompt, added to the tokenizer at load time."""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<vila/video>"
SENTINEL_TOKEN = "<vila/sentinel>"
# Added to the tokenizer at load time, in this order (ids V, V+1, V+2 after the saved vocabulary).
MEDIA_SPECIAL_TOKENS = (SENTINEL_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN)
