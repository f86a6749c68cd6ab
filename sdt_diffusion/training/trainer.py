"""The training loop behind ``accelerate launch training/train.py`` (DiT's recipe for SDT-P).

Entry points: :func:`main` (command line) and :func:`train` (parsed flags or :class:`~.config.TrainSettings`;
returns a :class:`TrainResult`).

The run, step by step (each a function of explicit values):

1. plan (:func:`~.plan.plan_run`): every flag, path, batch split, shape and the resume point is checked
   first (``ConfigError`` before any compute);
2. build (:func:`build_core`): the VAE, the model, AdamW and the EMA; the held-out set; then
   :func:`restore` resumes from a checkpoint if asked;
3. the step (:func:`~.step.train_step`): micro-batches, one all-reduce, a finiteness check
   (:class:`~.step.NonFiniteLossError` before the weights change; no checkpoint is written), AdamW, EMA;
4. after each step (:func:`after_step`): logging (:mod:`.tracking`) and the checkpoint, then
   (:func:`after_checkpoint`) held-out evaluation (:mod:`.heldout`), sample grids and exports at their
   intervals; at ``--max-steps`` the tail: the final held-out loss, the export, and ``training_done.json``.

Exact resumption: the data stream is a pure function of ``(seed, epoch)`` (see ``data.py``) and skips the
consumed batches; every process's RNG states, the weights, AdamW and the EMA come back from files that cannot
carry code (:mod:`.checkpointing`); exports, samples and evaluations never touch the global RNG.  A resume
first redoes what was due after its checkpoint (evaluation, samples, export; at or past ``--max-steps`` the
whole tail), so a run stopped anywhere ends with the same files.  A resume that cannot be exact (a missing RNG
state, another ``--seed`` or batch layout) is refused unless ``--allow-inexact-resume`` is given.
SIGTERM/SIGINT finish the current step, save a checkpoint and return (exit code 0); a second SIGINT aborts;
a signal during the tail or after the run has finished changes nothing.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..data import iterate_batches
from ..models import count_parameters
from ..models.registry import build_transformer, learns_sigma
from ..schedulers import default_scheduler
from ..utils.files import atomic_write
from ..utils.runtime import cpu_multiprocess, enable_tf32
from .checkpointing import (
    DONE_FILE,
    clear_done,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    save_checkpoint,
    write_done,
    write_state,
)
from .config import ConfigError, RuntimeSpec, TrainSettings, parse_args, settings_from_args
from .diffusion import DiffusionSchedule
from .ema import EMA
from .export import ema_transformer, export_pipeline, load_vae, sample_grid
from .heldout import HeldOutSet, evaluate_held_out
from .plan import RunPlan, plan_run
from .signals import StopSignal
from .state_files import restore_rng
from .step import LossHook, NonFiniteLossError, StepStats, TrainingCore, train_step
from .tracking import METRICS_FILE, LossWindow, MetricsWriter, log_images, log_with, tracker_config

__all__ = ["NonFiniteLossError", "Run", "TrainResult", "after_checkpoint", "build_core", "cli", "main",
           "make_accelerator", "restore", "train"]

logger = logging.getLogger("sdt_diffusion.training")
# DDP notices that the depthwise LPE kernels' gradients (C, 1, k, k) carry a different (equivalent) stride for the
# size-1 dimension than its bucket views; harmless, and otherwise printed by every process.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


@dataclass
class TrainResult:
    """What a finished (or signalled) run produced."""

    step: int
    output_dir: Path
    last_checkpoint: Path | None
    pipeline_dir: Path | None
    stopped_by_signal: bool


# ------------------------------------------------------------------------------------------------ build
def make_accelerator(runtime: RuntimeSpec, output_dir: Path) -> Accelerator:
    """The ``Accelerator``: CPU multi-process (gloo) when several processes run without CUDA."""
    kwargs: dict[str, Any] = {}
    if runtime.mixed_precision is not None:
        kwargs["mixed_precision"] = runtime.mixed_precision
    if runtime.compile:
        kwargs["dynamo_backend"] = "inductor"
    return Accelerator(
        cpu=runtime.cpu or cpu_multiprocess(),
        log_with=log_with(runtime.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        **kwargs,
    )


def _is_fsdp(accelerator: Any) -> bool:
    return str(accelerator.distributed_type).endswith("FSDP")


def build_core(settings: TrainSettings, plan: RunPlan, accelerator: Accelerator) -> TrainingCore:
    """The VAE, the model, AdamW and the EMA, seeded alike on every process (identical initial weights)."""
    set_seed(settings.seed)
    if settings.runtime.allow_tf32:
        enable_tf32()
    vae = load_vae(plan.data.vae_name, plan.data.vae_subfolder)
    if vae is not None:
        vae.to(accelerator.device)
    try:
        model = build_transformer(plan.model_config)
    except ValueError as e:
        raise ConfigError(f"bad model configuration: {e}") from None
    if accelerator.is_main_process:
        logger.info("model %s: %.2fM parameters, config %s", settings.model.preset,
                    count_parameters(model, trainable_only=False) / 1e6, plan.model_config)
    learn_sigma = learns_sigma(model)
    if settings.runtime.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optim = settings.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.learning_rate, weight_decay=optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model.parameters(), decay=optim.ema_decay)
    fsdp = _is_fsdp(accelerator)
    schedule = DiffusionSchedule.from_scheduler(default_scheduler(learn_sigma))
    return TrainingCore(accelerator, model, optimizer, ema, vae, schedule, learn_sigma, plan.data.scaling_factor,
                        plan.accum, optim.max_grad_norm, fsdp)


def restore(core: TrainingCore, plan: RunPlan, settings: TrainSettings) -> int:
    """Resume from ``plan.resume_from`` (weights, AdamW, EMA, grad scaler, this process's RNG) or seed a fresh
    run; returns the steps already done.

    The flags stay in charge of the hyper-parameters: a ``--learning-rate``, ``--weight-decay`` or
    ``--ema-decay`` other than the checkpoint's applies from the resumed step on (with a warning).
    """
    seed = settings.seed
    if plan.resume_from is None:
        set_seed(seed, device_specific=True)  # per-process noise, timesteps and label dropout
        return 0
    saved_decay = load_state(core, plan.resume_from, plan.start_state)
    if plan.rng_state is not None:
        restore_rng(plan.rng_state)
    else:  # only with --allow-inexact-resume: fresh streams that differ from the first run's
        reseed = np.random.SeedSequence([seed, plan.start_step, core.accelerator.process_index]).generate_state(1)
        set_seed(int(reseed[0]) & 0x7FFFFFFF)
    main = core.accelerator.is_main_process
    optim = settings.optim
    for group in core.optimizer.param_groups:
        for key, flag, value in (("lr", "--learning-rate", optim.learning_rate),
                                 ("weight_decay", "--weight-decay", optim.weight_decay)):
            if group[key] != value:
                if main:
                    logger.warning("%s %s differs from the checkpoint's %s; using %s from step %d", flag, value,
                                   group[key], value, plan.start_step)
                group[key] = value
    if saved_decay != optim.ema_decay and main:
        logger.warning("--ema-decay %s differs from the checkpoint's %s; using %s from step %d", optim.ema_decay,
                       saved_decay, optim.ema_decay, plan.start_step)
    return plan.start_step


def write_run_files(settings: TrainSettings, plan: RunPlan) -> None:
    """The output folder, ``samples/`` and ``train_config.yaml`` (main process)."""
    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    config = {**settings.flags, "resolved_model_config": plan.model_config, "per_device_batch_resolved": plan.per_device,
              "grad_accum": plan.accum, "num_processes": plan.world}
    (out / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@dataclass
class Run:
    """A built run: its settings and plan, the training objects, and what it has written so far."""

    settings: TrainSettings
    plan: RunPlan
    core: TrainingCore
    held_out: HeldOutSet | None
    metrics: MetricsWriter
    last_checkpoint: Path | None
    last_saved: int  # step of the newest checkpoint written or resumed from (-1: none this run)
    epoch: int
    started: float
    pipeline_dir: Path | None = None
    inexact_resumes: list[dict[str, Any]] = field(default_factory=list)  # recorded in every later checkpoint

    @property
    def accelerator(self) -> Accelerator:
        return self.core.accelerator

    @property
    def is_main(self) -> bool:
        return self.core.accelerator.is_main_process

    @property
    def out(self) -> Path:
        return self.settings.output_dir


def start_run(settings: TrainSettings, plan: RunPlan, core: TrainingCore, held_out: HeldOutSet | None,
              step: int) -> Run:
    """Files, metrics, trackers and the start-up log of a built (and possibly resumed) run; an inexact resume
    (``--allow-inexact-resume``) is recorded in the log and in ``metrics.jsonl``."""
    accelerator = core.accelerator
    if accelerator.is_main_process:
        write_run_files(settings, plan)
        clear_done(settings.output_dir)  # the run is not finished (a finished one never gets here)
    metrics = MetricsWriter(settings.output_dir / METRICS_FILE, step, accelerator.is_main_process)
    accelerator.init_trackers(settings.runtime.tracker_project, config=tracker_config(settings.flags))
    history = list(plan.start_state.get("inexact_resumes", []))
    if plan.inexact:
        history.append({"step": step, "reasons": plan.inexact})
        metrics.write({"step": step, "inexact_resume": plan.inexact})
    if accelerator.is_main_process:
        d = plan.data
        logger.info("data: %s, %d samples, %d classes, inputs %dx%dx%d; %d processes x %d per device x %d "
                    "accumulation = global batch %d", d.kind, len(d.labels), d.num_classes, d.latent_channels,
                    d.latent_size, d.latent_size, plan.world, plan.per_device, plan.accum,
                    settings.global_batch_size)
        if plan.resume_from is not None:
            logger.info("resumed from %s at step %d", plan.resume_from, step)
        for reason in plan.inexact:
            logger.warning("INEXACT RESUME (--allow-inexact-resume): %s", reason)
        if step > settings.intervals.max_steps:
            logger.warning("%s is at step %d, past --max-steps %d: the run ends at step %d", plan.resume_from, step,
                           settings.intervals.max_steps, step)
    epoch = step * plan.accum // max(1, len(plan.sampler) // plan.per_device)
    return Run(settings, plan, core, held_out, metrics, latest_checkpoint(settings.output_dir),
               step if plan.resume_from is not None else -1, epoch, time.time(), inexact_resumes=history)


# ------------------------------------------------------------------------------- checkpoint and export
def training_state(run: Run, step: int) -> dict[str, Any]:
    """``training_state.json`` of a checkpoint: the batch layout, the data position, the model and the
    resolved VAE (name and subfolder; ``None`` in pixel space), so an export needs nothing else."""
    s, p = run.settings, run.plan
    return {"global_batch_size": s.global_batch_size, "per_device_batch": p.per_device, "grad_accum": p.accum,
            "num_processes": p.world, "seed": s.seed, "epoch": run.epoch, "num_samples": len(p.data.labels),
            "consumed_samples": step * s.global_batch_size, "model": s.model.preset, "model_config": p.model_config,
            "id2label": p.data.id2label, "vae": p.data.vae_name, "vae_subfolder": p.data.vae_subfolder,
            "inexact_resumes": run.inexact_resumes}


def save_run_checkpoint(run: Run, step: int) -> Path:
    """Save ``checkpoint-<step>`` (all processes) and prune old ones."""
    core = run.core
    path = save_checkpoint(core.accelerator, run.out, step, training_state(run, step),
                           functools.partial(write_state, core))
    if run.is_main:
        prune_checkpoints(run.out, run.settings.intervals.keep_checkpoints)
        logger.info("saved %s", path)
    run.last_checkpoint, run.last_saved = path, step
    return path


def export_and_sample(run: Run, step: int, export: bool, samples: bool) -> None:
    """A labelled grid of EMA samples and/or the EMA pipeline export (all processes gather the EMA)."""
    core, spec = run.core, run.settings.samples
    with core.device_rng():
        transformer = ema_transformer(core.accelerator, core.model, core.ema)
        if run.is_main and samples:
            grid = sample_grid(transformer, core.vae, run.plan.data.id2label, run.plan.sample_classes, core.device,
                               spec.steps, spec.guidance_scale, run.settings.seed)
            atomic_write(run.out / "samples" / f"step-{step:07d}.png", lambda f: grid.save(f, format="PNG"))
            log_images(core.accelerator, grid, step)
        if run.is_main and export:
            run.pipeline_dir = export_pipeline(transformer, core.vae, run.plan.data.id2label, run.out / "pipeline")
            logger.info("exported the EMA pipeline to %s", run.pipeline_dir)
    core.accelerator.wait_for_everyone()


def evaluate(run: Run, step: int) -> None:
    """Held-out losses of the online and the EMA weights, written to ``metrics.jsonl`` and the trackers."""
    online, averaged = evaluate_held_out(run.held_out, run.core)
    record = {"step": step, "eval_loss": online["loss"], "eval_mse": online["mse"], "eval_vb": online["vb"],
              "eval_loss_ema": averaged["loss"]}
    run.metrics.write(record)
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    if run.is_main:
        logger.info("step %d: held-out loss %.5f (EMA %.5f) on %d images", step, online["loss"], averaged["loss"],
                    run.held_out.size)


# ------------------------------------------------------------------------------------------------ loop
def after_step(run: Run, step: int, stats: StepStats, window: LossWindow, bar: Any) -> None:
    """Logging and the checkpoint due after optimizer step ``step``, then :func:`after_checkpoint` (unless a stop
    signal arrived: the resumed run does that)."""
    every = run.settings.intervals
    run.epoch = stats.epoch
    window.add(stats)
    final = step >= every.max_steps
    if step % every.log_every == 0 or final:
        lr = run.core.optimizer.param_groups[0]["lr"]
        record = window.record(step, run.epoch, lr, run.settings.global_batch_size, time.time() - run.started)
        run.metrics.write(record)
        run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
    if step % every.checkpoint_every == 0 or stats.stop_requested or final:
        save_run_checkpoint(run, step)
    if not stats.stop_requested:
        after_checkpoint(run, step)


def after_checkpoint(run: Run, step: int) -> None:
    """What is due at ``step`` once its checkpoint is written: the held-out loss, sample grid and export at their
    intervals; at (or past) ``--max-steps`` the tail: the final held-out loss, sample grid and export, then
    ``training_done.json``, the only record that the run is finished.

    A resumed run calls it first for its starting step, so whatever a stop or crash after the checkpoint left
    undone is done (all of it is deterministic: redoing it gives the same files).
    """
    every = run.settings.intervals
    final = step >= every.max_steps
    if run.held_out is not None and (step % every.eval_every == 0 or final):
        evaluate(run, step)
    export = final or (bool(every.export_every) and step % every.export_every == 0)
    samples = bool(every.sample_every) and (final or step % every.sample_every == 0)
    if export or samples:
        export_and_sample(run, step, export, samples)
    if final:
        if run.is_main:
            write_done(run.out, step, run.pipeline_dir)
            logger.info("finished at step %d (%s written)", step, DONE_FILE)
        run.accelerator.wait_for_everyone()


def run_loop(run: Run, step: int, stop: StopSignal, loss_hook: LossHook | None = None) -> tuple[int, bool]:
    """Train from ``step`` to ``max_steps`` or until a stop signal; returns ``(step, stopped_by_signal)``.

    Raises:
        NonFiniteLossError: with the last good checkpoint named.
    """
    plan, every = run.plan, run.settings.intervals
    batches = iterate_batches(
        plan.data.dataset, plan.sampler, plan.per_device, start_batch=step * plan.accum,
        num_workers=run.settings.data.num_workers, pin_memory=run.core.device.type == "cuda",
        skip_first_batches=run.accelerator.skip_first_batches,
    )
    window = LossWindow()
    bar = tqdm(total=every.max_steps, initial=step, disable=not (run.is_main and run.settings.runtime.progress_bar),
               desc="train", dynamic_ncols=True)
    try:
        if run.held_out is not None and step == 0:
            evaluate(run, 0)  # the starting point of the held-out curve
        while step < every.max_steps:
            try:
                stats = train_step(run.core, batches, step, stop.requested, loss_hook)
            except NonFiniteLossError as e:
                e.last_checkpoint = run.last_checkpoint
                raise
            step += 1
            bar.update(1)
            after_step(run, step, stats, window, bar)
            if stats.stop_requested:
                if run.is_main:
                    logger.info("stopped by signal at step %d; resume with --resume latest", step)
                return step, True
    finally:
        bar.close()
    return step, False


# ----------------------------------------------------------------------------------------------- train
def train(args: argparse.Namespace | TrainSettings, *, loss_hook: LossHook | None = None) -> TrainResult:
    """Run (or resume) training.

    A resume of a finished run (``training_done.json`` at the checkpoint's step, at or past ``--max-steps``)
    returns at once; a resume at or past ``--max-steps`` of an unfinished one runs the missing tail.

    Args:
        args: flags from :func:`~.config.parse_args` or :class:`~.config.TrainSettings`.
        loss_hook: optional ``hook(step, loss) -> loss`` applied to every micro-batch loss (see
            :data:`~.step.LossHook`).

    Raises:
        ConfigError: a bad flag or a flag that contradicts the data or the checkpoint (before any compute); a
            damaged checkpoint (:class:`~.checkpointing.CheckpointError`, naming the file).
        NonFiniteLossError: the loss became NaN/inf (nothing is saved after the last good checkpoint).
    """
    settings = args if isinstance(args, TrainSettings) else settings_from_args(args)
    with StopSignal() as stop:  # from the start: a signal before the first step stops after it; after the end, nothing
        accelerator = make_accelerator(settings.runtime, settings.output_dir)
        plan = plan_run(settings, accelerator)
        pipeline = settings.output_dir / "pipeline"
        if plan.finished:
            if accelerator.is_main_process:
                logger.info("%s: the run finished at step %d (%s); nothing to do", plan.resume_from,
                            plan.start_step, DONE_FILE)
            return TrainResult(plan.start_step, settings.output_dir, plan.resume_from,
                               pipeline if pipeline.is_dir() else None, False)

        core = build_core(settings, plan, accelerator)
        held_out = None
        if settings.held_out.data_dir:
            with torch.random.fork_rng(devices=[]):
                held_out = HeldOutSet(settings.held_out.data_dir, settings.held_out.max_samples, settings.seed,
                                      plan.data, core.vae, accelerator, plan.per_device, core.schedule.num_timesteps)
        step = restore(core, plan, settings)
        run = start_run(settings, plan, core, held_out, step)
        stopped = False
        try:
            if plan.resume_from is not None:
                after_checkpoint(run, step)  # what the stopped run left undone after its checkpoint (or its tail)
            if step < settings.intervals.max_steps:
                step, stopped = run_loop(run, step, stop, loss_hook)
        finally:
            accelerator.end_training()
        if run.is_main and not stopped:
            logger.info("done at step %d", step)
    return TrainResult(step, settings.output_dir, run.last_checkpoint, run.pipeline_dir if run.is_main else pipeline,
                       stopped)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 non-finite loss, 2 bad flags)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        datefmt="%H:%M:%S")
    for noisy in ("accelerate", "diffusers", "datasets", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        train(parse_args(argv))
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as e:
        print(f"train.py: error: {e}. Try a lower --learning-rate, --max-grad-norm or --mixed-precision no.",
              file=sys.stderr, flush=True)
        return 1
    return 0


def cli() -> NoReturn:
    """Process entry point (``training/train.py``, ``python -m sdt_diffusion.training.trainer``): :func:`main`,
    then exit.  Once training has stopped or finished everything is on disk, so a late SIGTERM/SIGINT (e.g. a
    scheduler's while the interpreter shuts down) is ignored rather than turned into a failed exit status."""
    code = main()
    if code == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(code)


if __name__ == "__main__":
    cli()
