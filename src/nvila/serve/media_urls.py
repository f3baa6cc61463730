"""OpenAI-style message content -> nvila messages, with the server's media access rules.

``image_url`` / ``video_url`` URLs may be ``data:`` base64 (always), local paths or ``file://`` URLs
(only inside the allowed media directory, after resolving symlinks and ``..``), or ``http(s)`` (only when
remote media are allowed; size- and time-limited). Every refusal is a MediaError/PromptError naming the
rule, which the app answers with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from nvila.base.errors import MediaError, PromptError


@dataclass(frozen=True)
class MediaPolicy:
    allowed_dir: Path | None = None
    allow_remote: bool = False
    max_remote_bytes: int = 64 * 1024 * 1024
    remote_timeout_s: float = 15.0


def fetch_media(url: str, policy: MediaPolicy) -> bytes | str:
    """Resolve one media URL to bytes or an allowed local path."""
    if not isinstance(url, str) or not url:
        raise MediaError("a media URL must be a non-empty string")
    if url.startswith("data:"):
        return _data_url(url)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise MediaError("remote media URLs are disabled on this server (start it with --allow-remote-media)")
        return _download(url, policy)
    if scheme == "file":
        return _local(unquote(urlparse(url).path), policy)
    if scheme and len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise MediaError(f"unsupported media URL scheme {scheme!r} (use data:, file://, a path or http(s))")
    return _local(url, policy)


def _data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError("data: media URLs must be base64 encoded (data:<mime>;base64,<data>)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"invalid base64 data in the media URL: {e}") from e
    if not data:
        raise MediaError("the media data URL is empty")
    return data


def _local(path: str, policy: MediaPolicy) -> str:
    if policy.allowed_dir is None:
        raise MediaError("local media paths are disabled on this server (start it with --allowed-media-dir DIR)")
    root = policy.allowed_dir.resolve()
    target = (root / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
    if os.path.commonpath([root, target]) != str(root):
        raise MediaError(f"media path {path!r} is outside the allowed media directory")
    if not target.exists():
        raise MediaError(f"media path {path!r} does not exist in the allowed media directory")
    return str(target)


def _download(url: str, policy: MediaPolicy) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.remote_timeout_s, follow_redirects=True) as r:
            if r.status_code != 200:
                raise MediaError(f"fetching {url} returned HTTP {r.status_code}")
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > policy.max_remote_bytes:
                    raise MediaError(f"remote media at {url} exceeds {policy.max_remote_bytes // 2**20} MiB")
            return bytes(data)
    except httpx.HTTPError as e:
        raise MediaError(f"could not fetch {url}: {type(e).__name__}") from e


def to_nvila_messages(messages: list[dict[str, Any]], policy: MediaPolicy) -> list[dict[str, Any]]:
    """Convert OpenAI chat messages to nvila's message format, resolving media URLs."""
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise PromptError(f"messages[{i}] must be an object with 'role' and 'content'")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": msg["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise PromptError(f"messages[{i}].content must be a string or a list of content parts")
        out.append({"role": msg["role"], "content": [_part(p, i, policy) for p in content]})
    return out


def _part(part: Any, i: int, policy: MediaPolicy) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise PromptError(f"messages[{i}].content parts must be objects")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise PromptError(f"messages[{i}]: a text part needs a string 'text'")
        return {"type": "text", "text": part["text"]}
    if kind in ("image_url", "video_url"):
        spec = part.get(kind)
        url = spec.get("url") if isinstance(spec, dict) else spec
        media = fetch_media(url, policy)
        if kind == "image_url":
            return {"type": "image", "image": media}
        options = {k: part.get(k, spec.get(k) if isinstance(spec, dict) else None) for k in ("num_frames", "fps")}
        for name, value in options.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise PromptError(f"messages[{i}]: video {name} must be a positive number")
        return {"type": "video", "video": media, **{k: v for k, v in options.items() if v is not None}}
    raise PromptError(f"messages[{i}]: unknown content part type {kind!r} (text, image_url, video_url)")
