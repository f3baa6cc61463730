"""The plan types: what processing decides for every media item, and what the model checks it produced.

Processing (:mod:`nvila.processing`) makes these; the model (:mod:`nvila.model`) consumes them; neither
imports the other. A :class:`TilePlan` says how one image becomes ViT tiles and LLM embeddings, a
:class:`VideoPlan` the same for a clip, a :class:`MediaItem` carries one item's pixels with its plan, and a
:class:`Prompt` is token ids with one placeholder per media block plus the items that fill them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PlanKind = Literal["single", "dynamic", "dynamic_s2"]


@dataclass(frozen=True)
class Tile:
    """One ViT input: resize the whole image to ``resize`` (W, H), then crop ``box`` (l, t, r, b)."""

    resize: tuple[int, int]
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class TilePlan:
    """How one image becomes ViT tiles and LLM embeddings.

    ``placeholders`` is the number of media placeholders the prompt gets for this image and
    ``embeds_per_placeholder`` what each one expands to (visual tokens + the trailing newline embedding).
    """

    kind: PlanKind
    tiles: tuple[Tile, ...]
    grid: tuple[int, int] | None          # chosen (cols, rows) of the adaptive grid
    block: tuple[int, int] | None         # dynamic_s2: (rows, cols) of the last scale
    repeat_channels: int                  # single tile in an S2 model: features repeated per scale
    placeholders: int
    embeds_per_placeholder: int

    @property
    def num_embeddings(self) -> int:
        return self.placeholders * self.embeds_per_placeholder


@dataclass(frozen=True)
class VideoPlan:
    """How a clip of ``num_frames`` squashed frames becomes one placeholder's embeddings."""

    num_frames: int
    frame_plan: TilePlan
    num_embeddings: int


IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, media placeholders, padding)


@dataclass
class MediaItem:
    """One image or video of a prompt: its pixels and the plan that says what they become."""

    kind: Literal["image", "video"]
    pixels: torch.Tensor            # (N, 3, S, S): image tiles in plan order, or video frames
    plan: TilePlan | VideoPlan
    key: str | None = None          # content key for caching encoded media across turns
    duration: float | None = None   # video: seconds of the whole clip (for time tokens); None when unknown

    @property
    def placeholders(self) -> int:
        return self.plan.placeholders if isinstance(self.plan, TilePlan) else 1

    @property
    def num_embeddings(self) -> int:
        return self.plan.num_embeddings


@dataclass
class Prompt:
    """Token ids (one placeholder id per placeholder) and the media that fill them, in order."""

    input_ids: list[int]
    media: list[MediaItem]
    text: str
    labels: list[int] | None = None   # training: token id on assistant answers, IGNORE_INDEX elsewhere
    branch: list[int] | None = None   # training, independent turns: -1 shared prefix, k = turn k

    @property
    def num_media_embeddings(self) -> int:
        return sum(m.num_embeddings for m in self.media)

    @property
    def fused_length(self) -> int:
        """Length of the sequence the LLM sees after placeholders are replaced by embeddings."""
        return len(self.input_ids) - sum(m.placeholders for m in self.media) + self.num_media_embeddings
