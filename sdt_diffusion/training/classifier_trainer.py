"""The training loop behind ``accelerate launch training/train_classifier.py``: SDT-H with the paper's ImageNet recipe.

It shares the diffusion trainer's machinery rather than repeating it: the accelerate set-up
(:func:`~.trainer.make_accelerator`), the batch split (:func:`~.plan.plan_batches`), the seeded data order
(:class:`~.data.EpochSampler`, :func:`~.data.iterate_batches`), the EMA (:class:`~.ema.EMA`), the atomic,
code-free checkpoints and their resume checks (:mod:`.checkpointing`), the stop signals (:mod:`.signals`) and
``metrics.jsonl`` / tensorboard / wandb (:mod:`.tracking`).  What is specific to classification lives here and in
:mod:`.classifier_config` / :mod:`.classifier_data`; evaluation uses :mod:`sdt_diffusion.evaluation.classification`,
the code behind ``eval/classify.py``.

The run, step by step:

1. plan (:func:`plan_classifier_run`): flags, data (class folders, labels, optionally every image decoded), the
   batch split, the model config, the schedule and the resume point, all before any weight is built;
2. build (:func:`build_core`): the timm model, AdamW with timm's weight-decay groups, timm's cosine schedule
   (set from the step number, so it has no state of its own), Mixup/CutMix and the loss, the EMA; then
   :func:`restore` from a checkpoint;
3. the step (:func:`classifier_step`): micro-batches, one all-reduce, a finiteness check before the weights change,
   AdamW, BatchNorm statistics made equal on every process, the EMA;
4. after each step: the log line, the checkpoint (every ``--checkpoint-every`` steps, default once per epoch), then
   at each epoch's end the top-1/top-5 of the online and EMA weights on the validation set (the best weights are
   kept in ``best/``), and at the end the export of the best (or EMA) weights to ``model/`` (transformers) and
   ``model/timm/`` (timm), then ``training_done.json``.

Exact resumption works as in the diffusion trainer: the data order and every image's augmentation are functions of
the seed, the epoch and the image; each process's generator states (Mixup, drop path) come back from the
checkpoint; evaluation and export run in forks of the generators.  The EMA averages the parameters and the
BatchNorm running statistics (as timm's ``ModelEma`` does); the statistics are broadcast from process 0
after every step, so every process holds the same EMA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import (
    DataInputError,
    LabelledImages,
    TransformedImages,
    check_labels,
    class_names_to_id2label,
    find_unreadable_images,
    iterate_batches,
    open_labelled_images,
)
from ..evaluation.classification import eval_transform, evaluate_classifier, summarise
from ..models.sdt_h import (
    DEFAULT_DECAY_MODES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SDTH,
    TIMM_NAMES,
    check_sdt_h_args,
    sdt_h_preset,
)
from ..models.sdt_h_convert import sdt_h_to_transformers
from ..models.sdt_h_transformers import sdt_h_image_processor
from ..utils.files import atomic_write_text, replace_dir
from ..utils.optional import import_optional
from ..utils.runtime import enable_tf32
from .checkpointing import (
    DONE_FILE,
    check_checkpoint,
    clear_done,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    read_done,
    read_rng_states,
    read_training_state,
    resolve_resume,
    save_checkpoint,
    write_done,
    write_state,
)
from .classifier_config import (
    AUTO_VERIFY_LIMIT,
    ClassifierSettings,
    parse_args,
    scaled_learning_rate,
    settings_from_args,
)
from .classifier_data import (
    AugmentedImages,
    RepeatedAugmentSampler,
    build_criterion,
    build_mixup,
    train_transform,
)
from .config import ConfigError
from .ema import EMA
from .plan import plan_batches
from .signals import StopSignal
from .state_files import RngState, restore_rng
from .tracking import METRICS_FILE, MetricsWriter, tracker_config
from .trainer import make_accelerator

timm = import_optional("timm", "timm")
timm_models = import_optional("timm.models", "timm")
timm_optim = import_optional("timm.optim", "timm")
timm_scheduler = import_optional("timm.scheduler", "timm")

__all__ = [
    "BEST_DIR",
    "MODEL_DIR",
    "ClassifierCore",
    "ClassifierPlan",
    "ClassifierResult",
    "NonFiniteClassifierLoss",
    "build_core",
    "classifier_step",
    "cli",
    "main",
    "plan_classifier_run",
    "restore",
    "train_classifier",
]

logger = logging.getLogger("sdt_diffusion.training")

MODEL_DIR = "model"  # the export: a transformers folder, with timm's format in model/timm
BEST_DIR = "best"  # the best evaluated weights so far: weights.safetensors + best.json
LossHook = Callable[[int, torch.Tensor], torch.Tensor]
"""``hook(step, loss) -> loss``: sees (and may replace) each micro-batch's loss of ``step`` (1-based) before the
backward pass (to observe it, or to inject a fault in a test)."""


class NonFiniteClassifierLoss(RuntimeError):
    """The training loss became NaN/inf; the run stopped before the weights changed, without a checkpoint."""

    def __init__(self, step: int, loss: float, last_checkpoint: Path | None = None) -> None:
        super().__init__(step, loss)
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint

    def __str__(self) -> str:
        where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
        return f"non-finite training loss {self.loss} at step {self.step}; stopped without saving; {where}"


@dataclass
class ClassifierResult:
    """What a finished (or signalled) run produced."""

    step: int
    output_dir: Path
    last_checkpoint: Path | None
    model_dir: Path | None
    stopped_by_signal: bool
    best: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------- plan
@dataclass
class ClassifierData:
    """The training and validation images and the classes."""

    train: LabelledImages
    eval: LabelledImages | None
    num_classes: int
    class_names: list[str] | None
    id2label: dict[int, str]


@dataclass
class ClassifierPlan:
    """Everything decided before the first weight is built."""

    world: int
    rank: int
    per_device: int
    accum: int
    data: ClassifierData
    model_config: dict[str, Any]  # SDT-H keyword arguments, num_labels included
    sampler: RepeatedAugmentSampler
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    learning_rate: float  # after the linear scaling rule
    checkpoint_every: int
    resume_from: Path | None
    start_state: dict[str, Any] = field(default_factory=dict)
    rng_state: RngState | None = None
    inexact: list[str] = field(default_factory=list)
    finished: bool = False

    @property
    def start_step(self) -> int:
        return int(self.start_state.get("step", 0))

    @property
    def sdt_h_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_config.items() if k != "num_labels"}


def _open(settings: ClassifierSettings, folder: str | None, saved: str | None, split: str, what: str
          ) -> LabelledImages:
    try:
        return open_labelled_images(folder or saved, split if saved else None, settings.image_column,
                                    settings.label_column)
    except DataInputError as e:
        raise ConfigError(f"{what}: {e}") from None


def open_data(settings: ClassifierSettings, accelerator: Any) -> ClassifierData:
    """The training and validation images, checked against each other (same class names in the same order, or
    validation labels within the training classes).

    Raises:
        ConfigError: no classes, an empty class, labels out of range, mismatched class lists.
    """
    with accelerator.local_main_process_first():  # a saved dataset may build caches: once per node
        train = _open(settings, settings.data_dir, settings.dataset, settings.dataset_split, "training data")
        held = None
        if settings.eval_data_dir or settings.eval_dataset:
            held = _open(settings, settings.eval_data_dir, settings.eval_dataset, settings.eval_dataset_split,
                         "evaluation data")
    if train.num_classes < 2:
        raise ConfigError(f"{train.description}: a classifier needs at least 2 classes, found {train.num_classes}")
    if held is not None:
        if held.class_names and train.class_names and held.class_names != train.class_names:
            only = sorted(set(held.class_names) ^ set(train.class_names))
            detail = (f"classes in only one of them: {only[:5]}" if only else "the same classes in another order")
            raise ConfigError(f"{held.description} and {train.description} do not have the same classes ({detail})")
        try:
            check_labels(held, train.num_classes, "label")
        except DataInputError as e:
            raise ConfigError(f"evaluation data: {e} (the training data has {train.num_classes} classes)") from None
    id2label = class_names_to_id2label(train.class_names, train.num_classes) or {
        i: f"LABEL_{i}" for i in range(train.num_classes)}
    return ClassifierData(train, held, train.num_classes, train.class_names, id2label)


def verify_images(settings: ClassifierSettings, data: ClassifierData, accelerator: Any) -> None:
    """Decode every image (``--verify-images all``, or ``auto`` for small data), split across processes.

    Raises:
        ConfigError: naming the unreadable images (on every process alike).
    """
    sets = [data.train] + ([data.eval] if data.eval is not None else [])
    total = sum(len(s) for s in sets)
    if settings.verify_images == "none" or (settings.verify_images == "auto" and total > AUTO_VERIFY_LIMIT):
        return
    rank, world = accelerator.process_index, accelerator.num_processes
    problems = []
    for images in sets:
        problems += find_unreadable_images(images, range(rank, len(images), world))
    problems = [p for part in gather_object([problems]) for p in part]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError(f"{len(problems)} unreadable image(s): {'; '.join(problems[:5])}{more}; remove or replace "
                          f"them (--verify-images none skips this check)")


def resolve_model_config(settings: ClassifierSettings, num_classes: int) -> dict[str, Any]:
    """The preset's SDT-H arguments with the overrides and the data's class count, validated (no weights built).

    Raises:
        ConfigError: a bad argument, or a resolution the model's total stride does not divide.
    """
    config = {"decay_modes": DEFAULT_DECAY_MODES, **sdt_h_preset(settings.preset), **settings.model_kwargs,
              "num_labels": num_classes}
    try:
        checked = check_sdt_h_args(**config)
    except ValueError as e:
        raise ConfigError(f"bad model configuration: {e}") from None
    stride = 4 * 2 ** (len(checked["embed_dims"]) - 1)
    if settings.resolution % stride:
        raise ConfigError(f"--resolution {settings.resolution} is not divisible by {stride}, the total stride of "
                          f"SDT-H's {len(checked['embed_dims'])} stages")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _exactness(settings: ClassifierSettings, plan: ClassifierPlan) -> tuple[RngState | None, list[str]]:
    """This process's RNG states and every reason (of any process) why the resume would not be exact.

    Raises:
        ConfigError: there is a reason and ``--allow-inexact-resume`` was not given.
    """
    state, reasons = plan.start_state, []
    if state.get("seed") != settings.seed:
        reasons.append(f"--seed {settings.seed} differs from the checkpoint's {state.get('seed')} (it sets the data "
                       f"order and the augmentations)")
    layout = (state.get("num_processes"), state.get("per_device_batch"), state.get("grad_accum"))
    if layout != (plan.world, plan.per_device, plan.accum):
        reasons.append(f"{plan.world} processes x {plan.per_device} per device x {plan.accum} accumulation differ "
                       f"from the checkpoint's {layout[0]} x {layout[1]} x {layout[2]}")
    if state.get("num_samples") != len(plan.data.train):
        reasons.append(f"the training data has {len(plan.data.train)} images, the checkpoint's had "
                       f"{state.get('num_samples')}")
    rng_state, why = read_rng_states(plan.resume_from, state, plan.rank)
    reasons += [w for w in gather_object([why]) if w]
    if reasons and not settings.allow_inexact_resume:
        raise ConfigError(f"--resume {plan.resume_from} would not continue the run exactly: {'; '.join(reasons)}. "
                          f"Pass --allow-inexact-resume to continue anyway (the log and metrics.jsonl then say so)")
    return rng_state, reasons


def plan_classifier_run(settings: ClassifierSettings, accelerator: Any) -> ClassifierPlan:
    """Check every flag against the processes, the data and the checkpoint to resume from.

    Raises:
        ConfigError: anything that would fail later (batch split, data, model, resume point).
    """
    resume_from = resolve_resume(settings.resume, settings.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_device, accum = plan_batches(settings.global_batch_size, settings.per_device_batch, world)
    if settings.augment.mixes and per_device % 2:
        raise ConfigError(f"Mixup/CutMix pairs images within a micro-batch, which must be even; the global batch "
                          f"{settings.global_batch_size} gives {per_device} per process per micro-batch (set "
                          f"--per-device-batch, or --mixup 0 --cutmix 0)")
    data = open_data(settings, accelerator)
    model_config = resolve_model_config(settings, data.num_classes)
    sampler = RepeatedAugmentSampler(len(data.train), world, rank, settings.seed, settings.augment.repeated_aug)
    batches_per_epoch = len(sampler) // per_device
    if batches_per_epoch < accum:
        raise ConfigError(f"each of the {world} processes gets {len(sampler)} images per epoch, fewer than one "
                          f"step's {per_device * accum}; lower --global-batch-size")
    steps_per_epoch = batches_per_epoch // accum
    recipe = settings.recipe
    total = recipe.max_steps or recipe.epochs * steps_per_epoch
    warmup = min(total, round(recipe.warmup_epochs * steps_per_epoch))
    lr = scaled_learning_rate(recipe.learning_rate, settings.global_batch_size, recipe.lr_base_batch)
    start_state = read_training_state(resume_from) if resume_from else {}
    plan = ClassifierPlan(world, rank, per_device, accum, data, model_config, sampler, steps_per_epoch, total, warmup,
                          lr, settings.checkpoint_every or steps_per_epoch, resume_from, start_state)
    if resume_from is not None:
        check_checkpoint(resume_from, start_state)
        if start_state.get("task") != "classification":
            raise ConfigError(f"--resume {resume_from} is not a checkpoint of the classification trainer")
        saved = start_state.get("model_config") or {}
        changed = {k: (saved.get(k), model_config.get(k)) for k in set(saved) | set(model_config)
                   if k not in ("attention_backend", "drop_path_rate") and saved.get(k) != model_config.get(k)}
        if changed:
            raise ConfigError(f"--resume {resume_from}: the model config differs from the checkpoint's "
                              f"(field: (checkpoint, now)) {changed}")
        done = read_done(settings.output_dir)
        plan.finished = done is not None and done["step"] == plan.start_step and plan.start_step >= total
        if not plan.finished:
            plan.rng_state, plan.inexact = _exactness(settings, plan)
    verify_images(settings, data, accelerator)
    return plan


# ------------------------------------------------------------------------------------------------ build
@dataclass
class ClassifierCore:
    """The objects an optimizer step works on.  ``accelerator``, ``model``, ``optimizer``, ``ema`` and ``fsdp`` are
    what :func:`~.checkpointing.write_state` and :func:`~.checkpointing.load_state` save and restore."""

    accelerator: Any
    model: torch.nn.Module  # prepared (DDP-wrapped when several processes)
    optimizer: torch.optim.Optimizer
    ema: EMA
    scheduler: Any  # timm CosineLRScheduler, set from the step number
    mixup: Any | None
    criterion: torch.nn.Module
    grad_accum: int
    max_grad_norm: float | None
    fsdp: bool = False

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped(self) -> SDTH:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def ema_tensors(self) -> list[torch.Tensor]:
        """What the EMA averages: every parameter, then every floating-point buffer (BatchNorm statistics)."""
        model = self.unwrapped
        return list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]

    def forked_rng(self) -> Any:
        """Fork the global (and CUDA) generators: work inside leaves the training streams untouched."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])


def build_model(plan: ClassifierPlan, preset: str) -> SDTH:
    """SDT-H through ``timm.create_model`` (so it carries timm's ``pretrained_cfg`` for the timm export)."""
    kwargs = dict(plan.sdt_h_kwargs)
    return timm.create_model(TIMM_NAMES[preset], pretrained=False, num_classes=plan.model_config["num_labels"],
                             **kwargs)


def build_core(settings: ClassifierSettings, plan: ClassifierPlan, accelerator: Accelerator) -> ClassifierCore:
    """The model, AdamW (biases, 1-D parameters and layer scales without weight decay), the cosine schedule, Mixup,
    the loss and the EMA, seeded alike on every process (identical initial weights)."""
    if str(accelerator.distributed_type).endswith("FSDP"):
        raise ConfigError("the classification trainer runs data-parallel (DDP); SDT-H fits one GPU, so launch "
                          "without FSDP")
    set_seed(settings.seed)
    if settings.runtime.allow_tf32:
        enable_tf32()
    model = build_model(plan, settings.preset)
    if settings.runtime.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    recipe = settings.recipe
    groups = timm_optim.param_groups_weight_decay(model, recipe.weight_decay,
                                                  no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=plan.learning_rate, eps=recipe.adam_eps)
    scheduler = timm_scheduler.CosineLRScheduler(
        optimizer, t_initial=max(1, plan.total_steps - plan.warmup_steps), lr_min=recipe.min_lr,
        warmup_t=plan.warmup_steps, warmup_lr_init=recipe.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    if accelerator.is_main_process:
        params = sum(p.numel() for p in model.parameters())
        logger.info("model %s (timm %s): %.2fM parameters, decay modes %s, %d classes", settings.preset,
                    TIMM_NAMES[settings.preset], params / 1e6, model.decay_modes, plan.model_config["num_labels"])
    model, optimizer = accelerator.prepare(model, optimizer)
    core = ClassifierCore(accelerator, model, optimizer, EMA([], recipe.ema_decay), scheduler,
                          build_mixup(settings.augment, plan.data.num_classes), build_criterion(settings.augment),
                          plan.accum, recipe.max_grad_norm)
    core.ema = EMA(core.ema_tensors(), recipe.ema_decay)
    return core


def restore(core: ClassifierCore, plan: ClassifierPlan, settings: ClassifierSettings) -> int:
    """Resume from ``plan.resume_from`` (weights, AdamW, EMA, grad scaler, this process's generators) or seed a
    fresh run; returns the steps already done.  The flags keep the hyper-parameters: the weight decay and EMA
    decay given now apply from the resumed step on (the lr follows the schedule of the flags)."""
    if plan.resume_from is None:
        set_seed(settings.seed, device_specific=True)  # per-process Mixup draws and drop path
        return 0
    decays = [group["weight_decay"] for group in core.optimizer.param_groups]
    saved_decay = load_state(core, plan.resume_from, plan.start_state)
    if plan.rng_state is not None:
        restore_rng(plan.rng_state)
    else:  # only with --allow-inexact-resume
        reseed = np.random.SeedSequence([settings.seed, plan.start_step, core.accelerator.process_index])
        set_seed(int(reseed.generate_state(1)[0]) & 0x7FFFFFFF)
    main = core.accelerator.is_main_process
    for group, decay in zip(core.optimizer.param_groups, decays):
        if group["weight_decay"] != decay and main:
            logger.warning("--weight-decay %s differs from the checkpoint's %s; using %s from step %d", decay,
                           group["weight_decay"], decay, plan.start_step)
        group["weight_decay"] = decay
    if saved_decay != settings.recipe.ema_decay and main:
        logger.warning("--ema-decay %s differs from the checkpoint's %s; using %s from step %d",
                       settings.recipe.ema_decay, saved_decay, settings.recipe.ema_decay, plan.start_step)
    return plan.start_step


# ------------------------------------------------------------------------------------------------- step
@dataclass
class StepStats:
    """A step's loss and gradient norm averaged over processes, its lr, the data epoch, and the stop flag."""

    loss: float
    grad_norm: float
    lr: float
    epoch: int
    stop_requested: bool
    seconds: float


def sync_buffers(core: ClassifierCore) -> None:
    """Copy process 0's floating-point buffers (BatchNorm statistics) to every process (one broadcast).

    DDP broadcasts them at the start of every forward anyway, so training is unchanged; doing it after the step
    too makes the EMA of the statistics (and evaluation) identical on every process."""
    if core.accelerator.num_processes == 1:
        return
    buffers = [b for b in core.unwrapped.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
    torch.distributed.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def classifier_step(core: ClassifierCore, batches: Iterator[tuple[int, dict[str, Any]]], step: int,
                    stop_requested: Callable[[], bool], loss_hook: LossHook | None = None) -> StepStats:
    """Optimizer step number ``step + 1``; all processes must call it.

    Raises:
        NonFiniteClassifierLoss: the averaged loss is NaN/inf; gradients are dropped, weights and EMA unchanged.
    """
    start = time.perf_counter()
    core.model.train()
    core.scheduler.step_update(step)  # the lr of update ``step`` (0-based): warm-up, then cosine
    total = torch.zeros((), device=core.device)
    epoch = 0
    for micro in range(core.grad_accum):
        epoch, batch = next(batches)
        pixels = batch["pixel_values"].to(core.device, non_blocking=True)
        target = batch["labels"].to(core.device, non_blocking=True)
        if core.mixup is not None:
            pixels, target = core.mixup(pixels, target)
        last = micro == core.grad_accum - 1
        with core.accelerator.no_sync(core.model) if not last else contextlib.nullcontext():
            loss = core.criterion(core.model(pixels), target)
            if loss_hook is not None:
                loss = loss_hook(step + 1, loss)
            core.accelerator.backward(loss / core.grad_accum)
        total += loss.detach().float()
    norm = core.accelerator.clip_grad_norm_(core.model.parameters(), core.max_grad_norm or float("inf"))
    norm = torch.as_tensor(norm, device=core.device, dtype=torch.float32).reshape(())
    flag = torch.tensor(float(stop_requested()), device=core.device)
    stats = core.accelerator.reduce(torch.stack([total / core.grad_accum, norm, flag]), "sum")
    loss, grad_norm = (stats[:2] / core.accelerator.num_processes).tolist()
    if not math.isfinite(loss):
        core.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteClassifierLoss(step + 1, loss)
    lr = core.optimizer.param_groups[0]["lr"]
    core.optimizer.step()
    core.optimizer.zero_grad(set_to_none=True)
    sync_buffers(core)
    core.ema.update(core.ema_tensors())
    return StepStats(loss, grad_norm, lr, epoch, float(stats[2]) > 0, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------- run
@dataclass
class Run:
    """A built run: settings, plan, training objects, and what it has written so far."""

    settings: ClassifierSettings
    plan: ClassifierPlan
    core: ClassifierCore
    eval_set: TransformedImages | None
    metrics: MetricsWriter
    last_checkpoint: Path | None
    epoch: int
    started: float
    best: dict[str, Any] | None = None
    model_dir: Path | None = None
    inexact_resumes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accelerator(self) -> Accelerator:
        return self.core.accelerator

    @property
    def is_main(self) -> bool:
        return self.core.accelerator.is_main_process

    @property
    def out(self) -> Path:
        return self.settings.output_dir


def read_best(output_dir: Path, up_to_step: int) -> dict[str, Any] | None:
    """``best/best.json`` if it was written at or before ``up_to_step`` (a record from beyond the resumed step
    belongs to a discarded continuation), else ``None``."""
    try:
        best = json.loads((output_dir / BEST_DIR / "best.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(best, dict) or not isinstance(best.get("step"), int) or best["step"] > up_to_step:
        return None
    return best


def start_run(settings: ClassifierSettings, plan: ClassifierPlan, core: ClassifierCore, step: int) -> Run:
    """Files, metrics, trackers and the start-up log of a built (and possibly resumed) run."""
    accelerator = core.accelerator
    out = settings.output_dir
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config = {**settings.flags, "resolved_model_config": plan.model_config, "learning_rate_scaled": plan.learning_rate,
                  "per_device_batch_resolved": plan.per_device, "grad_accum": plan.accum, "num_processes": plan.world,
                  "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
                  "warmup_steps": plan.warmup_steps}
        (out / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        clear_done(out)
    metrics = MetricsWriter(out / METRICS_FILE, step, accelerator.is_main_process)
    accelerator.init_trackers(settings.runtime.tracker_project, config=tracker_config(settings.flags))
    history = list(plan.start_state.get("inexact_resumes", []))
    if plan.inexact:
        history.append({"step": step, "reasons": plan.inexact})
        metrics.write({"step": step, "inexact_resume": plan.inexact})
    best = read_best(out, step) if plan.resume_from is not None else None
    if accelerator.is_main_process:
        d, r = plan.data, settings.recipe
        logger.info("data: %s, %d images, %d classes%s; %d processes x %d per device x %d accumulation = global "
                    "batch %d", d.train.description, len(d.train), d.num_classes,
                    f"; evaluation on {d.eval.description} ({len(d.eval)} images)" if d.eval else "", plan.world,
                    plan.per_device, plan.accum, settings.global_batch_size)
        logger.info("learning rate %.4g = --learning-rate %g x global batch %d / --lr-base-batch %d (linear scaling "
                    "rule); %d warm-up steps from %g, cosine to %g over %d steps (%d per epoch)", plan.learning_rate,
                    r.learning_rate, settings.global_batch_size, r.lr_base_batch, plan.warmup_steps, r.warmup_lr,
                    r.min_lr, plan.total_steps, plan.steps_per_epoch)
        if settings.augment.repeated_aug > 1 and plan.world == 1:
            logger.warning("--repeated-aug %d with one process: the copies of an image share a batch (the recipe "
                           "assumes several processes; pass --repeated-aug 1 for single-device runs)",
                           settings.augment.repeated_aug)
        if plan.resume_from is not None:
            logger.info("resumed from %s at step %d", plan.resume_from, step)
        for reason in plan.inexact:
            logger.warning("INEXACT RESUME (--allow-inexact-resume): %s", reason)
        if not best and (out / BEST_DIR).exists():
            shutil.rmtree(out / BEST_DIR)
    eval_set = None
    if plan.data.eval is not None:
        eval_set = TransformedImages(plan.data.eval, eval_transform(settings.resolution, settings.eval_crop_pct))
    return Run(settings, plan, core, eval_set, metrics, latest_checkpoint(out), step // plan.steps_per_epoch,
               time.time(), best=best, inexact_resumes=history)


def training_state(run: Run, step: int) -> dict[str, Any]:
    """``training_state.json`` of a checkpoint: batch layout, data position, model and classes."""
    s, p = run.settings, run.plan
    return {"task": "classification", "global_batch_size": s.global_batch_size, "per_device_batch": p.per_device,
            "grad_accum": p.accum, "num_processes": p.world, "seed": s.seed, "epoch": step // p.steps_per_epoch,
            "num_samples": len(p.data.train), "consumed_samples": step * s.global_batch_size,
            "model": s.preset, "model_config": p.model_config, "id2label": p.data.id2label,
            "resolution": s.resolution, "inexact_resumes": run.inexact_resumes}


def save_run_checkpoint(run: Run, step: int) -> Path:
    """Save ``checkpoint-<step>`` (all processes) and prune old ones."""
    core = run.core
    path = save_checkpoint(core.accelerator, run.out, step, training_state(run, step), lambda f: write_state(core, f))
    if run.is_main:
        prune_checkpoints(run.out, run.settings.keep_checkpoints)
        logger.info("saved %s", path)
    run.last_checkpoint = path
    return path


# ------------------------------------------------------------------------------------------ evaluation
def _evaluate_weights(run: Run, desc: str) -> dict[str, float]:
    """Top-1/top-5 and loss of the unwrapped model's current weights on the validation set (all processes)."""
    core, s = run.core, run.settings
    model = core.unwrapped
    model.eval()
    try:
        with core.forked_rng(), core.accelerator.autocast():
            sums = evaluate_classifier(model, run.eval_set, core.device, s.eval_batch_size or run.plan.per_device,
                                       s.num_workers, range(run.plan.rank, len(run.eval_set), run.plan.world),
                                       progress=run.is_main and s.runtime.progress_bar, desc=desc)
    finally:
        model.train()
    return summarise(core.accelerator.reduce(sums, "sum"))


def _weights_state(run: Run, which: str) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict with the online or the EMA weights."""
    core = run.core
    if which == "online":
        return {k: v.detach().cpu().clone() for k, v in core.unwrapped.state_dict().items()}
    with core.ema.swapped_into(core.ema_tensors()):
        return {k: v.detach().cpu().clone() for k, v in core.unwrapped.state_dict().items()}


def save_best(run: Run, record: dict[str, Any]) -> None:
    """Keep the weights of a new best evaluation in ``best/`` (atomically; main process)."""
    tmp = run.out / (BEST_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_weights_state(run, record["weights"]), str(tmp / "weights.safetensors"))
    atomic_write_text(tmp / "best.json", json.dumps(record, indent=2))
    replace_dir(tmp, run.out / BEST_DIR)


def evaluate(run: Run, step: int) -> None:
    """Top-1/top-5 of the online and the EMA weights; a new best (of either) is kept in ``best/``."""
    core = run.core
    online = _evaluate_weights(run, "eval")
    with core.ema.swapped_into(core.ema_tensors()):
        averaged = _evaluate_weights(run, "eval EMA")
    which, chosen = ("ema", averaged) if averaged["top1"] >= online["top1"] else ("online", online)
    epoch = step / run.plan.steps_per_epoch
    record = {"step": step, "epoch": round(epoch, 3), "eval_loss": online["loss"], "eval_top1": online["top1"],
              "eval_top5": online["top5"], "eval_loss_ema": averaged["loss"], "eval_top1_ema": averaged["top1"],
              "eval_top5_ema": averaged["top5"], "eval_images": online["images"]}
    if run.best is None or chosen["top1"] > run.best["top1"]:
        run.best = {"step": step, "epoch": record["epoch"], "weights": which, "top1": chosen["top1"],
                    "top5": chosen["top5"]}
        if run.is_main:
            save_best(run, run.best)
    record.update(best_top1=run.best["top1"], best_step=run.best["step"])
    run.metrics.write(record)
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    if run.is_main:
        logger.info("step %d (epoch %.2f): top-1 %.2f%% / top-5 %.2f%% (EMA %.2f%% / %.2f%%) on %d images; best "
                    "%.2f%% (%s, step %d)", step, epoch, online["top1"], online["top5"], averaged["top1"],
                    averaged["top5"], online["images"], run.best["top1"], run.best["weights"], run.best["step"])
    core.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- export
def export_weights(run: Run) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """The weights ``--export-weights`` asks for: ``(which, state dict, info)``."""
    choice = run.settings.export_weights
    if choice == "best" and run.best is not None and (run.out / BEST_DIR / "weights.safetensors").is_file():
        return run.best["weights"], load_file(str(run.out / BEST_DIR / "weights.safetensors")), dict(run.best)
    which = "online" if choice == "online" else "ema"
    return which, _weights_state(run, which), {}


def export_model(run: Run, step: int) -> Path:
    """``<output-dir>/model``: a transformers folder (``SDTHForImageClassification``, ``id2label`` from the data,
    the evaluation image processor) with timm's format in ``model/timm``; written atomically (main process)."""
    s, p = run.settings, run.plan
    which, state, info = export_weights(run)
    with run.core.forked_rng():  # building the export models draws initial weights
        model = build_model(p, s.preset)
        model.load_state_dict(state)
        model.eval()
        hf = sdt_h_to_transformers(model, p.sdt_h_kwargs, p.data.id2label)
    tmp = run.out / (MODEL_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    processor = sdt_h_image_processor(crop_size=s.resolution)
    processor.crop_pct = s.eval_crop_pct  # resize the short side to resolution / crop_pct, as evaluation does
    processor.save_pretrained(str(tmp))
    hf.save_pretrained(str(tmp))
    names = [p.data.id2label[i] for i in range(p.data.num_classes)]
    timm_models.save_for_hf(model, str(tmp / "timm"), model_config={"label_names": names}, safe_serialization=True,
                            data_config={"input_size": (3, s.resolution, s.resolution), "crop_pct": s.eval_crop_pct,
                                         "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    summary = {"weights": which, "export_weights": s.export_weights, "step": step, "model": s.preset,
               "resolution": s.resolution, **({"best": info} if info else {})}
    atomic_write_text(tmp / "training_summary.json", json.dumps(summary, indent=2))
    return replace_dir(tmp, run.out / MODEL_DIR)


# ------------------------------------------------------------------------------------------------ loop
@dataclass
class Window:
    """Sums of the steps since the last training line of ``metrics.jsonl``."""

    loss: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    seconds: float = 0.0

    def add(self, stats: StepStats) -> None:
        self.loss += stats.loss
        self.grad_norm += stats.grad_norm
        self.steps += 1
        self.seconds += stats.seconds

    def record(self, step: int, epoch: int, lr: float, global_batch: int, elapsed: float) -> dict[str, Any]:
        n = max(self.steps, 1)
        line = {"step": step, "epoch": epoch, "loss": self.loss / n, "grad_norm": self.grad_norm / n, "lr": lr,
                "images_per_s": global_batch * self.steps / max(self.seconds, 1e-9), "time": elapsed}
        self.loss, self.grad_norm, self.steps, self.seconds = 0.0, 0.0, 0, 0.0
        return line


def _due_eval(run: Run, step: int) -> bool:
    every = run.settings.eval_every_epochs
    final = step >= run.plan.total_steps
    return run.eval_set is not None and (final or (every > 0 and step % (every * run.plan.steps_per_epoch) == 0))


def after_checkpoint(run: Run, step: int) -> None:
    """What is due at ``step`` once its checkpoint is written: the evaluation at an epoch's end; at (or past) the last
    step the final evaluation, the export and ``training_done.json``.  A resumed run calls it first for its
    starting step, so what a stop after the checkpoint left undone is done (deterministically)."""
    if _due_eval(run, step):
        evaluate(run, step)
    if step >= run.plan.total_steps:
        if run.is_main:
            run.model_dir = export_model(run, step)
            logger.info("exported the %s weights to %s (transformers) and %s (timm)", run.settings.export_weights,
                        run.model_dir, run.model_dir / "timm")
            write_done(run.out, step, run.model_dir)
            logger.info("finished at step %d (%s written)", step, DONE_FILE)
        run.accelerator.wait_for_everyone()


def run_loop(run: Run, step: int, stop: StopSignal, loss_hook: LossHook | None = None) -> tuple[int, bool]:
    """Train from ``step`` to the last step or until a stop signal; returns ``(step, stopped_by_signal)``.

    Raises:
        NonFiniteClassifierLoss: with the last good checkpoint named.
    """
    plan, s = run.plan, run.settings
    batches = iterate_batches(
        AugmentedImages(plan.data.train, train_transform(s.resolution, s.augment), s.seed), plan.sampler,
        plan.per_device, start_batch=step * plan.accum, num_workers=s.num_workers,
        pin_memory=run.core.device.type == "cuda", skip_first_batches=run.accelerator.skip_first_batches)
    window = Window()
    bar = tqdm(total=plan.total_steps, initial=step, disable=not (run.is_main and s.runtime.progress_bar),
               desc="train", dynamic_ncols=True)
    try:
        while step < plan.total_steps:
            try:
                stats = classifier_step(run.core, batches, step, stop.requested, loss_hook)
            except NonFiniteClassifierLoss as e:
                e.last_checkpoint = run.last_checkpoint
                raise
            step += 1
            bar.update(1)
            run.epoch = stats.epoch
            window.add(stats)
            final = step >= plan.total_steps
            if step % s.log_every == 0 or final:
                record = window.record(step, run.epoch, stats.lr, s.global_batch_size, time.time() - run.started)
                run.metrics.write(record)
                run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
            if step % plan.checkpoint_every == 0 or stats.stop_requested or final:
                save_run_checkpoint(run, step)
            if stats.stop_requested:
                if run.is_main:
                    logger.info("stopped by signal at step %d; resume with --resume latest", step)
                return step, True
            after_checkpoint(run, step)
    finally:
        bar.close()
    return step, False


def train_classifier(args: argparse.Namespace | ClassifierSettings, *, loss_hook: LossHook | None = None
                     ) -> ClassifierResult:
    """Run (or resume) a classification run; a resume of a finished run returns at once.

    Raises:
        ConfigError: a bad flag, data, model or checkpoint (before any compute).
        NonFiniteClassifierLoss: the loss became NaN/inf (nothing saved after the last good checkpoint).
    """
    settings = args if isinstance(args, ClassifierSettings) else settings_from_args(args)
    with StopSignal() as stop:
        accelerator = make_accelerator(settings.runtime, settings.output_dir)
        plan = plan_classifier_run(settings, accelerator)
        model_dir = settings.output_dir / MODEL_DIR
        if plan.finished:
            if accelerator.is_main_process:
                logger.info("%s: the run finished at step %d (%s); nothing to do", plan.resume_from,
                            plan.start_step, DONE_FILE)
            return ClassifierResult(plan.start_step, settings.output_dir, plan.resume_from,
                                    model_dir if model_dir.is_dir() else None, False,
                                    read_best(settings.output_dir, plan.start_step))
        core = build_core(settings, plan, accelerator)
        step = restore(core, plan, settings)
        run = start_run(settings, plan, core, step)
        stopped = False
        try:
            if plan.resume_from is not None:
                after_checkpoint(run, step)
            if step < plan.total_steps:
                step, stopped = run_loop(run, step, stop, loss_hook)
        finally:
            accelerator.end_training()
    return ClassifierResult(step, settings.output_dir, run.last_checkpoint, model_dir if model_dir.is_dir() else None,
                            stopped, run.best)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 non-finite loss or unreadable image, 2 bad input)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        datefmt="%H:%M:%S")
    for noisy in ("accelerate", "datasets", "timm", "torch", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        train_classifier(parse_args(argv))
    except ConfigError as e:
        print(f"train_classifier.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteClassifierLoss as e:
        print(f"train_classifier.py: error: {e}. Try a lower --learning-rate, --max-grad-norm 5 or --mixed-precision "
              f"no.", file=sys.stderr, flush=True)
        return 1
    except DataInputError as e:  # an image that broke during training (see --verify-images)
        print(f"train_classifier.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def cli() -> NoReturn:
    """Process entry point (``training/train_classifier.py``): :func:`main`, then exit; a late SIGTERM/SIGINT after
    the run has stopped or finished is ignored (everything is on disk)."""
    code = main()
    if code == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(code)


if __name__ == "__main__":
    cli()
