"""Pixels of the tiles a :class:`~nvila.formats.plans.TilePlan` lists.

Resizes are Pillow's ``Image.resize`` with its default filter (bicubic for RGB), exactly as the reference
does; torch's bicubic interpolation does not match Pillow's antialiased one. Normalisation follows the
SigLIP image processor's arithmetic: ``float32(uint8 * rescale in float64)``, then ``(x - mean) / std`` in
float32.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from nvila.formats.config import NvilaConfig
from nvila.formats.plans import TilePlan


def tile_images(image: Image.Image, plan: TilePlan) -> list[Image.Image]:
    """Cut ``image`` (RGB) into the plan's tiles, resizing once per distinct target size."""
    resized: dict[tuple[int, int], Image.Image] = {}
    tiles = []
    for tile in plan.tiles:
        if tile.resize not in resized:
            # Pillow returns a plain copy when the size already matches, as the reference relies on.
            resized[tile.resize] = image.resize(tile.resize)
        tiles.append(resized[tile.resize].crop(tile.box))
    return tiles


def normalize(tiles: list[Image.Image], cfg: NvilaConfig) -> torch.Tensor:
    """Stack RGB tiles into normalised pixels, shape (N, 3, S, S) float32."""
    arr = np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])          # (N, S, S, 3)
    x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # (N, 3, S, S)


def image_pixels(image: Image.Image, plan: TilePlan, cfg: NvilaConfig) -> torch.Tensor:
    """Tiles of one image as normalised pixels, (N, 3, S, S), in the plan's order."""
    return normalize(tile_images(image, plan), cfg)
