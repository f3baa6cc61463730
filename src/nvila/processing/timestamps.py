"""Time tokens (NVILA-8B-Video): ``<tK>`` in an answer -> seconds into the clip.

Checkpoints trained for temporal localisation declare ``num_time_tokens`` N (and ``time_token_ids``) in their
config; the tokens ``<t0>`` ... ``<tN-1>`` are ordinary added tokens, spread evenly over the clip, so
``<tK>`` stands for ``round(K * duration / (N - 1), 2)`` seconds; a K beyond the last token maps to the
duration. Prompts stay plain text (as in the reference); only answers are rendered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_FORMAT = "<t{t}>"


@dataclass(frozen=True)
class Segment:
    """A span the answer gives as a pair of time tokens, in seconds."""

    start: float
    end: float


@dataclass(frozen=True)
class TimeTokens:
    """The time tokens of a checkpoint: how many, and how they are written."""

    count: int
    token_format: str = DEFAULT_FORMAT

    @property
    def pattern(self) -> re.Pattern[str]:
        head, _, tail = self.token_format.partition("{t}")
        return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))

    def seconds(self, k: int, duration: float) -> float:
        """Seconds of token ``k`` in a clip of ``duration`` seconds."""
        if k >= self.count - 1:
            return round(duration, 2)
        return round(k * duration / (self.count - 1), 2)

    def render(self, text: str, duration: float) -> tuple[str, list[Segment]]:
        """``text`` with every time token written as seconds (``12.5s``), and the segments its tokens pair into
        (1st with 2nd, 3rd with 4th, ...)."""
        times: list[float] = []

        def written(match: re.Match[str]) -> str:
            times.append(self.seconds(int(match.group(1)), duration))
            return f"{times[-1]:g}s"

        out = self.pattern.sub(written, text)
        return out, [Segment(a, b) for a, b in zip(times[0::2], times[1::2])]
