"""One optimizer step of any training task: micro-batches, the finiteness check, AdamW and the EMA.

Per step: ``grad_accum`` micro-batches (DDP gradient sync only on the last) whose loss the task computes
(:meth:`~.engine.Task.loss`), gradient clipping, one all-reduce of ``[loss, extra terms..., grad_norm, stop]``,
a finiteness check (a non-finite loss raises :class:`NonFiniteLossError` before the weights change), the AdamW
step, the task's after-update work (e.g. BatchNorm statistics made equal on every process) and the EMA update.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .ema import EMA

__all__ = ["LossHook", "NonFiniteLossError", "StepStats", "TrainingCore", "train_step"]

LossHook = Callable[[int, torch.Tensor], torch.Tensor]
"""``hook(step, loss) -> loss``: sees (and may replace) each micro-batch's mean loss of ``step`` (1-based)
before the backward pass, e.g. to observe the loss or to inject a fault in a test."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stopped before the weights changed, without a checkpoint."""

    def __init__(self, step: int, loss: float, terms: dict[str, float] | None = None,
                 last_checkpoint: Path | None = None) -> None:
        super().__init__(step, loss)
        self.step, self.loss, self.terms = step, loss, dict(terms or {})
        self.last_checkpoint = last_checkpoint  # set by the engine, which knows it

    def __str__(self) -> str:
        where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
        terms = f" ({', '.join(f'{k} {v}' for k, v in self.terms.items())})" if self.terms else ""
        return f"non-finite training loss {self.loss} at step {self.step}{terms}; stopped without saving; {where}"


@dataclass
class TrainingCore:
    """The objects an optimizer step works on (built once by the task); a task's core adds its own.

    ``accelerator``, ``model``, ``optimizer``, ``ema`` and ``fsdp`` are what a checkpoint saves and restores
    (:func:`~.checkpointing.write_state`, :func:`~.checkpointing.load_state`).
    """

    accelerator: Any
    model: torch.nn.Module  # prepared by accelerate (DDP/FSDP wrapped)
    optimizer: torch.optim.Optimizer
    ema: EMA
    grad_accum: int
    max_grad_norm: float | None
    fsdp: bool = field(default=False, kw_only=True)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model to call outside the training step (unwrapped, except under FSDP where it must stay sharded)."""
        return self.model if self.fsdp else self.accelerator.unwrap_model(self.model)

    def ema_tensors(self) -> list[torch.Tensor]:
        """What the EMA averages (the parameters; a task may add buffers)."""
        return list(self.model.parameters())

    def forked_rng(self) -> contextlib.AbstractContextManager:
        """Fork the global RNG (and the CUDA one): work inside leaves the training streams untouched."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def before_step(self, step: int) -> None:
        """Before update ``step`` (0-based), e.g. a learning-rate schedule set from the step number."""

    def after_update(self) -> None:
        """After the optimizer step, before the EMA update."""

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's mean loss (to back-propagate) and its named terms to log (detached)."""
        raise NotImplementedError


@dataclass
class StepStats:
    """What a step reports: its loss and terms and gradient norm averaged over processes, its learning rate, the
    data epoch, whether any process asked to stop, and its time."""

    loss: float
    terms: dict[str, float]
    grad_norm: float
    lr: float
    epoch: int
    stop_requested: bool
    seconds: float


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
        core: the task's model, optimizer, EMA and loss.
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
    core.before_step(step)
    sums, names, epoch = None, [], 0
    for micro in range(core.grad_accum):
        epoch, batch = next(batches)
        last = micro == core.grad_accum - 1
        with contextlib.nullcontext() if last else core.accelerator.no_sync(core.model):
            loss, terms = core.loss(batch)
            if loss_hook is not None:
                loss = loss_hook(step + 1, loss)
            core.accelerator.backward(loss / core.grad_accum)
        names = list(terms)
        values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())])
        sums = values if sums is None else sums + values
    grad_norm = _clipped_grad_norm(core)
    flag = torch.tensor([float(stop_requested())], device=core.device)
    stats = core.accelerator.reduce(torch.cat([sums / core.grad_accum, grad_norm[None], flag]), "sum")
    means = (stats[:-1] / core.accelerator.num_processes).tolist()
    loss, terms, norm = means[0], dict(zip(names, means[1:-1])), means[-1]
    if not math.isfinite(loss):
        core.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(step + 1, loss, terms)
    lr = core.optimizer.param_groups[0]["lr"]
    core.optimizer.step()
    core.optimizer.zero_grad(set_to_none=True)
    core.after_update()
    core.ema.update(core.ema_tensors())
    return StepStats(loss, terms, norm, lr, epoch, float(stats[-1]) > 0, time.perf_counter() - start)
