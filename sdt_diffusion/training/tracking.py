"""Logging of a run: ``metrics.jsonl``, the averaged loss window, trackers (tensorboard / wandb) and sample grids."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.errors import ConfigError
from ..utils.files import atomic_write_text
from ..utils.optional import import_optional
from .step import StepStats

__all__ = ["METRICS_FILE", "LossWindow", "MetricsWriter", "log_images", "log_with", "resolve_report_to",
           "tracker_config"]

METRICS_FILE = "metrics.jsonl"

logger = logging.getLogger("sdt_diffusion.training")


class MetricsWriter:
    """``metrics.jsonl`` on the main process.

    On a (re)start at step ``s`` it keeps the lines of steps before ``s`` and the training line of ``s`` (written
    before that step's checkpoint); the held-out line of ``s`` is dropped because the resumed run evaluates the
    step again (it may be missing when a run stopped between the checkpoint and the evaluation), and so is an
    ``inexact_resume`` line of ``s``, which the resumed run writes anew if it still applies.
    """

    def __init__(self, path: Path, start_step: int, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                step = record.get("step", 0) if isinstance(record, dict) else None
                if not isinstance(step, int) or step > start_step:
                    continue
                if step == start_step and ("eval_loss" in record or "inexact_resume" in record):
                    continue
                kept.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@dataclass
class LossWindow:
    """Sums of the steps since the last training line of ``metrics.jsonl``."""

    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)  # a task's named loss terms (mse, vb, ...)
    grad_norm: float = 0.0
    steps: int = 0
    seconds: float = 0.0

    def add(self, stats: StepStats) -> None:
        self.loss += stats.loss
        for name, value in stats.terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.grad_norm += stats.grad_norm
        self.steps += 1
        self.seconds += stats.seconds

    def record(self, step: int, epoch: int, lr: float, global_batch: int, elapsed: float) -> dict[str, Any]:
        """The training line (means over the window) and a reset window."""
        n = max(self.steps, 1)
        line = {"step": step, "epoch": epoch, "loss": self.loss / n, **{k: v / n for k, v in self.terms.items()},
                "grad_norm": self.grad_norm / n, "lr": lr,
                "images_per_s": global_batch * self.steps / max(self.seconds, 1e-9), "time": elapsed}
        self.loss, self.terms, self.grad_norm, self.steps, self.seconds = 0.0, {}, 0.0, 0, 0.0
        return line


def tracker_config(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags as tracker hyper-parameters (scalars kept, anything else as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flags.items()}


def log_with(report_to: str, source: str = "") -> list[str] | None:
    """accelerate's ``log_with`` for ``report_to`` (``tensorboard``, ``wandb``, ``all`` or ``none``; ``source``:
    where the value came from, named in the error when it is not the command line).

    Raises:
        ConfigError: a tracker asked for whose package (an extra of sdt-diffusion) is not installed.
    """
    if report_to == "none":
        return None
    names = ["tensorboard", "wandb"] if report_to == "all" else [report_to]
    where = f" (from {source})" if source and source != "command line" else ""
    for name in names:  # optional dependencies: checked for only when asked for
        try:
            import_optional(name, name)
        except ImportError as e:
            raise ConfigError(f"--report-to {report_to}{where}: {e}; or pass --report-to auto or none") from None
    return names


def resolve_report_to(report_to: str, source: str = "") -> tuple[list[str] | None, str]:
    """accelerate's ``log_with`` for ``--report-to`` and, for ``auto``, the log line that says what it chose:
    tensorboard where it is installed, else no tracker (``metrics.jsonl`` is written either way).

    Raises:
        ConfigError: a tracker named explicitly is not installed (:func:`log_with`).
    """
    if report_to != "auto":
        return log_with(report_to, source), ""
    try:
        import_optional("tensorboard", "tensorboard")
    except ImportError as e:  # not installed, or installed without one of its own dependencies
        return None, f"--report-to auto: no tracker, metrics.jsonl only ({e})"
    return ["tensorboard"], "--report-to auto: tensorboard (installed)"


def log_images(accelerator: Any, grid: Any, step: int) -> None:
    """Send a sample grid (PIL image) to every tracker that takes images; a tracker error is only logged."""
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [grid]}, step=step)
        except Exception as e:  # noqa: BLE001 - a tracker hiccup must not kill training
            logger.warning("could not log the sample grid to %s: %s", tracker.name, e)
