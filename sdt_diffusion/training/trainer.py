"""The training loop behind ``accelerate launch training/train.py`` (DiT's recipe for SDT-P).

Entry points: :func:`main` (command line) and :func:`train` (an ``argparse.Namespace`` from
:func:`~sdt_diffusion.training.config.parse_args`; returns a :class:`TrainResult`).

Order of work: every flag, path, batch split and shape is checked first (``ConfigError`` before any
compute); then the VAE, the model, the optimizer and the EMA are built, the run resumes if asked, and the
loop runs.  Per optimizer step: ``accum`` micro-batches (DDP gradient sync only on the last), one all-reduce
of ``[loss, mse, vb, stop]``, a finiteness check (a non-finite loss raises :class:`NonFiniteLossError`
before the weights change and no checkpoint is written), the AdamW step, the EMA update, then logging,
checkpoints, held-out loss, sample grids and exports at their intervals.

Exact resumption: the data stream is a pure function of ``(seed, epoch)`` (see ``data.py``) and skips the
consumed batches; accelerate restores every process's RNG states; the EMA is a registered checkpoint
object; exports, samples and evaluations never touch the global RNG.  SIGTERM/SIGINT finish the current
step, save a checkpoint and return (exit code 0); a second SIGINT aborts.

Debug hook: the environment variable ``SDT_DEBUG_INJECT_NAN_AT_STEP=<k>`` turns the loss of step ``k``
(1-based) into NaN, to exercise the non-finite-loss path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ..models import PRESETS, SDTTransformer2DModel, count_parameters
from ..models.vae import posterior_sample, vae_downsampling_factor, vae_scaling_factor
from ..schedulers import default_scheduler
from ..utils.runtime import cpu_multiprocess, enable_tf32
from ..utils.seeding import index_generator
from .checkpointing import (
    list_checkpoints,
    prune_checkpoints,
    read_training_state,
    resolve_resume,
    save_checkpoint,
)
from .config import ConfigError, parse_args, parse_model_kwargs, validate_args
from .data import (
    EpochSampler,
    ImageClassDataset,
    LatentCacheDataset,
    class_names_to_id2label,
    iterate_batches,
    load_image_source,
)
from .diffusion import DiffusionSchedule, training_losses
from .ema import EMA
from .export import default_sample_classes, ema_transformer, export_pipeline, sample_grid

__all__ = ["NonFiniteLossError", "TrainResult", "main", "plan_batches", "resolve_model_config", "train"]

NAN_HOOK_ENV = "SDT_DEBUG_INJECT_NAN_AT_STEP"
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_RESOLUTION = 256
METRICS_FILE = "metrics.jsonl"

logger = logging.getLogger("sdt_diffusion.training")
# DDP notices that the depthwise LPE kernels' gradients (C, 1, k, k) carry a different (equivalent) stride for the
# size-1 dimension than its bucket views; harmless, and otherwise printed by every process.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stopped without writing a checkpoint."""


@dataclass
class TrainResult:
    """What a finished (or signalled) run produced."""

    step: int
    output_dir: Path
    last_checkpoint: Path | None
    pipeline_dir: Path | None
    stopped_by_signal: bool


# ------------------------------------------------------------------------------------------ planning
def plan_batches(global_batch: int, per_device: int | None, num_processes: int) -> tuple[int, int]:
    """``(per_device_batch, grad_accum)`` with ``per_device · processes · accum = global_batch``.

    Raises:
        ConfigError: the global batch does not split evenly.
    """
    if per_device is None:
        if global_batch % num_processes:
            raise ConfigError(
                f"--global-batch-size {global_batch} is not divisible by the {num_processes} processes; "
                f"choose a multiple of {num_processes} (or set --per-device-batch)"
            )
        return global_batch // num_processes, 1
    if global_batch % (per_device * num_processes):
        raise ConfigError(
            f"--global-batch-size {global_batch} is not divisible by --per-device-batch {per_device} x "
            f"{num_processes} processes = {per_device * num_processes}"
        )
    return per_device, global_batch // (per_device * num_processes)


def resolve_model_config(args: argparse.Namespace, in_channels: int, sample_size: int, num_classes: int) -> dict:
    """Preset + overrides, with ``in_channels``/``sample_size``/``num_embeds_ada_norm`` taken from the data.

    Raises:
        ConfigError: an override contradicts the data or another flag.
    """
    overrides = parse_model_kwargs(args.model_kwargs)
    for flag, key in (("--decay-mode", "decay_mode"), ("--alpha", "alpha"), ("--attention-backend", "attention_backend")):
        value = getattr(args, key)
        if value is None:
            continue
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"{flag} {value!r} contradicts --model-kwargs {key}={overrides[key]!r}")
        overrides[key] = value
    derived = {"in_channels": in_channels, "sample_size": sample_size, "num_embeds_ada_norm": num_classes}
    for key, value in derived.items():
        if key not in overrides:
            continue
        given = overrides[key]
        if key == "num_embeds_ada_norm":
            if given < value:
                raise ConfigError(f"--model-kwargs num_embeds_ada_norm={given} but the data has {value} classes")
        elif given != value:
            source = {"in_channels": "the VAE's latent channels (3 in pixel space)",
                      "sample_size": "--resolution / the VAE's downsampling factor"}[key]
            raise ConfigError(f"--model-kwargs {key}={given} contradicts the data: {source} gives {value}")
    return {**PRESETS[args.model], **derived, **overrides}


@dataclass
class DataPlan:
    """Where the training inputs come from and what shape they have."""

    kind: str  # "images" or "latents"
    dataset: Any
    labels: np.ndarray
    num_classes: int
    id2label: dict[int, str] | None
    class_names: list[str] | None
    resolution: int
    vae_name: str | None
    vae_subfolder: str | None
    latent_channels: int
    latent_size: int
    scaling_factor: float
    vae_factor: int


def _vae_config(name: str, subfolder: str | None) -> dict:
    from diffusers import AutoencoderKL

    try:
        return dict(AutoencoderKL.load_config(name, subfolder=subfolder))
    except Exception as e:  # noqa: BLE001
        where = f"{name}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise ConfigError(f"--vae {where}: cannot load an AutoencoderKL config: {e}") from None


def plan_data(args: argparse.Namespace, accelerator: Any) -> DataPlan:
    """Open the training data (image folder, saved dataset or latent cache) and check shapes against flags."""
    vae_arg = None if args.vae is None else (None if str(args.vae).lower() == "none" else args.vae)
    if args.latents_dir:
        dataset = LatentCacheDataset(args.latents_dir)
        meta = dataset.meta
        if args.resolution is not None and args.resolution != meta["resolution"]:
            raise ConfigError(f"--resolution {args.resolution} but the latent cache was made at {meta['resolution']}")
        if args.vae is not None and vae_arg is None:
            raise ConfigError("--latents-dir with --vae none: a latent-space model needs its VAE for export and samples")
        vae_name = vae_arg or meta["vae"]
        subfolder = args.vae_subfolder if vae_arg else meta.get("vae_subfolder")
        cfg = _vae_config(vae_name, subfolder)
        scaling = vae_scaling_factor(cfg)
        if not math.isclose(scaling, float(meta["scaling_factor"]), rel_tol=1e-6):
            raise ConfigError(f"--vae {vae_name} has scaling_factor {scaling}, the cache was made with {meta['scaling_factor']}")
        channels, size, width = meta["latent_shape"]
        if size != width:
            raise ConfigError(f"latent cache holds non-square latents {meta['latent_shape']}")
        if cfg.get("latent_channels") != channels:
            raise ConfigError(f"--vae {vae_name} has {cfg.get('latent_channels')} latent channels, the cache {channels}")
        names = meta.get("class_names")
        id2label = {int(k): v for k, v in meta["id2label"].items()} if meta.get("id2label") else None
        return DataPlan("latents", dataset, dataset.labels, int(meta["num_classes"]), id2label, names,
                        int(meta["resolution"]), vae_name, subfolder, int(channels), int(size), scaling, vae_downsampling_factor(cfg))

    resolution = args.resolution or DEFAULT_RESOLUTION
    vae_name = vae_arg if args.vae is not None else DEFAULT_VAE
    if vae_name is None:
        channels, factor, scaling = 3, 1, 1.0
    else:
        cfg = _vae_config(vae_name, args.vae_subfolder)
        channels, factor, scaling = int(cfg["latent_channels"]), vae_downsampling_factor(cfg), vae_scaling_factor(cfg)
    if resolution % factor:
        raise ConfigError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {factor}")
    with accelerator.local_main_process_first():  # one datasets cache build per node
        source = load_image_source(args.data_dir, args.dataset, args.dataset_split, args.image_column, args.label_column)
    dataset = ImageClassDataset(source, resolution)
    id2label = class_names_to_id2label(source.class_names, source.num_classes)
    return DataPlan("images", dataset, source.labels, source.num_classes, id2label, source.class_names, resolution,
                    vae_name, args.vae_subfolder if vae_name else None, channels, resolution // factor, scaling, factor)


# ----------------------------------------------------------------------------------------- helpers
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


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked at the end of each step (a second SIGINT aborts)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"[train] received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, exiting",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


class HeldOutSet:
    """A fixed held-out set for ``eval_loss``: fixed images (no flip), VAE draws, timesteps and noise.

    The ``n`` evaluated images are evenly spaced through ``--eval-data-dir``; the timesteps, the noise and the
    VAE posterior draws come from a generator seeded by ``--seed``, per image, so the value does not depend
    on the number of processes.  Each process evaluates every ``num_processes``-th image, padded to equal
    counts (padding has weight 0), and the sums are all-reduced.
    """

    def __init__(self, args: argparse.Namespace, plan: DataPlan, vae: Any | None, accelerator: Any,
                 batch_size: int, num_timesteps: int) -> None:
        with accelerator.local_main_process_first():
            source = load_image_source(data_dir=args.eval_data_dir)
        label_map = None
        if plan.class_names is not None and source.class_names is not None:
            unknown = sorted(set(source.class_names) - set(plan.class_names))
            if unknown:
                raise ConfigError(f"--eval-data-dir classes {unknown} are not among the training classes")
            label_map = np.array([plan.class_names.index(n) for n in source.class_names], dtype=np.int64)
        elif source.num_classes > plan.num_classes:
            raise ConfigError(f"--eval-data-dir has {source.num_classes} classes, the training data {plan.num_classes}")
        dataset = ImageClassDataset(source, plan.resolution, label_map)
        n = min(len(dataset), args.eval_max_samples)
        chosen = np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(np.int64))
        world, rank = accelerator.num_processes, accelerator.process_index
        per_rank = math.ceil(len(chosen) / world)
        positions = [p if p < len(chosen) else -1 for p in range(rank, per_rank * world, world)]
        self.device = accelerator.device
        self.batch_size = batch_size
        self.size = len(chosen)
        x0, labels, t, noise, weight = [], [], [], [], []
        shape = (plan.latent_channels, plan.latent_size, plan.latent_size)
        for p in positions:
            real = p >= 0
            p = p if real else 0
            g = index_generator(args.seed, int(chosen[p]))
            item = dataset[int(chosen[p])]
            pixels = item["pixel_values"][None].to(self.device)
            if vae is None:
                latent = pixels[0]
            else:
                with torch.no_grad():
                    dist = vae.encode(pixels).latent_dist
                vae_eps = torch.randn(shape, generator=g).to(self.device)
                latent = posterior_sample(dist.mean[0], dist.std[0], vae_eps, plan.scaling_factor)
            x0.append(latent.float())
            labels.append(item["labels"])
            t.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
            noise.append(torch.randn(shape, generator=g))
            weight.append(1.0 if real else 0.0)
        self.x0 = torch.stack(x0)
        self.labels = torch.tensor(labels, device=self.device)
        self.t = torch.tensor(t, device=self.device)
        self.noise = torch.stack(noise).to(self.device)
        self.weight = torch.tensor(weight, device=self.device)

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


class MetricsWriter:
    """``metrics.jsonl`` on the main process; on (re)start keeps only lines up to the starting step."""

    def __init__(self, path: Path, start_step: int, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


def _log_with(report_to: str) -> list[str] | None:
    if report_to == "none":
        return None
    names = ["tensorboard", "wandb"] if report_to == "all" else [report_to]
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--report-to wandb needs the wandb package (pip install wandb)") from None
    return names


def make_accelerator(args: argparse.Namespace) -> Any:
    """The ``Accelerator``: CPU multi-process (gloo) when several processes run without CUDA."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = bool(args.cpu) or cpu_multiprocess()
    out = Path(args.output_dir)
    kwargs: dict[str, Any] = {}
    if args.mixed_precision is not None:
        kwargs["mixed_precision"] = args.mixed_precision
    if args.compile:
        kwargs["dynamo_backend"] = "inductor"
    return Accelerator(
        cpu=cpu,
        log_with=_log_with(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        **kwargs,
    )


def _is_fsdp(accelerator: Any) -> bool:
    return str(accelerator.distributed_type).endswith("FSDP")


def _log_images(accelerator: Any, grid: Any, step: int) -> None:
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [grid]}, step=step)
        except Exception as e:  # noqa: BLE001 - a tracker hiccup must not kill training
            logger.warning("could not log the sample grid to %s: %s", tracker.name, e)


# ------------------------------------------------------------------------------------------- train
def train(args: argparse.Namespace) -> TrainResult:
    """Run (or resume) training as configured by ``args`` (see :func:`~.config.build_parser`)."""
    from accelerate.utils import set_seed

    validate_args(args)
    out = Path(args.output_dir)
    resume_from = resolve_resume(args.resume, out)
    nan_step = int(os.environ[NAN_HOOK_ENV]) if os.environ.get(NAN_HOOK_ENV) else None

    accelerator = make_accelerator(args)
    is_main = accelerator.is_main_process
    device = accelerator.device
    world = accelerator.num_processes
    per_device, accum = plan_batches(args.global_batch_size, args.per_device_batch, world)
    plan = plan_data(args, accelerator)

    model_config = resolve_model_config(args, plan.latent_channels, plan.latent_size, plan.num_classes)
    patch = model_config["patch_size"]
    if plan.latent_size % patch:
        raise ConfigError(
            f"--resolution {plan.resolution} is not divisible by the VAE factor {plan.vae_factor} x patch size "
            f"{patch} = {plan.vae_factor * patch}"
        )
    sampler = EpochSampler(len(plan.labels), world, accelerator.process_index, args.seed,
                           shuffle=True, random_flip=args.random_flip)
    if len(sampler) < per_device:
        raise ConfigError(
            f"each of the {world} processes gets {len(sampler)} samples per epoch, fewer than one batch of "
            f"{per_device}; lower --global-batch-size / --per-device-batch"
        )
    sample_classes = ([int(c) for c in str(args.sample_classes).split(",")] if args.sample_classes
                      else default_sample_classes(plan.num_classes))
    bad = [c for c in sample_classes if not 0 <= c < model_config["num_embeds_ada_norm"]]
    if bad:
        raise ConfigError(f"--sample-classes {bad} outside [0, {model_config['num_embeds_ada_norm']})")
    start_state: dict[str, Any] = read_training_state(resume_from) if resume_from else {}
    saved_config = dict(start_state.get("model_config") or {})
    if saved_config:
        changed = {k: (saved_config.get(k), model_config.get(k)) for k in set(saved_config) | set(model_config)
                   if k != "attention_backend" and saved_config.get(k) != model_config.get(k)}
        if changed:
            raise ConfigError(f"--resume {resume_from}: the model config differs from the checkpoint's "
                              f"(field: (checkpoint, now)) {changed}")
    if start_state and start_state["step"] >= args.max_steps and args.resume == "auto":
        if is_main:
            logger.info("%s is already at step %d >= --max-steps %d: nothing to do", resume_from,
                        start_state["step"], args.max_steps)
        pipeline = out / "pipeline"
        return TrainResult(int(start_state["step"]), out, resume_from, pipeline if pipeline.is_dir() else None, False)
    if start_state and start_state["step"] >= args.max_steps:
        raise ConfigError(f"--resume {resume_from} is at step {start_state['step']} >= --max-steps {args.max_steps}")

    # ---- build (same seed on every process: identical initial weights everywhere)
    set_seed(args.seed)
    if args.allow_tf32:
        enable_tf32()
    vae = None
    if plan.vae_name is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(plan.vae_name, subfolder=plan.vae_subfolder)
        vae.requires_grad_(False)
        vae.eval().to(device)
    try:
        model = SDTTransformer2DModel(**model_config)
    except ValueError as e:
        raise ConfigError(f"bad model configuration: {e}") from None
    learn_sigma = bool(model.config.learn_sigma)
    n_params = count_parameters(model, trainable_only=False)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model.parameters(), decay=args.ema_decay)
    fsdp = _is_fsdp(accelerator)
    if not fsdp:
        accelerator.register_for_checkpointing(ema)
    schedule = DiffusionSchedule.from_scheduler(default_scheduler(learn_sigma))
    held_out = None
    if args.eval_data_dir:
        with torch.random.fork_rng(devices=[]):
            held_out = HeldOutSet(args, plan, vae, accelerator, per_device, schedule.num_timesteps)

    def save_ema_shard(tmp: Path) -> None:  # FSDP: every rank owns a shard of the EMA
        from safetensors.torch import save_file

        save_file({str(i): s.contiguous().cpu() for i, s in enumerate(ema.shadow)},
                  str(tmp / f"ema_shard_rank{accelerator.process_index:05d}.safetensors"))

    # ---- resume
    step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if fsdp:
            from safetensors.torch import load_file

            shard = load_file(str(resume_from / f"ema_shard_rank{accelerator.process_index:05d}.safetensors"))
            ema.load_state_dict({"decay": args.ema_decay, "num_updates": start_state["step"],
                                 "shadow": [shard[str(i)] for i in range(len(ema.shadow))]})
        step = int(start_state["step"])
        layout = (start_state.get("num_processes"), start_state.get("per_device_batch"), start_state.get("grad_accum"))
        if layout != (world, per_device, accum):
            logger.warning("resuming with %s processes x %s per device x %s accumulation (checkpoint: %s x %s x %s); "
                           "training continues but the data order and RNG streams differ from an uninterrupted run",
                           world, per_device, accum, *layout)
    else:
        set_seed(args.seed, device_specific=True)  # per-process noise, timesteps and label dropout

    # ---- bookkeeping
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        (out / "train_config.yaml").write_text(yaml.safe_dump(
            {**{k: v for k, v in vars(args).items()}, "resolved_model_config": model_config,
             "per_device_batch_resolved": per_device, "grad_accum": accum, "num_processes": world}, sort_keys=False))
    metrics = MetricsWriter(out / METRICS_FILE, step, is_main)
    accelerator.init_trackers(args.tracker_project, config=_tracker_config(args))
    if is_main:
        logger.info("model %s: %.2fM parameters, config %s", args.model, n_params / 1e6, model_config)
        logger.info("data: %s, %d samples, %d classes, inputs %dx%dx%d; %d processes x %d per device x %d "
                    "accumulation = global batch %d", plan.kind, len(plan.labels), plan.num_classes,
                    plan.latent_channels, plan.latent_size, plan.latent_size, world, per_device, accum,
                    args.global_batch_size)
        if resume_from is not None:
            logger.info("resumed from %s at step %d", resume_from, step)

    batches = iterate_batches(
        plan.dataset, sampler, per_device, start_batch=step * accum, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", skip_first_batches=accelerator.skip_first_batches,
    )
    last_checkpoint = list_checkpoints(out)[-1][1] if list_checkpoints(out) else None
    last_saved = step if resume_from is not None else -1
    pipeline_dir: Path | None = None
    stopped = False
    window = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "grad_norm": 0.0, "n": 0, "time": 0.0}
    epoch = step * accum // max(1, len(sampler) // per_device)
    run_start = time.time()

    bar = tqdm(total=args.max_steps, initial=step, disable=not (is_main and args.progress_bar),
               desc="train", dynamic_ncols=True)

    def checkpoint(at: int) -> Path:
        state = {"global_batch_size": args.global_batch_size, "per_device_batch": per_device, "grad_accum": accum,
                 "num_processes": world, "seed": args.seed, "epoch": epoch, "num_samples": len(plan.labels),
                 "consumed_samples": at * args.global_batch_size, "model": args.model, "model_config": model_config,
                 "id2label": plan.id2label, "vae": args.vae}
        path = save_checkpoint(accelerator, out, at, state, extra_saver=save_ema_shard if fsdp else None)
        if is_main:
            prune_checkpoints(out, args.keep_checkpoints)
            logger.info("saved %s", path)
        return path

    def export_and_sample(at: int, export: bool, samples: bool) -> None:
        nonlocal pipeline_dir
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            transformer = ema_transformer(accelerator, model, ema)
            if is_main and samples:
                grid = sample_grid(transformer, vae, plan.id2label, sample_classes, device,
                                   args.sample_steps, args.sample_guidance_scale, args.seed)
                path = out / "samples" / f"step-{at:07d}.png"
                grid.save(path)
                _log_images(accelerator, grid, at)
            if is_main and export:
                pipeline_dir = export_pipeline(transformer, vae, plan.id2label, out / "pipeline")
                logger.info("exported the EMA pipeline to %s", pipeline_dir)
        accelerator.wait_for_everyone()

    def evaluate(at: int) -> None:
        eval_model = model if fsdp else accelerator.unwrap_model(model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            online = held_out.evaluate(eval_model, schedule, learn_sigma, accelerator)
            with ema.swapped_into(model.parameters()):
                averaged = held_out.evaluate(eval_model, schedule, learn_sigma, accelerator)
        record = {"step": at, "eval_loss": online["loss"], "eval_mse": online["mse"], "eval_vb": online["vb"],
                  "eval_loss_ema": averaged["loss"]}
        metrics.write(record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=at)
        if is_main:
            logger.info("step %d: held-out loss %.5f (EMA %.5f) on %d images", at, online["loss"], averaged["loss"],
                        held_out.size)

    try:
        if held_out is not None and step == 0:
            evaluate(0)  # the starting point of the held-out curve
        with _StopSignal() as stop_signal:
            while step < args.max_steps:
                t0 = time.perf_counter()
                model.train()
                sums = torch.zeros(3, device=device)
                for micro in range(accum):
                    epoch, batch = next(batches)
                    x0 = encode_batch(batch, vae, plan.scaling_factor, device)
                    labels = batch["labels"].to(device, non_blocking=True)
                    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=device)
                    noise = torch.randn_like(x0)
                    x_t = schedule.q_sample(x0, t, noise)
                    sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
                    with sync:
                        out_sample = model(x_t, t, labels).sample
                        terms = training_losses(out_sample, x0, x_t, t, noise, schedule, learn_sigma)
                        loss = terms["loss"].mean()
                        if nan_step is not None and step + 1 == nan_step:
                            loss = loss * float("nan")
                        accelerator.backward(loss / accum)
                    sums += torch.stack([loss.detach(), terms["mse"].detach().mean(), terms["vb"].detach().mean()])
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                    grad_norm = grad_norm.full_tensor()
                grad_norm = torch.as_tensor(grad_norm, device=device, dtype=torch.float32).reshape(())
                stats = torch.cat([sums / accum, grad_norm[None], torch.tensor([float(stop_signal.signum is not None)],
                                                                               device=device)])
                stats = accelerator.reduce(stats, "sum")
                loss_v, mse_v, vb_v, gn_v = (stats[:4] / world).tolist()
                stop_requested = float(stats[4]) > 0
                if not math.isfinite(loss_v):
                    optimizer.zero_grad(set_to_none=True)
                    where = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else "; no checkpoint yet"
                    raise NonFiniteLossError(
                        f"non-finite training loss {loss_v} at step {step + 1} (mse {mse_v}, vb {vb_v}); stopped "
                        f"without saving{where}. Try a lower --learning-rate, --max-grad-norm or --mixed-precision no."
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(model.parameters())
                step += 1
                bar.update(1)

                window["time"] += time.perf_counter() - t0
                window["n"] += 1
                for k, v in (("loss", loss_v), ("mse", mse_v), ("vb", vb_v), ("grad_norm", gn_v)):
                    window[k] += v
                if step % args.log_every == 0 or step == args.max_steps:
                    n = window["n"]
                    record = {"step": step, "epoch": epoch, "loss": window["loss"] / n, "mse": window["mse"] / n,
                              "vb": window["vb"] / n, "grad_norm": window["grad_norm"] / n,
                              "lr": optimizer.param_groups[0]["lr"],
                              "images_per_s": args.global_batch_size * n / max(window["time"], 1e-9),
                              "time": time.time() - run_start}
                    metrics.write(record)
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                    window = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "grad_norm": 0.0, "n": 0, "time": 0.0}

                if step % args.checkpoint_every == 0 or stop_requested:
                    last_checkpoint = checkpoint(step)
                    last_saved = step
                if stop_requested:
                    stopped = True
                    if is_main:
                        logger.info("stopped by signal at step %d; resume with --resume latest", step)
                    break
                if held_out is not None and step % args.eval_every == 0:
                    evaluate(step)
                do_export = bool(args.export_every) and step % args.export_every == 0 and step < args.max_steps
                do_samples = bool(args.sample_every) and step % args.sample_every == 0 and step < args.max_steps
                if do_export or do_samples:
                    export_and_sample(step, do_export, do_samples)

            if not stopped:
                if held_out is not None and step % args.eval_every:
                    evaluate(step)
                if last_saved != step:
                    last_checkpoint = checkpoint(step)
                export_and_sample(step, True, bool(args.sample_every))
    finally:
        bar.close()
        accelerator.end_training()
    if is_main:
        logger.info("done at step %d", step)
    return TrainResult(step, out, last_checkpoint, pipeline_dir if is_main else out / "pipeline", stopped)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 non-finite loss, 2 bad flags)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        datefmt="%H:%M:%S")
    for noisy in ("accelerate", "diffusers", "datasets", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args = parse_args(argv)
        train(args)
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
