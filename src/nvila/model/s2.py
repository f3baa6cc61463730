"""Dynamic-S2 multi-scale feature merge (NVILA-8B/15B).

Per image the ViT saw: 1 tile at scale 1, k*k tiles at each further square scale, and rows x cols tiles at
the last scale. Each scale's tile features are stitched back into one map, area-resized (float32) to the
last scale's map, concatenated on channels in scale order, and cut back into rows x cols chunks of one
tile's grid, ready for the projector. After projection the chunks are stitched into one map and read in
raster order over the whole image (not tile by tile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def stitch(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, G*G, C) row-major tiles -> (C, rows*G, cols*G) map."""
    n, L, C = tiles.shape
    G = int(L**0.5)
    x = tiles.view(rows, cols, G, G, C).permute(4, 0, 2, 1, 3)            # (C, rows, G, cols, G)
    return x.reshape(C, rows * G, cols * G)


def split(feature_map: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(C, rows*G, cols*G) map -> (rows*cols, G*G, C) row-major chunks, row-major tokens inside."""
    C, H, W = feature_map.shape
    g_h, g_w = H // rows, W // cols
    x = feature_map.view(C, rows, g_h, cols, g_w).permute(1, 3, 2, 4, 0)  # (rows, cols, g, g, C)
    return x.reshape(rows * cols, g_h * g_w, C)


def merge_scales(tiles: torch.Tensor, scale_factors: list[int], block: tuple[int, int]) -> torch.Tensor:
    """Merge one image's multi-scale tile features.

    Args:
        tiles: (1 + sum k^2 + rows*cols, G*G, C) ViT tokens in the tiler's order.
        scale_factors: k of each square scale but the last (e.g. [1, 2] for 448/896/1344).
        block: (rows, cols) of the last scale.
    Returns:
        (rows*cols, G*G, C * (len(scale_factors) + 1)) chunks for the projector.
    """
    rows, cols = block
    expected = sum(k * k for k in scale_factors) + rows * cols
    if tiles.shape[0] != expected:
        raise ValueError(f"S2 merge got {tiles.shape[0]} tiles, expected {expected}")
    maps, start = [], 0
    for k in scale_factors:
        maps.append(stitch(tiles[start : start + k * k], k, k))
        start += k * k
    maps.append(stitch(tiles[start : start + rows * cols], rows, cols))
    out_hw = maps[-1].shape[1:]
    resized = [
        F.interpolate(m[None].float(), size=out_hw, mode="area")[0].to(m.dtype) if m.shape[1:] != out_hw else m
        for m in maps
    ]
    return split(torch.cat(resized, dim=0), rows, cols)


def raster_tokens(chunks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, g*g, D) projected chunks -> (rows*g * cols*g, D) tokens in raster order."""
    full = stitch(chunks, rows, cols)                                      # (D, rows*g, cols*g)
    return full.flatten(1).transpose(0, 1)
