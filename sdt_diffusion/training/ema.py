"""DiT's exponential moving average of the weights: constant decay from the first step.

DiT initialises the EMA as a copy of the model and after every optimizer step sets
``ema ← decay·ema + (1 − decay)·θ`` (0.9999).  ``diffusers.training_utils.EMAModel(decay=d, min_decay=d)``
is almost this, except that its first update uses decay 0 (``get_decay`` returns 0 for the first step
before applying ``min_decay``), i.e. it copies the weights after step 1.  This class is exact.

It tracks whatever parameter tensors the (possibly wrapped) model exposes: full tensors under DDP, local
shards under FSDP.  ``state_dict``/``load_state_dict`` expose its state; checkpoints store it as safetensors
(``checkpointing.write_state``), never through accelerate's pickled custom state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["EMA"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local part of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of ``parameters`` with a constant ``decay``."""

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = [_local(p.detach()).clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: Iterable[nn.Parameter]) -> None:
        """``shadow ← shadow + (1 − decay)(θ − shadow)`` for every tracked tensor."""
        params = [_local(p.detach()) for p in parameters]
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(params)}")
        weight = 1.0 - self.decay
        if params:
            torch._foreach_lerp_(self.shadow, [p.to(s.dtype) for p, s in zip(params, self.shadow)], weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        """Write the averaged weights into ``parameters``."""
        for s, p in zip(self.shadow, parameters):
            _local(p.data).copy_(s)

    @contextlib.contextmanager
    def swapped_into(self, parameters: Iterable[nn.Parameter]) -> Iterator[None]:
        """Temporarily load the EMA weights into ``parameters`` (restored on exit, also on errors)."""
        params = list(parameters)
        backup = [_local(p.detach()).clone() for p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, params):
                    _local(p.data).copy_(b)

    def state_dict(self) -> dict:
        """``{"decay", "num_updates", "shadow"}`` (tensors by reference)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (shapes must match the tracked tensors)."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state has {len(shadow)} tensors, this model has {len(self.shadow)}")
        with torch.no_grad():
            for dst, src in zip(self.shadow, shadow):
                if dst.shape != src.shape:
                    raise ValueError(f"EMA tensor shape {tuple(src.shape)} does not match {tuple(dst.shape)}")
                dst.copy_(src.to(dst.device, dst.dtype))
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
