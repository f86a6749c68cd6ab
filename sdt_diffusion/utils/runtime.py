"""Process set-up shared by the training, latent-extraction and sampling entry points."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["MAX_NUM_WORKERS", "MAX_PER_DEVICE_BATCH", "cpu_multiprocess", "default_device", "enable_tf32", "ieee_fp32"]

# Bounds every command checks before anything is allocated or started: a batch far above any accelerator's
# memory, and more data-loader worker processes per process than the largest machines have cores (each worker is
# a process: --num-workers 10**6 would fork until the machine stops).
MAX_PER_DEVICE_BATCH = 65_536
MAX_NUM_WORKERS = 256


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` if given, else CUDA when available, else the CPU."""
    if requested not in (None, "auto"):
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_multiprocess() -> bool:
    """True when several processes were launched without CUDA (``accelerate launch --multi_gpu`` on a CPU
    machine), where accelerate must be told ``cpu=True`` to use gloo on the CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def enable_tf32(enabled: bool = True) -> None:
    """Allow (or forbid) TF32 matmuls and convolutions on Ampere and newer GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Run the block with TF32 switched off (IEEE float32 convolutions and matmuls), then restore.

    Uses the ``fp32_precision`` settings where torch has them (2.9 and later): once those have been set, torch
    refuses to read the legacy ``allow_tf32`` flags, so the two are never mixed here.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
    enable_tf32(False)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved
