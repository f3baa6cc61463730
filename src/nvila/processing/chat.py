"""Chat messages -> prompt text with media placeholders.

Messages follow the OpenAI shape: ``{"role": "system"|"user"|"assistant", "content": str | [parts]}`` with
parts ``{"type": "text", "text": ...}``, ``{"type": "image", "image": path|bytes|PIL.Image}`` and
``{"type": "video", "video": path|bytes, "num_frames"?: int, "fps"?: float, "max_frames"?: int,
"frame_rate"?: float}`` (``frame_rate``: frames per second of a frame folder).
A bare string stands for one user turn.

Reference rules reproduced here: media become single placeholder tokens concatenated to the text with no
separator; literal placeholder strings typed by the user are removed; every message value is stripped;
the ChatML template adds the default system prompt "You are a helpful assistant" (no period).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from nvila.base.errors import PromptError
from nvila.formats.tokens import IMAGE_TOKEN, MEDIA_SPECIAL_TOKENS, SENTINEL_TOKEN, VIDEO_TOKEN  # noqa: F401


# The compact qwen2 ChatML template of the reference (chat_templates/qwen2.jinja, whitespace removed).
CHAT_TEMPLATES = {
    "qwen2": (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
        "{% for message in messages if message['content'] is not none %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class MediaRef:
    """A media part of a message, in prompt order."""

    kind: str                      # "image" | "video"
    source: Any                    # path, bytes or PIL image
    options: dict[str, Any]        # video: num_frames / fps / max_frames


def normalize_messages(messages: str | Sequence[Any], training: bool = False) -> list[dict[str, Any]]:
    """Validate messages and return them as dicts with list-of-parts content.

    For inference the last turn must be the user's (there is something to answer); a training
    conversation must end with the assistant's answer instead.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out: list[dict[str, Any]] = []
    counter = [0]  # prompt-wide image index, used for per-image placeholder expansion
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise PromptError(f"message {i} must be a dict with 'role' and 'content'")
        role = msg["role"]
        if role not in ROLES:
            raise PromptError(f"message {i} has role {role!r}; expected one of {ROLES}")
        if role == "system" and i != 0:
            raise PromptError("a system message may only come first")
        out.append({"role": role, "content": _parts(msg["content"], i, role, counter)})
    if training and out[-1]["role"] != "assistant":
        raise PromptError("a training conversation must end with an assistant message (the answer to learn)")
    if not training and out[-1]["role"] == "assistant":
        raise PromptError("the last message must be a user (or system) turn to answer")
    return out


def _parts(content: Any, i: int, role: str, counter: list[int]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence):
        raise PromptError(f"message {i}: content must be a string or a list of parts")
    parts = []
    for part in content:
        part = {"type": "text", "text": part} if isinstance(part, str) else part
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise PromptError(f"message {i}: a text part needs a string 'text'")
        elif kind in ("image", "video"):
            if role != "user":
                raise PromptError(f"message {i}: {kind} parts are only allowed in user messages")
            allowed = (str, os.PathLike, bytes, bytearray) + ((Image.Image,) if kind == "image" else ())
            if not isinstance(part.get(kind), allowed):
                what = "a path, bytes or a PIL image" if kind == "image" else "a path or bytes"
                raise PromptError(f"message {i}: a {kind} part needs a {kind!r} entry that is {what}, "
                                  f"got {type(part.get(kind)).__name__}")
        else:
            raise PromptError(f"message {i}: unknown content part {part!r} (types: text, image, video)")
        part = dict(part)  # never mutate the caller's dicts
        if kind == "image":
            part["_index"], counter[0] = counter[0], counter[0] + 1
        parts.append(part)
    return parts


def strip_placeholders(text: str) -> str:
    """Remove placeholder strings a user typed, as the reference does."""
    for token in (IMAGE_TOKEN, VIDEO_TOKEN):
        text = text.replace(token, "")
    return text


def render_content(parts: list[dict[str, Any]], image_expansion: dict[int, str]) -> str:
    """Concatenate a message's parts into template content (placeholders + text, no separator).

    ``image_expansion`` maps the prompt-wide index of an image to the placeholder text it becomes
    (default ``"<image>"``; ``"<image>\\n" * tiles`` for NVILA-Lite tiling).
    """
    text = ""
    for part in parts:
        if part["type"] == "text":
            text += strip_placeholders(part["text"])
        elif part["type"] == "image":
            text += image_expansion.get(part["_index"], IMAGE_TOKEN)
        else:
            text += VIDEO_TOKEN
    return text.strip()


def collect_media(messages: list[dict[str, Any]]) -> list[MediaRef]:
    """All media parts of a normalised conversation, in prompt order."""
    refs = []
    for msg in messages:
        for part in msg["content"]:
            if part["type"] in ("image", "video"):
                opts = {k: part[k] for k in ("num_frames", "fps", "max_frames", "frame_rate") if part.get(k) is not None}
                refs.append(MediaRef(part["type"], part[part["type"]], opts))
    return refs


def build_prompt(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    template: str,
    image_expansion: dict[int, str],
    add_generation_prompt: bool = True,
) -> str:
    """Render the conversation with the chat template; media appear as placeholder tokens."""
    rendered = []
    for msg in messages:
        rendered.append({"role": msg["role"], "content": render_content(msg["content"], image_expansion)})
    try:
        return tokenizer.apply_chat_template(
            rendered, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja errors from a custom template
        raise PromptError(f"the chat template failed to render the conversation: {e}") from e
