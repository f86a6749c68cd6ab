"""What one token grid gives every Spatial Decay Attention layer of a forward: :class:`GridContext`.

A model builds one context per grid and forward (SDT-P: one per forward; SDT-H: one per stage) with
:meth:`GridContext.build` and passes that one object to each block.  The context holds the RoPE tables
(eq. 13), the attention backend the request resolves to on this device and grid, and the grid tensors that
backend declares it reads (``backends.grid_needs``: the threshold codes of the low-rank identity for
``augmented``, the distance matrix of eq. 7 for ``dense``, nothing for the others).  Models never name a
backend: the choice and its needs live here and in :mod:`~sdt_diffusion.attention.backends`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import backends
from . import spatial_decay as eq
from .modes import decay_mode as decay_mode_spec

# How each grid tensor a backend may need is built from the grid size: name -> f(height, width, device).
GRID_TENSORS: dict[str, Callable[[int, int, torch.device], Tensor]] = {
    "codes": eq.threshold_codes,  # V, (L, H + W - 2): d(i, j) = (H + W - 2)/2 - 1/2 V_i . V_j
    "distance": eq.manhattan_distance,  # d(i, j), (L, L), eq. 7
}


@dataclass(frozen=True)
class GridContext:
    """Everything the attention layers of one forward share on a ``height`` x ``width`` token grid.

    Attributes:
        height, width: the token grid (row-major token order, L = height * width).
        decay_mode: the decay variant the backend was chosen for (a layer with another variant refuses it).
        backend_name: the backend the request resolved to (never ``"auto"``).
        backend: the backend function ``(q, k, v, decay) -> out``.
        rope: ``spatial_decay.rope_tables`` (cos, sin), each (L, d), of the requested layout, or None without RoPE.
        codes: ``spatial_decay.threshold_codes`` (L, H + W - 2) when the backend reads them, else None.
        distance: ``spatial_decay.manhattan_distance`` (L, L) when the backend reads it, else None.
    """

    height: int
    width: int
    decay_mode: str
    backend_name: str
    backend: backends.AttentionBackend
    rope: tuple[Tensor, Tensor] | None = None
    codes: Tensor | None = None
    distance: Tensor | None = None

    @property
    def tokens(self) -> int:
        """L = height * width."""
        return self.height * self.width

    @classmethod
    def build(
        cls,
        height: int,
        width: int,
        *,
        head_dim: int,
        decay_mode: str,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        use_rope: bool = True,
        rope_base: float = 10000.0,
        rope_layout: str = "2d",
    ) -> GridContext:
        """The context of an ``height`` x ``width`` grid for layers of head width ``head_dim`` and ``decay_mode``.

        Args:
            backend: an ``attention_backend`` value; ``"auto"`` resolves for this device, mode and token count
                (``backends.auto_backend_name``).
            device: where the tables live (the activations' device).
            dtype: the activations' dtype; the RoPE tables are float32, or float64 in a float64 model.
            use_rope: build the RoPE tables (eq. 13) with frequency base ``rope_base``.
            rope_layout: ``"2d"`` (axial 2D RoPE, SDT's) or ``"1d"`` (RMT's RoPE on the raster index);
                ``spatial_decay.rope_angles``.
        """
        if not all(isinstance(n, (int, torch.SymInt)) and n > 0 for n in (height, width)):
            raise ValueError(f"the token grid must have positive integer sides, got {height!r} x {width!r}")
        decay_mode_spec(decay_mode)  # a ValueError naming the choices
        eq.check_rope_layout(rope_layout)
        backends.check_backend_name(backend)
        device = torch.device("cpu") if device is None else torch.device(device)
        name = backends.resolve_backend_name(backend, device, decay_mode, height * width)
        fn = backends.ATTENTION_BACKENDS[name]  # looked up per build: a backend registered later is found
        grid = {need: GRID_TENSORS[need](height, width, device) for need in backends.grid_needs(name, decay_mode)}
        rope = None
        if use_rope:
            angles = eq.rope_angles(rope_layout, height, width, head_dim, rope_base, device)
            rope = eq.rope_tables(angles.to(torch.promote_types(dtype, torch.float32)))  # float64 in a float64 model
        return cls(height, width, decay_mode, name, fn, rope, **grid)


__all__ = ["GRID_TENSORS", "GridContext"]
