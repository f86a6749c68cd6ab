"""One optimizer step of DiT's recipe: micro-batches, the hybrid loss, the finiteness check, AdamW and the EMA.

Per step: ``grad_accum`` micro-batches (DDP gradient sync only on the last), gradient clipping, one
all-reduce of ``[loss, mse, vb, grad_norm, stop]``, a finiteness check (a non-finite loss raises
:class:`NonFiniteLossError` before the weights change), the AdamW step and the EMA update.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.vae import posterior_sample
from .diffusion import DiffusionSchedule, training_losses
from .ema import EMA

__all__ = ["LossHook", "NonFiniteLossError", "StepStats", "TrainingCore", "encode_batch", "train_step"]

LossHook = Callable[[int, torch.Tensor], torch.Tensor]
"""``hook(step, loss) -> loss``: sees (and may replace) each micro-batch's mean loss of ``step`` (1-based)
before the backward pass, e.g. to observe the loss or to inject a fault in a test."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stopped before the weights changed, without a checkpoint."""

    def __init__(self, step: int, loss: float, mse: float, vb: float, last_checkpoint: Path | None = None) -> None:
        super().__init__(step, loss, mse, vb)
        self.step, self.loss, self.mse, self.vb = step, loss, mse, vb
        self.last_checkpoint = last_checkpoint  # set by the trainer, which knows it

    def __str__(self) -> str:
        where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
        return (f"non-finite training loss {self.loss} at step {self.step} (mse {self.mse}, vb {self.vb}); "
                f"stopped without saving; {where}")


@dataclass
class TrainingCore:
    """The objects an optimizer step works on (built once by the trainer)."""

    accelerator: Any
    model: torch.nn.Module  # prepared by accelerate (DDP/FSDP wrapped)
    optimizer: torch.optim.Optimizer
    ema: EMA
    vae: Any | None  # AutoencoderKL for on-the-fly encoding; None for pixels or a latent cache
    schedule: DiffusionSchedule
    learn_sigma: bool
    scaling_factor: float
    grad_accum: int
    max_grad_norm: float | None
    fsdp: bool

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model to call outside the training step (unwrapped, except under FSDP where it must stay sharded)."""
        return self.model if self.fsdp else self.accelerator.unwrap_model(self.model)

    def device_rng(self) -> contextlib.AbstractContextManager:
        """Fork the global RNG (and the CUDA one): work inside leaves the training streams untouched."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])


@dataclass
class StepStats:
    """What a step reports: losses and gradient norm averaged over processes, the data epoch and whether any
    process asked to stop."""

    loss: float
    mse: float
    vb: float
    grad_norm: float
    epoch: int
    stop_requested: bool
    seconds: float


def encode_batch(batch: dict[str, torch.Tensor], vae: Any | None, scaling_factor: float, device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Training inputs ``x_0`` of a batch: a posterior sample ``(μ + σ ε)·s`` of the latents (cache or VAE
    on the fly, the same draw from the same RNG) or the pixels themselves without a VAE."""
    if "latent_mean" in batch:
        mean = batch["latent_mean"].to(device, non_blocking=True)
        std = batch["latent_std"].to(device, non_blocking=True)
        eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator else device)
        return posterior_sample(mean, std, eps.to(device), scaling_factor)
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    if vae is None:
        return pixels
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.sample(generator=generator) * scaling_factor


def _micro_batch(core: TrainingCore, batch: dict[str, torch.Tensor], step: int, sync: bool,
                 loss_hook: LossHook | None) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns the detached ``[loss, mse, vb]`` means."""
    device = core.device
    x0 = encode_batch(batch, core.vae, core.scaling_factor, device)
    labels = batch["labels"].to(device, non_blocking=True)
    t = torch.randint(0, core.schedule.num_timesteps, (x0.shape[0],), device=device)
    noise = torch.randn_like(x0)
    x_t = core.schedule.q_sample(x0, t, noise)
    with contextlib.nullcontext() if sync else core.accelerator.no_sync(core.model):
        out = core.model(x_t, t, labels).sample
        terms = training_losses(out, x0, x_t, t, noise, core.schedule, core.learn_sigma)
        loss = terms["loss"].mean()
        if loss_hook is not None:
            loss = loss_hook(step, loss)
        core.accelerator.backward(loss / core.grad_accum)
    return torch.stack([loss.detach(), terms["mse"].detach().mean(), terms["vb"].detach().mean()])


def _clipped_grad_norm(core: TrainingCore) -> torch.Tensor:
    """Clip to ``max_grad_norm`` (no clipping when ``None``) and return the total norm as a 0-d float tensor."""
    norm = core.accelerator.clip_grad_norm_(core.model.parameters(), core.max_grad_norm or float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return torch.as_tensor(norm, device=core.device, dtype=torch.float32).reshape(())


def train_step(core: TrainingCore, batches: Iterator[tuple[int, dict[str, Any]]], step: int,
               stop_requested: Callable[[], bool], loss_hook: LossHook | None = None) -> StepStats:
    """Optimizer step number ``step + 1``; all processes must call it.

    Args:
        core: model, optimizer, EMA and diffusion objective.
        batches: this process's ``(epoch, batch)`` stream (:func:`~.data.iterate_batches`).
        step: optimizer steps done so far.
        stop_requested: whether this process received a stop signal, asked once the micro-batches are done
            (the answer is shared with the other processes through the all-reduce).
        loss_hook: optional :data:`LossHook`.

    Raises:
        NonFiniteLossError: the averaged loss is NaN/inf; gradients are dropped and the weights and EMA are
            left as they were.
    """
    start = time.perf_counter()
    core.model.train()
    sums = torch.zeros(3, device=core.device)
    epoch = 0
    for micro in range(core.grad_accum):
        epoch, batch = next(batches)
        sums += _micro_batch(core, batch, step + 1, micro == core.grad_accum - 1, loss_hook)
    grad_norm = _clipped_grad_norm(core)
    flag = torch.tensor([float(stop_requested())], device=core.device)
    stats = core.accelerator.reduce(torch.cat([sums / core.grad_accum, grad_norm[None], flag]), "sum")
    loss, mse, vb, norm = (stats[:4] / core.accelerator.num_processes).tolist()
    if not math.isfinite(loss):
        core.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(step + 1, loss, mse, vb)
    core.optimizer.step()
    core.optimizer.zero_grad(set_to_none=True)
    core.ema.update(core.model.parameters())
    return StepStats(loss, mse, vb, norm, epoch, float(stats[4]) > 0, time.perf_counter() - start)
