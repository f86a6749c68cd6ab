"""The held-out loss (``eval_loss`` in ``metrics.jsonl``): the training objective on a fixed set of images.

The ``n`` evaluated images are evenly spaced through the held-out folder; the timesteps, the noise and the
VAE posterior draws come from a generator seeded by the run's seed, per image, so the value does not depend
on the number of processes.  Each process evaluates every ``num_processes``-th image, padded to equal counts
(padding has weight 0), and the sums are all-reduced.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..data import ImageClassDataset, LabelledImages, load_image_source
from ..models.vae import posterior_sample
from ..utils.errors import ConfigError
from ..utils.seeding import index_generator
from .diffusion import DiffusionSchedule, training_losses
from .plan import DataPlan

__all__ = ["HeldOutSet"]


def _label_map(source: LabelledImages, plan: DataPlan, data_dir: str) -> np.ndarray | None:
    """Held-out class ids -> training class ids, matched by class name where both have names."""
    if plan.class_names is not None and source.class_names is not None:
        unknown = sorted(set(source.class_names) - set(plan.class_names))
        if unknown:
            raise ConfigError(f"--eval-data-dir {data_dir}: classes {unknown} are not among the training classes")
        return np.array([plan.class_names.index(n) for n in source.class_names], dtype=np.int64)
    if source.num_classes > plan.num_classes:
        raise ConfigError(f"--eval-data-dir {data_dir} has {source.num_classes} classes, the training data "
                          f"{plan.num_classes}")
    return None


class HeldOutSet:
    """A fixed held-out set: fixed images (no flip), VAE draws, timesteps and noise (see the module docstring)."""

    def __init__(self, data_dir: str, max_samples: int, seed: int, plan: DataPlan, vae: Any | None,
                 accelerator: Any, batch_size: int, num_timesteps: int) -> None:
        """Raises :class:`~.config.ConfigError` naming ``--eval-data-dir`` (and the file) for any unusable input."""
        try:
            self._build(data_dir, max_samples, seed, plan, vae, accelerator, batch_size, num_timesteps)
        except ConfigError as e:
            if str(e).startswith("--eval-data-dir"):
                raise
            raise ConfigError(f"--eval-data-dir {data_dir}: {e}") from None
        except OSError as e:  # an unreadable image (named by the data reader)
            raise ConfigError(f"--eval-data-dir {data_dir}: {e}") from None

    def _build(self, data_dir: str, max_samples: int, seed: int, plan: DataPlan, vae: Any | None,
               accelerator: Any, batch_size: int, num_timesteps: int) -> None:
        with accelerator.local_main_process_first():
            source = load_image_source(data_dir=data_dir, folder_flag="--eval-data-dir")
        dataset = ImageClassDataset(source, plan.resolution, _label_map(source, plan, data_dir))
        n = min(len(dataset), max_samples)
        chosen = np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(np.int64))
        world, rank = accelerator.num_processes, accelerator.process_index
        per_rank = math.ceil(len(chosen) / world)
        self.device = accelerator.device
        self.batch_size = batch_size
        self.size = len(chosen)
        shape = (plan.latent_channels, plan.latent_size, plan.latent_size)
        items = []
        for p in range(rank, per_rank * world, world):
            real = p < len(chosen)
            index = int(chosen[p if real else 0])
            items.append(self._draw(dataset, index, seed, shape, vae, plan.scaling_factor, num_timesteps) + (real,))
        x0, labels, t, noise, real = zip(*items)
        self.x0 = torch.stack(x0)
        self.labels = torch.tensor(labels, device=self.device)
        self.t = torch.tensor(t, device=self.device)
        self.noise = torch.stack(noise).to(self.device)
        self.weight = torch.tensor([1.0 if r else 0.0 for r in real], device=self.device)

    def _draw(self, dataset: ImageClassDataset, index: int, seed: int, shape: tuple[int, int, int],
              vae: Any | None, scaling_factor: float, num_timesteps: int) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        """``(x0, label, t, noise)`` of held-out image ``index``, from its own seeded generator."""
        g = index_generator(seed, index)
        item = dataset[index]
        pixels = item["pixel_values"][None].to(self.device)
        if vae is None:
            latent = pixels[0]
        else:
            with torch.no_grad():
                dist = vae.encode(pixels).latent_dist
            vae_eps = torch.randn(shape, generator=g).to(self.device)
            latent = posterior_sample(dist.mean[0], dist.std[0], vae_eps, scaling_factor)
        t = int(torch.randint(0, num_timesteps, (1,), generator=g))
        return latent.float(), item["labels"], t, torch.randn(shape, generator=g)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, schedule: DiffusionSchedule, learn_sigma: bool,
                 accelerator: Any) -> dict[str, float]:
        """Mean ``loss``/``mse``/``vb`` over the held-out set (all processes must call it)."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        for i in range(0, len(self.x0), self.batch_size):
            sl = slice(i, i + self.batch_size)
            x0, t, noise, w = self.x0[sl], self.t[sl], self.noise[sl], self.weight[sl]
            x_t = schedule.q_sample(x0, t, noise)
            out = model(x_t, t, self.labels[sl]).sample
            terms = training_losses(out, x0, x_t, t, noise, schedule, learn_sigma)
            sums += torch.stack([(terms[k] * w).sum().double() for k in ("loss", "mse", "vb")] + [w.sum().double()])
        model.train(was_training)
        sums = accelerator.reduce(sums, "sum")
        count = float(sums[3])
        return {k: float(sums[i]) / count for i, k in enumerate(("loss", "mse", "vb"))}
