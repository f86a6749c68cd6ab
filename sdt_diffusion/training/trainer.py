"""The diffusion task behind ``accelerate launch training/train.py`` and ``sdt-train`` (DiT's recipe for SDT-P).

Entry points: :func:`main` (command line), :func:`cli` (the process: ``python -m sdt_diffusion.training.trainer``)
and :func:`train` (parsed flags or :class:`~.diffusion_config.DiffusionSettings`; returns a
:class:`~.engine.TrainResult`).  The loop, checkpoints, resume, signals and logging are the engine's
(:mod:`.engine`); this module supplies what is particular to diffusion (:class:`DiffusionTask`):

* plan (:func:`~.plan.plan_diffusion`): the data (image folder, ``datasets`` dataset or latent cache), the VAE, the
  model config (SDT-P or DiT), the sample classes; then every image decoded (``--verify-images``);
* build: the VAE, the model, AdamW (constant lr), the EMA, the noise schedule, the held-out set;
* the loss (:meth:`DiffusionCore.loss`): a posterior draw of the latents, a timestep and noise per image, the
  hybrid loss ``mse + vb`` (:mod:`.diffusion`);
* after each checkpoint: the held-out loss (:mod:`.heldout`), EMA sample grids and the EMA pipeline export
  (:mod:`.export`, with its model card, :mod:`.cards`) at their intervals, all of them at the last step.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate.utils import set_seed

from ..data import UnreadableImageError, verify_images
from ..models import count_parameters
from ..models.registry import build_transformer, learns_sigma
from ..models.vae import posterior_sample
from ..schedulers import default_scheduler
from ..utils.errors import ConfigError
from ..utils.files import atomic_write
from ..utils.runtime import enable_tf32
from . import engine
from .cards import SAMPLES_DIR, pipeline_card_facts
from .data_stream import DATA, class_key
from .diffusion import DiffusionSchedule, training_losses
from .diffusion_config import DiffusionSettings, parse_args, settings_from_args
from .ema import EMA
from .engine import Run, TrainResult
from .export import ema_transformer, export_pipeline, load_vae, sample_grid
from .fid import FID_DIR, TrainingFid, fid_due
from .heldout import HeldOutSet
from .init_from import diffusion_weight_names, init_record, load_init_weights, log_init
from .plan import DiffusionPlan, plan_diffusion
from .step import LossHook, NonFiniteLossError, TrainingCore
from .tracking import log_images

__all__ = ["DiffusionCore", "DiffusionTask", "NonFiniteLossError", "TrainResult", "cli", "encode_batch", "main",
           "parse_args", "train"]

logger = logging.getLogger("sdt_diffusion.training")
# DDP notices that the depthwise LPE kernels' gradients (C, 1, k, k) carry a different (equivalent) stride for the
# size-1 dimension than its bucket views; harmless, and otherwise printed by every process.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


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


@dataclass
class DiffusionCore(TrainingCore):
    """The engine's core plus the VAE (``None`` for pixels or a latent cache) and the diffusion objective."""

    vae: Any | None
    schedule: DiffusionSchedule
    learn_sigma: bool
    scaling_factor: float

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DiT's hybrid loss of one micro-batch at a uniformly drawn timestep per image."""
        device = self.device
        x0 = encode_batch(batch, self.vae, self.scaling_factor, device)
        labels = batch["labels"].to(device, non_blocking=True)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        out = self.model(x_t, t, labels).sample
        terms = training_losses(out, x0, x_t, t, noise, self.schedule, self.learn_sigma)
        return terms["loss"].mean(), {"mse": terms["mse"].detach().mean(), "vb": terms["vb"].detach().mean()}


def evaluate_held_out(held_out: HeldOutSet, core: DiffusionCore) -> tuple[dict[str, float], dict[str, float]]:
    """``(online, ema)`` held-out losses of the training weights and of the EMA (all processes must call it);
    the training RNG streams are left untouched."""
    model = core.eval_model
    with core.forked_rng():
        online = held_out.evaluate(model, core.schedule, core.learn_sigma, core.accelerator)
        with core.ema.swapped_into(core.model.parameters()):
            averaged = held_out.evaluate(model, core.schedule, core.learn_sigma, core.accelerator)
    return online, averaged


class DiffusionTask(engine.Task):
    """Class-conditional latent diffusion (SDT-P or DiT) with DiT's recipe."""

    name = "diffusion"
    prog = "train.py"
    export_name = "pipeline"
    legacy_model_defaults = {"_class_name": "SDTTransformer2DModel"}  # checkpoints from before DiT could be trained
    quiet_loggers = ("accelerate", "diffusers", "datasets", "torch")
    step_output_dirs = (SAMPLES_DIR, FID_DIR)  # samples/step-<n>.png, fid/step-<n>/ (a rollback moves newer ones)
    input_errors = (UnreadableImageError,)  # an image that broke during training (see --verify-images)

    def __init__(self) -> None:
        self.held_out: HeldOutSet | None = None
        self.fid: TrainingFid | None = None  # --fid-every

    def plan(self, settings: DiffusionSettings, accelerator: Any, **layout: Any) -> DiffusionPlan:
        return plan_diffusion(settings, accelerator, **layout)

    def check_plan(self, settings: DiffusionSettings, plan: DiffusionPlan, accelerator: Any) -> None:
        """Every training image decoded first (``--verify-images``, :func:`~..data.verify_images`), as the
        classification trainer does; a latent cache holds no images."""
        if plan.data.kind == "images":
            verify_images([plan.data.dataset.source], settings.data.verify_images, accelerator)
        if not plan.finished:  # the reference and the Inception weights (--fid-every), before any compute
            self.fid = TrainingFid.prepare(settings.fid, settings.run.seed, plan.data.resolution,
                                           accelerator.is_main_process)

    def exported(self, output_dir: Path) -> bool:
        return (output_dir / self.export_name / "model_index.json").is_file()

    def stream_fingerprint(self, settings: DiffusionSettings, plan: DiffusionPlan) -> dict[str, Any]:
        """The images (file list and sizes, a ``datasets`` dataset's fingerprint, or the latent cache's metadata and shard
        sizes), the class names, the resolution and ``random_flip`` (the sampler draws the flips)."""
        d = plan.data
        data = d.dataset.fingerprint() if d.kind == "latents" else d.dataset.source.fingerprint()
        return {DATA: data, class_key(data): d.class_names, "resolution": d.resolution,
                "random_flip": settings.latents.random_flip}

    def build(self, settings: DiffusionSettings, plan: DiffusionPlan, accelerator: Any) -> DiffusionCore:
        """The VAE, the model, AdamW and the EMA, seeded alike on every process (identical initial weights); the
        held-out set."""
        set_seed(settings.run.seed)
        if settings.optim.allow_tf32:
            enable_tf32()
        vae = load_vae(plan.data.vae_name, plan.data.vae_subfolder)
        if vae is not None:
            vae.to(accelerator.device)
        try:
            model = build_transformer(plan.model_config)
        except ValueError as e:
            raise ConfigError(f"bad model configuration: {e}") from None
        if plan.init is not None:  # --init-from: the source's weights (the EMA below starts from them)
            load_init_weights(model, plan.init, plan.class_mapping, *diffusion_weight_names(model))
            if accelerator.is_main_process:
                log_init(plan.init, plan.class_mapping, "class table")
        if accelerator.is_main_process:
            logger.info("model %s: %.2fM parameters, config %s", plan.model_name,
                        count_parameters(model, trainable_only=False) / 1e6, plan.model_config)
        learn_sigma = learns_sigma(model)
        if settings.optim.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        optim = settings.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=optim.learning_rate, weight_decay=optim.weight_decay)
        model, optimizer = accelerator.prepare(model, optimizer)
        core = DiffusionCore(accelerator, model, optimizer, EMA(model.parameters(), decay=optim.ema_decay), plan.accum,
                             optim.max_grad_norm, vae, DiffusionSchedule.from_scheduler(default_scheduler(learn_sigma)),
                             learn_sigma, plan.data.scaling_factor, fsdp=str(accelerator.distributed_type).endswith("FSDP"))
        if settings.data.eval_data_dir:
            with torch.random.fork_rng(devices=[]):
                self.held_out = HeldOutSet(settings.data.eval_data_dir, settings.held_out.eval_max_samples,
                                           settings.run.seed, plan.data, vae, accelerator, plan.per_device,
                                           core.schedule.num_timesteps)
        return core

    def start(self, run: Run) -> None:
        plan, s = run.plan, run.settings
        if run.is_main:
            (run.out / SAMPLES_DIR).mkdir(exist_ok=True)
            d = plan.data
            logger.info("data: %s, %d samples, %d classes, inputs %dx%dx%d; %d processes x %d per device x %d "
                        "accumulation = global batch %d", d.kind, len(d.labels), d.num_classes, d.latent_channels,
                        d.latent_size, d.latent_size, plan.world, plan.per_device, plan.accum,
                        s.run.global_batch_size)
        if self.fid is not None:
            self.fid.start(run)

    def state_record(self, run: Run) -> dict[str, Any]:
        d = run.plan.data  # the resolved VAE (None in pixel space): an export needs nothing else
        return {"id2label": d.id2label, "vae": d.vae_name, "vae_subfolder": d.vae_subfolder,
                "model": run.plan.model_name, **init_record(run.plan)}

    def config_record(self, plan: DiffusionPlan) -> dict[str, Any]:
        return init_record(plan)

    def dataset(self, run: Run) -> Any:
        return run.plan.data.dataset

    def before_loop(self, run: Run, step: int) -> None:
        if self.held_out is not None and step == 0:
            self.evaluate(run, 0)  # the starting point of the held-out curve

    def evaluate(self, run: Run, step: int) -> None:
        """Held-out losses of the online and the EMA weights, written to ``metrics.jsonl`` and the trackers."""
        online, averaged = evaluate_held_out(self.held_out, run.core)
        record = {"step": step, "eval_loss": online["loss"], "eval_mse": online["mse"], "eval_vb": online["vb"],
                  "eval_loss_ema": averaged["loss"]}
        run.metrics.write(record)
        run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if run.is_main:
            logger.info("step %d: held-out loss %.5f (EMA %.5f) on %d images", step, online["loss"],
                        averaged["loss"], self.held_out.size)

    def export_and_sample(self, run: Run, step: int, export: bool, samples: bool) -> None:
        """A labelled grid of EMA samples and/or the EMA pipeline export (all processes gather the EMA)."""
        core, s = run.core, run.settings
        with core.forked_rng():
            transformer = ema_transformer(core.accelerator, core.model, core.ema)
            if run.is_main and samples:
                grid = sample_grid(transformer, core.vae, run.plan.data.id2label, run.plan.sample_classes,
                                   core.device, s.samples.sample_steps, s.samples.guidance_scale, s.run.seed)
                atomic_write(run.out / SAMPLES_DIR / f"step-{step:07d}.png", lambda f: grid.save(f, format="PNG"))
                log_images(core.accelerator, grid, step)
            if run.is_main and export:
                card = pipeline_card_facts(transformer, run.plan.data.id2label, run.out, step,
                                           location=str(run.export_dir), repo_id=s.hub.hub_model_id,
                                           license=s.hub.hub_license, model=run.plan.model_name)
                path = export_pipeline(transformer, core.vae, run.plan.data.id2label, run.export_dir, card)
                logger.info("exported the EMA pipeline to %s", path)
        core.accelerator.wait_for_everyone()

    def after_checkpoint(self, run: Run, step: int, final: bool) -> None:
        """The held-out loss, sample grid and export at their intervals (all of them at the last step)."""
        every = run.settings.samples
        if self.held_out is not None and (step % run.settings.held_out.eval_every == 0 or final):
            self.evaluate(run, step)
        if self.fid is not None and fid_due(step, final, run.settings.fid.fid_every):
            self.fid.evaluate(run, step)
        export = final or (bool(every.export_every) and step % every.export_every == 0)
        samples = bool(every.sample_every) and (final or step % every.sample_every == 0)
        if export or samples:
            self.export_and_sample(run, step, export, samples)


def train(args: argparse.Namespace | DiffusionSettings, *, loss_hook: LossHook | None = None) -> TrainResult:
    """Run (or resume) diffusion training (see :func:`~.engine.train`).

    Args:
        args: flags from :func:`~.diffusion_config.parse_args` or :class:`~.diffusion_config.DiffusionSettings`.
        loss_hook: optional ``hook(step, loss) -> loss`` applied to every micro-batch loss.

    Raises:
        ConfigError: a bad flag, data or checkpoint (before any compute).
        NonFiniteLossError: the loss became NaN/inf (nothing is saved after the last good checkpoint).
    """
    settings = args if isinstance(args, DiffusionSettings) else settings_from_args(args)
    return engine.train(DiffusionTask(), settings, loss_hook)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 non-finite loss or unreadable image found during
    training, 2 bad flags or input)."""
    return engine.run_command(DiffusionTask, lambda: train(parse_args(argv)))


def cli() -> NoReturn:
    """Process entry point (``training/train.py``, ``sdt-train``, ``python -m sdt_diffusion.training.trainer``)."""
    engine.exit_process(lambda: main())


if __name__ == "__main__":
    cli()
