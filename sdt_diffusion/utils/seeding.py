"""Per-item seeds: item ``index`` of a run seeded ``seed`` always gets the same random stream, whatever
the batch it lands in or the number of processes."""

from __future__ import annotations

import torch

__all__ = ["index_generator", "index_seed"]

_MIX = 1_000_003  # a prime: (seed, index) pairs map to distinct seeds for any index below it
_MAX_SEED = 2**63 - 1


def index_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` in a run seeded ``seed``."""
    return (seed * _MIX + index) % _MAX_SEED


def index_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with :func:`index_seed` (on the CPU by default, for device-independent draws)."""
    return torch.Generator(device).manual_seed(index_seed(seed, index))
