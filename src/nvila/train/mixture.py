"""A deterministic stream of training samples over a mixture of datasets.

Each dataset contributes ``round(ratio * len(dataset))`` samples to every epoch: a ratio of 2 repeats the
whole dataset twice, 0.5 takes a fresh random half each epoch. The epoch's samples are shuffled together.
The order depends only on (seed, epoch), so sample ``position`` p of the stream is the same in every run,
on every process and after a resume: a run's data position is one integer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nvila.base.errors import ConfigError
from nvila.train.data import Sample


class Mixture:
    """Samples of several datasets, addressed by a global stream position.

    Args:
        datasets: the samples of each dataset.
        ratios: share of each dataset per epoch (1.0 = every sample once).
        seed: shuffling seed.
    """

    def __init__(self, datasets: Sequence[Sequence[Sample]], ratios: Sequence[float], seed: int = 0) -> None:
        if len(datasets) != len(ratios) or not datasets:
            raise ConfigError("a mixture needs one ratio per dataset and at least one dataset")
        self.datasets = [list(d) for d in datasets]
        self.ratios = [float(r) for r in ratios]
        self.seed = seed
        self.counts = [int(round(r * len(d))) for d, r in zip(self.datasets, self.ratios)]
        empty = [i for i, n in enumerate(self.counts) if n == 0]
        if empty:
            raise ConfigError(f"datasets {empty} contribute no samples per epoch (empty, or ratio too small)")
        self.epoch_size = sum(self.counts)
        self._epoch: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(epoch_size, 2) rows of (dataset index, sample index) in the order they are trained."""
        rng = np.random.default_rng([self.seed, epoch])
        rows = []
        for d, (samples, n) in enumerate(zip(self.datasets, self.counts)):
            full, rest = divmod(n, len(samples))
            picks = [np.arange(len(samples))] * full
            if rest:
                picks.append(rng.permutation(len(samples))[:rest])
            idx = np.concatenate(picks)
            rows.append(np.stack([np.full_like(idx, d), idx], axis=1))
        order = np.concatenate(rows)
        return order[rng.permutation(len(order))]

    def __getitem__(self, position: int) -> Sample:
        epoch, offset = divmod(position, self.epoch_size)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_order(epoch))
        d, i = self._epoch[1][offset]
        return self.datasets[int(d)][int(i)]
