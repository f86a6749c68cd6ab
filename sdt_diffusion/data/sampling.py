"""Seeded sampling: every random choice about the data (order, flips) is a pure function of ``(seed, epoch)``.

:class:`EpochSampler` makes the stream of batches a function of the seed, the epoch, the number of processes and
the per-device batch alone: independent of data-loader workers, of the training RNG and of restarts.  Resuming
replays an epoch's keys and skips the consumed batches (:func:`iterate_batches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from accelerate.data_loader import skip_first_batches as accelerate_skip_first_batches
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ..utils.errors import ConfigError

__all__ = ["EpochSampler", "iterate_batches"]


class EpochSampler(Sampler):
    """DistributedSampler-like keys ``(index, flip)`` for one process, a pure function of ``(seed, epoch)``.

    Each epoch draws one permutation and one flip bit per sample from ``numpy.random.default_rng([seed,
    epoch])``, drops the tail that does not divide evenly across processes, and gives process ``rank`` every
    ``num_replicas``-th key, so the processes' keys are disjoint.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, random_flip: bool = True) -> None:
        if num_samples < num_replicas:
            raise ConfigError(f"{num_samples} samples cannot be split across {num_replicas} processes")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas

    def epoch_keys(self, epoch: int) -> list[tuple[int, int]]:
        """This process's keys of ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        flips = rng.integers(0, 2, self.num_samples) if self.random_flip else np.zeros(self.num_samples, np.int64)
        keep = len(self) * self.num_replicas
        mine = order[:keep][self.rank::self.num_replicas]
        return [(int(i), int(flips[i])) for i in mine]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.epoch_keys(self.epoch))


def iterate_batches(
    dataset: Dataset,
    sampler: EpochSampler,
    batch_size: int,
    start_batch: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    skip_first_batches: Callable[[DataLoader, int], DataLoader] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless ``(epoch, batch)`` stream of this process, starting after ``start_batch`` consumed batches.

    Batches are ``batch_size`` keys (the last partial one of an epoch is dropped).  Skipping inside the
    resumed epoch uses ``skip_first_batches`` (``accelerator.skip_first_batches``), which skips keys, not
    decoded images.  The loader gets its own generator so creating it never consumes the global RNG.
    """
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"each process sees {len(sampler)} samples per epoch, fewer than one batch of {batch_size}; "
            f"use a smaller batch or more data"
        )
    skip_first_batches = skip_first_batches or accelerate_skip_first_batches
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_sampler=BatchSampler(sampler, batch_size, drop_last=True),
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(sampler.seed),
        )
        if skip:
            loader = skip_first_batches(loader, skip)
            skip = 0
        for batch in loader:
            yield epoch, batch
        epoch += 1
