"""Vision -> LLM projectors with space-to-channel (STC) token compression.

Parameter names match the official ``mm_projector/model.safetensors`` (``layers.{idx}.*``, the indices of
the reference's ``nn.Sequential``), so weights load without renaming.

    mlp_downsample / mlp_downsample_2x2_fix:  STC 2x2 -> LN(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)
    mlp_downsample_3x3_fix:                    STC 3x3 -> LN(9C) -> Linear(9C, 3C) -> GELU -> LN(3C)
                                               -> Linear(3C, D) -> GELU -> Linear(D, D)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nvila.formats.config import PROJECTOR_DOWNSAMPLE, downsample_factor


class SpaceToChannel(nn.Module):
    """Fold each k x k block of a square token grid into one token with k*k*C channels.

    Zero-pads bottom/right to a multiple of k; channel blocks are row-offset-major:
    ``[(r, c), (r, c+1), ..., (r+1, c), ...]``.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape                                          # (B, S*S, C)
        S = math.isqrt(L)
        if S * S != L:
            raise ValueError(f"space-to-channel needs a square token grid, got {L} tokens")
        k = self.k
        x = x.view(B, S, S, C)
        pad = -S % k
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))                   # pad W (dim 2) then H (dim 1)
        s = (S + pad) // k
        x = x.view(B, s, k, s, k, C).permute(0, 1, 3, 2, 4, 5)     # (B, s, s, k, k, C)
        return x.reshape(B, s * s, k * k * C)                      # (B, s*s, k*k*C)


def _mlp_downsample_2x2(c: int, d: int) -> list[nn.Module]:
    return [SpaceToChannel(2), nn.LayerNorm(4 * c), nn.Linear(4 * c, d), nn.GELU(), nn.Linear(d, d)]


def _mlp_downsample_3x3(c: int, d: int) -> list[nn.Module]:
    return [
        SpaceToChannel(3),
        nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
        nn.LayerNorm(3 * c), nn.Linear(3 * c, d), nn.GELU(),
        nn.Linear(d, d),
    ]


# name -> builder(in_channels, llm_hidden) -> layers; STC factors live in nvila.formats.config.PROJECTOR_DOWNSAMPLE
PROJECTORS: dict[str, Callable[[int, int], list[nn.Module]]] = {
    "mlp_downsample": _mlp_downsample_2x2,
    "mlp_downsample_2x2_fix": _mlp_downsample_2x2,
    "mlp_downsample_3x3_fix": _mlp_downsample_3x3,
}
assert set(PROJECTORS) == set(PROJECTOR_DOWNSAMPLE)
__all__ = ["PROJECTORS", "Projector", "SpaceToChannel", "downsample_factor"]


class Projector(nn.Module):
    """(B, S*S, C) vision tokens -> (B, ceil(S/k)^2, D) LLM embeddings."""

    def __init__(self, kind: str, in_channels: int, llm_hidden: int) -> None:
        super().__init__()
        downsample_factor(kind)  # validates the name
        self.kind = kind
        self.layers = nn.Sequential(*PROJECTORS[kind](in_channels, llm_hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
