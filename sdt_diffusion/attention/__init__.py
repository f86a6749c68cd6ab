"""Spatial Decay Attention at the bottom of the stack: the paper's equations (``spatial_decay``), the
table of decay variants (``modes``) and the backends that run ``softmax(QK^T/sqrt(d) + M) V``
(``backends``), and what one token grid gives every layer of a forward (``grid.GridContext``: RoPE tables,
the backend and the grid tensors it declares).  Nothing here knows about models, pipelines or training."""

from .backends import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    available_backends,
    check_backend_name,
    dense_decay_bias,
    grid_needs,
    register_attention_backend,
    resolve_backend,
)
from .grid import GridContext
from .modes import DECAY_MODE_TABLE, DECAY_MODES, DecayInputs, DecayMode, decay_mode
from .spatial_decay import spatial_decay_bias

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "DECAY_MODES",
    "DECAY_MODE_TABLE",
    "DecayInputs",
    "DecayMode",
    "GridContext",
    "available_backends",
    "check_backend_name",
    "decay_mode",
    "dense_decay_bias",
    "grid_needs",
    "register_attention_backend",
    "resolve_backend",
    "spatial_decay_bias",
]
