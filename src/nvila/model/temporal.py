"""Temporal-spatial pooling (TSP) of projected video frame tokens (NVILA-8B-Video).

Pooling happens after the projector, in LLM embedding space: (T, n, D) frame tokens are viewed as a
(T, s, s, D) volume and averaged over non-overlapping (t, h, w) boxes.
"""

from __future__ import annotations

import math

import torch


def tsp_pool(frames: torch.Tensor, pool: tuple[int, int, int]) -> torch.Tensor:
    """(T, s*s, D) -> (T/t, (s/h)*(s/w), D) by averaging t consecutive frames and h x w cells."""
    T, n, D = frames.shape
    s = math.isqrt(n)
    t, h, w = pool
    if T % t or s % h or s % w:
        raise ValueError(f"cannot pool {T} frames of {s}x{s} tokens by {pool}")
    x = frames.view(T // t, t, s // h, h, s // w, w, D).mean(dim=(1, 3, 5))  # (T/t, s/h, s/w, D)
    return x.reshape(T // t, (s // h) * (s // w), D)
