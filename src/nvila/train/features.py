"""Cached vision-tower tokens for training with a frozen tower.

A frozen ViT turns the same pixels into the same tokens at every epoch, and on a CPU it is the most
expensive part of a step for video (32 frames per clip). :class:`FeatureCache` stores the tokens of each
media item once, in a folder, under a content key: the SHA-1 of the tower's weights and selection settings
plus the autocast state and the item's pixel tensor (shape, dtype, bytes). Anything that changes the pixels (frame size, frame
choice, normalisation) or the tower (another checkpoint, trained LayerNorms) gives another key, so a stale
entry is never used; several runs (an ablation's arms) share one folder. Tokens are stored exactly as the
tower computed them (float32 for a float32 tower), so a cached run trains bit for bit like an uncached one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nvila.base.errors import NvilaError
from nvila.formats.plans import MediaItem

FORMAT = "nvila-vit-tokens-1"


def tower_fingerprint(vision: torch.nn.Module) -> str:
    """SHA-1 of a vision tower's parameters and buffers (names, shapes, dtypes, values) and its selection."""
    h = hashlib.sha1(FORMAT.encode())
    h.update(repr((getattr(vision, "layers_to_run", None), getattr(vision, "drop_first_token", None))).encode())
    for name, t in sorted(vision.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """``features(model, media)`` -> the ViT tokens of every item (what ``NvilaModel.encode_media`` gives),
    computed once per distinct item and read back from ``folder`` afterwards."""

    def __init__(self, folder: str | os.PathLike, vision: torch.nn.Module) -> None:
        if any(p.requires_grad for p in vision.parameters()):
            raise NvilaError("a feature cache needs a frozen vision tower (train.parts.vision: frozen)")
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NvilaError(f"cannot create the feature cache folder {self.folder}: {e}") from None
        self.tower = tower_fingerprint(vision)
        self.hits = self.misses = 0

    def key(self, item: MediaItem, device_type: str = "cpu") -> str:
        """Content key: tower, autocast state (a bf16-autocast tower gives other tokens), pixels."""
        px = item.pixels.detach().cpu().contiguous()
        h = hashlib.sha1(self.tower.encode())
        if torch.is_autocast_enabled(device_type):
            h.update(f"autocast|{torch.get_autocast_dtype(device_type)}".encode())
        h.update(f"{tuple(px.shape)}|{px.dtype}".encode())
        h.update(px.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def features(self, model: Any, media: Sequence[MediaItem]) -> list[torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        out: list[torch.Tensor | None] = []
        todo: list[tuple[int, Path]] = []
        for i, item in enumerate(media):
            key = self.key(item, model.device.type)
            path = self.folder / key[:2] / f"{key}.safetensors"
            if path.is_file():
                try:
                    out.append(load_file(str(path))["tokens"].to(model.device))
                    self.hits += 1
                    continue
                except (OSError, KeyError, SafetensorError):
                    path.unlink(missing_ok=True)        # a torn or foreign file: recomputed below
            out.append(None)
            todo.append((i, path))
        if todo:
            with torch.no_grad():
                fresh = model.encode_media([media[i] for i, _ in todo])
            for (i, path), tokens in zip(todo, fresh):
                out[i] = tokens
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file({"tokens": tokens.detach().cpu().contiguous()}, str(tmp))
                os.replace(tmp, path)
                self.misses += 1
        return out  # type: ignore[return-value]


def media_blocks(model: Any, media: Sequence[MediaItem], features: FeatureCache | None = None) -> list[torch.Tensor]:
    """``model.embed_media(media)``, with the tower's tokens from ``features`` when given."""
    feats = features.features(model, media) if features is not None and media else None
    return model.embed_media(media, feats)
