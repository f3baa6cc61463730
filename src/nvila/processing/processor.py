"""Conversation -> :class:`Prompt`: token ids with placeholders + the media pixels and their plans.

Data flow: messages -> media files read (nvila.processing.media) -> TilePlan per image / VideoPlan per video ->
pixel tiles -> prompt text with placeholders expanded from the plans -> token ids. This module never
imports the model; the model consumes a Prompt and checks its counts against the plans.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from nvila.base.errors import PromptError
from nvila.formats.config import NvilaConfig
from nvila.formats.plans import IGNORE_INDEX, MediaItem, Prompt
from nvila.processing import media as media_io
from nvila.processing.chat import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    build_prompt,
    collect_media,
    normalize_messages,
)
from nvila.processing.image import image_pixels, normalize
from nvila.processing.tiling import plan_image, plan_video


class Processor:
    """Turns chat messages into a :class:`Prompt` for one model configuration."""

    def __init__(self, cfg: NvilaConfig, tokenizer: Any, chat_template: str, max_pixels: int | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_pixels = max_pixels or media_io.DEFAULT_MAX_PIXELS
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self._reuse: dict[tuple, MediaItem] | None = None

    @contextmanager
    def reusing_media(self) -> Iterator[None]:
        """Within the block each media source (same file or bytes, same options) is read, tiled and
        normalised once: several prompts about one image share its MediaItem (pixels are not copied)."""
        outer = self._reuse
        if outer is None:
            self._reuse = {}
        try:
            yield
        finally:
            self._reuse = outer

    def _reused(self, key: tuple, make: Any) -> MediaItem:
        if self._reuse is None or key[1] is None:
            return make()
        try:
            hash(key)
        except TypeError:       # an option that is not a plain value
            return make()
        if key not in self._reuse:
            self._reuse[key] = make()
        return self._reuse[key]

    def __call__(
        self,
        messages: str | Sequence[Any],
        *,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        frame_rate: float | None = None,
        add_generation_prompt: bool = True,
        training: bool = False,
    ) -> Prompt:
        """Read the media of ``messages``, plan and tile them, and tokenize the conversation.

        ``num_frames`` / ``fps`` / ``max_frames`` / ``frame_rate`` (of a frame folder) are defaults for videos
        whose part does not set them;
        without them the model's configured ``num_video_frames`` is used. With ``training`` the
        conversation ends with the assistant's answer and ``labels`` mark the assistant tokens.
        """
        msgs = normalize_messages(messages, training=training)
        add_generation_prompt = add_generation_prompt and not training
        refs = collect_media(msgs)
        single = sum(r.kind == "image" for r in refs) == 1
        items: list[MediaItem] = []
        expansion: dict[int, str] = {}
        n_img = 0
        for ref in refs:
            if ref.kind == "image":
                key = ("image", _media_key(ref.source), single)
                item = self._reused(key, lambda: self._image(ref.source, single))
                if item.plan.kind == "dynamic":
                    expansion[n_img] = (IMAGE_TOKEN + "\n") * item.plan.placeholders
                n_img += 1
            else:
                opts = {"num_frames": num_frames, "fps": fps, "max_frames": max_frames,
                        "frame_rate": frame_rate} | ref.options
                key = ("video", _media_key(ref.source), tuple(sorted(opts.items())))
                item = self._reused(key, lambda: self._video(ref.source, **opts))
            items.append(item)
        text = build_prompt(msgs, self.tokenizer, self.chat_template, expansion, add_generation_prompt)
        if training:
            ids, labels = self._labelled(msgs, expansion, text)
            prompt = Prompt(ids, items, text, labels)
        else:
            prompt = Prompt(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), items, text)
        self._check_counts(prompt)
        return prompt

    def _labelled(self, msgs: list[dict[str, Any]], expansion: dict[int, str], text: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and labels that keep only assistant answers (with their end token).

        Each answer's character span is found by rendering the conversation up to the answer's start
        (with the generation prompt) and up to its end; tokens starting inside a span are supervised.
        """
        spans = []
        for i, msg in enumerate(msgs):
            if msg["role"] != "assistant":
                continue
            start = build_prompt(msgs[:i], self.tokenizer, self.chat_template, expansion, True)
            end = build_prompt(msgs[: i + 1], self.tokenizer, self.chat_template, expansion, False)
            if not (end.startswith(start) and text.startswith(end)):
                raise PromptError("the chat template does not render conversations prefix by prefix; "
                                  "assistant answers cannot be located for the loss")
            spans.append((len(start), len(end.rstrip("\n"))))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for t, (a, _) in enumerate(enc["offset_mapping"]):
            if any(s <= a < e for s, e in spans):
                labels[t] = ids[t]
        return ids, labels

    def _image(self, source: Any, single: bool) -> MediaItem:
        image = media_io.load_image(source, max_pixels=self.max_pixels)
        plan = plan_image(image.width, image.height, self.cfg, single_image=single)
        return MediaItem("image", image_pixels(image, plan, self.cfg), plan, key=_media_key(source))

    def _video(
        self, source: Any, num_frames: int | None, fps: float | None, max_frames: int | None,
        frame_rate: float | None = None,
    ) -> MediaItem:
        n = self.cfg.num_video_frames if num_frames is None else num_frames
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PromptError(f"num_frames must be >= 1, got {n}")
        multiple = self.cfg.video_encoder.frame_multiple
        if fps and multiple > 1:
            raise PromptError("fps sampling gives a variable frame count, which this model's temporal pooling "
                              f"cannot take (it needs a multiple of {multiple} frames); use num_frames instead")
        video = media_io.load_video(source, num_frames=n, fps=fps, max_frames=max_frames, max_pixels=self.max_pixels,
                                    frame_rate=frame_rate)
        plan = plan_video(len(video.frames), self.cfg)
        frame = plan.frame_plan.tiles[0]
        frames = [f.resize(frame.resize) for f in video.frames]
        key = _media_key(source)
        key = None if key is None else f"{key}|{video.indices}"
        return MediaItem("video", normalize(frames, self.cfg), plan, key=key, duration=video.duration)

    def _check_counts(self, prompt: Prompt) -> None:
        ids = prompt.input_ids
        want_img = sum(m.placeholders for m in prompt.media if m.kind == "image")
        want_vid = sum(1 for m in prompt.media if m.kind == "video")
        got_img, got_vid = ids.count(self.image_token_id), ids.count(self.video_token_id)
        if (got_img, got_vid) != (want_img, want_vid):
            raise PromptError(
                f"the chat template produced {got_img} image / {got_vid} video placeholders for "
                f"{want_img} / {want_vid} media; does the template drop or duplicate message content?"
            )
        if prompt.fused_length > self.cfg.model_max_length:
            raise PromptError(
                f"the prompt needs {prompt.fused_length} positions ({len(ids)} text tokens + "
                f"{prompt.num_media_embeddings} media embeddings) but the model's context is "
                f"{self.cfg.model_max_length}; use fewer or smaller media, fewer video frames or a shorter text"
            )


def _media_key(source: Any) -> str | None:
    """A cheap identity for a media source (path + mtime + size, or a hash of bytes); None otherwise."""
    import hashlib
    import os

    if isinstance(source, (bytes, bytearray)):
        return "sha1:" + hashlib.sha1(source).hexdigest()
    if isinstance(source, (str, os.PathLike)):
        try:
            st = os.stat(source)
        except OSError:
            return None
        return f"{os.fspath(source)}|{st.st_mtime_ns}|{st.st_size}"
    return None
