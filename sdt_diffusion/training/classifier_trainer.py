"""The classification task behind ``accelerate launch training/train_classifier.py`` and ``sdt-train-classifier``:
SDT-H with the paper's ImageNet recipe.

Entry points: :func:`main`, :func:`cli` and :func:`train_classifier` (parsed flags or
:class:`~.classifier_config.ClassifierSettings`).  The loop, checkpoints, exact resume, signals and logging are
the engine's (:mod:`.engine`), shared with the diffusion trainer; this module supplies what is particular to
classification (:class:`ClassifierTask`):

* plan: the class folders or datasets (labels checked, optionally every image decoded), the model config, the
  repeated-augmentation sampler, the epochs, warm-up and the scaled learning rate;
* build: the timm model, AdamW with timm's weight-decay groups, timm's cosine schedule (set from the step number,
  so it has no state of its own), Mixup/CutMix and the loss, the EMA of the parameters and the BatchNorm
  statistics (as timm's ``ModelEma``); the statistics are broadcast from process 0 after every step, so every
  process holds the same EMA;
* after each checkpoint: at each epoch's end the top-1/top-5 of the online and EMA weights on the validation set
  (the best weights are kept in ``best/``), and at the end the export of the best (or EMA) weights to ``model/``
  (transformers) and ``model/timm/`` (timm).

Exact resumption works as for diffusion: the data order and every image's augmentation are functions of the seed,
the epoch and the image; each process's generator states (Mixup, drop path) come back from the checkpoint;
evaluation and export run in forks of the generators.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from ..data import (
    DataInputError,
    LabelledImages,
    TransformedImages,
    UnreadableImageError,
    check_labels,
    class_names_to_id2label,
    open_dataset,
    open_labelled_images,
    parse_data_files,
    verify_images,
)
from ..evaluation.classification import eval_transform, evaluate_classifier, summarise
from ..hub import write_model_card
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
from ..utils.errors import ConfigError
from ..utils.files import atomic_write_text, replace_dir
from ..utils.optional import import_optional
from ..utils.runtime import enable_tf32
from . import engine
from .cards import classifier_card_facts
from .classifier_config import (
    ClassifierSettings,
    model_overrides,
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
from .data_stream import DATA, class_key
from .ema import EMA
from .engine import Run, RunPlan, TrainResult
from .init_from import (
    HEAD_PREFIX,
    ClassMapping,
    InitSource,
    check_source_fits,
    class_mapping,
    init_record,
    load_init_weights,
    log_init,
    log_resume_wins,
    new_head,
    open_classifier_source,
)
from .step import LossHook, TrainingCore

timm = import_optional("timm", "timm")
timm_models = import_optional("timm.models", "timm")
timm_optim = import_optional("timm.optim", "timm")
timm_scheduler = import_optional("timm.scheduler", "timm")

__all__ = ["BEST_DIR", "MODEL_DIR", "ClassifierCore", "ClassifierPlan", "ClassifierTask", "cli", "main",
           "resolve_model_config", "train_classifier"]

logger = logging.getLogger("sdt_diffusion.training")

MODEL_DIR = "model"  # the export: a transformers folder, with timm's format in model/timm
BEST_DIR = "best"  # the best evaluated weights so far: weights.safetensors + best.json


# ------------------------------------------------------------------------------------------------- plan
@dataclass
class ClassifierData:
    """The training and validation images and the classes."""

    train: LabelledImages
    eval: LabelledImages | None
    num_classes: int
    class_names: list[str] | None
    id2label: dict[int, str]


@dataclass(kw_only=True)
class ClassifierPlan(RunPlan):
    """The engine's plan plus the data and the schedule."""

    data: ClassifierData
    steps_per_epoch: int
    warmup_steps: int
    learning_rate: float  # after the linear scaling rule
    init: InitSource | None = None  # --init-from (None on a resume: the checkpoint wins)
    class_mapping: ClassMapping | None = None  # a new head: the source's classes differ from the data's

    @property
    def sdt_h_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_config.items() if k != "num_labels"}


def _open(settings: ClassifierSettings, folder: str | None, dataset: str | None, split: str, what: str,
          flags: tuple[str, str, str]) -> LabelledImages:
    """A class folder (``flags[0]``; a saved dataset there reads as one, as it always has) or a dataset
    (``flags[1]``, split ``flags[2]``: a saved folder or anything load_dataset takes).  ``--dataset-config`` and
    ``--data-files`` apply to a dataset that is ``--dataset`` itself (a validation split of the same dataset)."""
    d = settings.data
    try:
        if folder:
            return open_labelled_images(folder, None, d.image_column, d.label_column, flags[0])
        same = dataset == d.dataset
        return open_dataset(dataset, split, d.image_column, d.label_column,
                            config=d.dataset_config if same else None,
                            data_files=parse_data_files(d.data_files) if same else None, flag=flags[1],
                            split_flag=flags[2])
    except DataInputError as e:
        raise ConfigError(f"{what}: {e}") from None


def open_data(settings: ClassifierSettings, accelerator: Any) -> ClassifierData:
    """The training and validation images, checked against each other (same class names in the same order, or
    validation labels within the training classes).

    Raises:
        ConfigError: no classes, an empty class, labels out of range, mismatched class lists.
    """
    with accelerator.local_main_process_first():  # a dataset may download or build caches: once per node
        d = settings.data
        train = _open(settings, d.data_dir, d.dataset, d.dataset_split, "training data",
                      ("--data-dir", "--dataset", "--dataset-split"))
        held = None
        if d.eval_data_dir or settings.classes.eval_dataset:
            held = _open(settings, d.eval_data_dir, settings.classes.eval_dataset, settings.classes.eval_dataset_split,
                         "evaluation data", ("--eval-data-dir", "--eval-dataset", "--eval-dataset-split"))
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


def resolve_model_config(settings: ClassifierSettings, num_classes: int) -> dict[str, Any]:
    """The preset's SDT-H arguments with the overrides and the data's class count, validated (no weights built).

    Raises:
        ConfigError: a bad argument, or a resolution the model's total stride does not divide.
    """
    config = {"decay_modes": DEFAULT_DECAY_MODES, **sdt_h_preset(settings.model.model), **model_overrides(settings),
              "num_labels": num_classes}
    try:
        checked = check_sdt_h_args(**config)
    except ValueError as e:
        raise ConfigError(f"bad model configuration: {e}") from None
    stride = 4 * 2 ** (len(checked["embed_dims"]) - 1)
    if settings.data.resolution % stride:
        raise ConfigError(f"--resolution {settings.data.resolution} is not divisible by {stride}, the total stride "
                          f"of SDT-H's {len(checked['embed_dims'])} stages")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def plan_classification(settings: ClassifierSettings, accelerator: Any, **layout: Any) -> ClassifierPlan:
    """The data, the model config, the sampler and the schedule, checked against each other.

    Raises:
        ConfigError: anything that would fail later (data, model, batch larger than an epoch).
    """
    world, rank, per_device, accum = layout["world"], layout["rank"], layout["per_device"], layout["accum"]
    augment, schedule = settings.augment, settings.schedule
    if augment.mixes and per_device % 2:
        raise ConfigError(f"Mixup/CutMix pairs images within a micro-batch, which must be even; the global batch "
                          f"{settings.run.global_batch_size} gives {per_device} per process per micro-batch (set "
                          f"--per-device-batch, or --mixup 0 --cutmix 0)")
    data = open_data(settings, accelerator)
    model_config = resolve_model_config(settings, data.num_classes)
    sampler = RepeatedAugmentSampler(len(data.train), world, rank, settings.run.seed, augment.repeated_aug)
    batches_per_epoch = len(sampler) // per_device
    if batches_per_epoch < accum:
        raise ConfigError(f"each of the {world} processes gets {len(sampler)} images per epoch, fewer than one "
                          f"step's {per_device * accum}; lower --global-batch-size")
    steps_per_epoch = batches_per_epoch // accum
    total = settings.run.max_steps or schedule.epochs * steps_per_epoch
    warmup = min(total, round(schedule.warmup_epochs * steps_per_epoch))
    lr = scaled_learning_rate(settings.optim.learning_rate, settings.run.global_batch_size, schedule.lr_base_batch)
    init, mapping = plan_init(settings, data, model_config, layout["resume_from"], accelerator.is_main_process)
    return ClassifierPlan(**layout, model_config=model_config, sampler=sampler, num_samples=len(data.train),
                          total_steps=total, checkpoint_every=settings.checkpoints.checkpoint_every or steps_per_epoch,
                          data=data, steps_per_epoch=steps_per_epoch, warmup_steps=warmup, learning_rate=lr,
                          init=init, class_mapping=mapping)


# ------------------------------------------------------------------------------------------- --init-from
HEAD_PARAMS = (HEAD_PREFIX + "weight", HEAD_PREFIX + "bias")


def ema_named(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What the EMA averages, in its order, with names: every parameter, then every floating-point buffer
    (BatchNorm statistics)."""
    return list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]


def ema_names(model: torch.nn.Module) -> list[str]:
    """The names of what the EMA averages, in its order (an ``--init-from`` checkpoint's EMA file is in it)."""
    return [n for n, _ in ema_named(model)]


def plan_init(settings: ClassifierSettings, data: ClassifierData, model_config: dict[str, Any],
              resume_from: Path | None, main: bool) -> tuple[InitSource | None, ClassMapping | None]:
    """The ``--init-from`` source and, where its classes differ from the data's, a new head; the architecture is
    the flags' (``--model`` / ``--model-kwargs``), and every weight but the head must fit it by name and shape
    (checked on the ``meta`` device).  On a resume the checkpoint wins and the source is not opened.

    Raises:
        ConfigError: the source cannot be opened or does not fit, or ``--strict-classes`` and the classes differ.
    """
    given = settings.init.init_from
    if not given:
        return None, None
    if resume_from is not None:
        if main:
            log_resume_wins(resume_from, given)
        return None, None
    source = open_classifier_source(given, settings.init.init_from_ema)
    mapping = new_head(class_mapping(source.id2label, source.num_classes, data.id2label, data.num_classes,
                                     settings.init.strict_classes))
    with torch.device("meta"):
        skeleton = timm.create_model(TIMM_NAMES[settings.model.model], pretrained=False,
                                     num_classes=model_config["num_labels"],
                                     **{k: v for k, v in model_config.items() if k != "num_labels"})
    check_source_fits(skeleton, source, mapping, HEAD_PARAMS, ema_names(skeleton))
    return source, mapping


# ------------------------------------------------------------------------------------------------ build
@dataclass
class ClassifierCore(TrainingCore):
    """The engine's core plus the lr schedule, Mixup/CutMix and the loss."""

    scheduler: Any  # timm CosineLRScheduler, set from the step number
    mixup: Any | None
    criterion: torch.nn.Module

    def ema_tensors(self) -> list[torch.Tensor]:
        """What the EMA averages (:func:`ema_named`)."""
        return [t for _, t in ema_named(self.unwrapped)]

    def before_step(self, step: int) -> None:
        self.scheduler.step_update(step)  # the lr of update ``step`` (0-based): warm-up, then cosine

    def after_update(self) -> None:
        sync_buffers(self)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy (soft targets with Mixup/CutMix) of one micro-batch."""
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        target = batch["labels"].to(self.device, non_blocking=True)
        if self.mixup is not None:
            pixels, target = self.mixup(pixels, target)
        return self.criterion(self.model(pixels), target), {}


def build_model(plan: ClassifierPlan, preset: str) -> SDTH:
    """SDT-H through ``timm.create_model`` (so it carries timm's ``pretrained_cfg`` for the timm export)."""
    return timm.create_model(TIMM_NAMES[preset], pretrained=False, num_classes=plan.model_config["num_labels"],
                             **plan.sdt_h_kwargs)


def build_core(settings: ClassifierSettings, plan: ClassifierPlan, accelerator: Any) -> ClassifierCore:
    """The model, AdamW (biases, 1-D parameters and layer scales without weight decay), the cosine schedule, Mixup,
    the loss and the EMA, seeded alike on every process (identical initial weights)."""
    if str(accelerator.distributed_type).endswith("FSDP"):
        raise ConfigError("the classification trainer runs data-parallel (DDP); SDT-H fits one GPU, so launch "
                          "without FSDP")
    set_seed(settings.run.seed)
    if settings.optim.allow_tf32:
        enable_tf32()
    model = build_model(plan, settings.model.model)
    if plan.init is not None:  # --init-from: the source's weights (the EMA below starts from them)
        load_init_weights(model, plan.init, plan.class_mapping, HEAD_PARAMS, ema_names(model))
        if accelerator.is_main_process:
            log_init(plan.init, plan.class_mapping, "head")
    if settings.optim.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    optim, schedule = settings.optim, settings.schedule
    groups = timm_optim.param_groups_weight_decay(model, optim.weight_decay,
                                                  no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=plan.learning_rate, eps=schedule.adam_eps)
    scheduler = timm_scheduler.CosineLRScheduler(
        optimizer, t_initial=max(1, plan.total_steps - plan.warmup_steps), lr_min=schedule.min_lr,
        warmup_t=plan.warmup_steps, warmup_lr_init=schedule.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    if accelerator.is_main_process:
        params = sum(p.numel() for p in model.parameters())
        logger.info("model %s (timm %s): %.2fM parameters, decay modes %s, %d classes", settings.model.model,
                    TIMM_NAMES[settings.model.model], params / 1e6, model.decay_modes, plan.model_config["num_labels"])
    model, optimizer = accelerator.prepare(model, optimizer)
    core = ClassifierCore(accelerator, model, optimizer, EMA([], optim.ema_decay), plan.accum, optim.max_grad_norm,
                          scheduler, build_mixup(settings.augment, plan.data.num_classes),
                          build_criterion(settings.augment))
    core.ema = EMA(core.ema_tensors(), optim.ema_decay)
    return core


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


# ------------------------------------------------------------------------------------------ evaluation
def _evaluate_weights(task: ClassifierTask, run: Run, desc: str) -> dict[str, float]:
    """Top-1/top-5 and loss of the unwrapped model's current weights on the validation set (all processes)."""
    core, s, plan = run.core, run.settings, run.plan
    model = core.unwrapped
    model.eval()
    try:
        with core.forked_rng(), core.accelerator.autocast():
            sums = evaluate_classifier(model, task.eval_set, core.device,
                                       s.evaluation.eval_batch_size or plan.per_device, s.data.num_workers,
                                       range(plan.rank, len(task.eval_set), plan.world),
                                       progress=run.is_main and s.logging.progress_bar, desc=desc)
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


def evaluate(task: ClassifierTask, run: Run, step: int) -> None:
    """Top-1/top-5 of the online and the EMA weights; a new best (of either) is kept in ``best/``."""
    core = run.core
    online = _evaluate_weights(task, run, "eval")
    with core.ema.swapped_into(core.ema_tensors()):
        averaged = _evaluate_weights(task, run, "eval EMA")
    which, chosen = ("ema", averaged) if averaged["top1"] >= online["top1"] else ("online", online)
    epoch = step / run.plan.steps_per_epoch
    record = {"step": step, "epoch": round(epoch, 3), "eval_loss": online["loss"], "eval_top1": online["top1"],
              "eval_top5": online["top5"], "eval_loss_ema": averaged["loss"], "eval_top1_ema": averaged["top1"],
              "eval_top5_ema": averaged["top5"], "eval_images": online["images"]}
    best = task.best_record
    if best is None or chosen["top1"] > best["top1"]:
        best = task.best_record = {"step": step, "epoch": record["epoch"], "weights": which, "top1": chosen["top1"],
                                   "top5": chosen["top5"]}
        if run.is_main:
            save_best(run, best)
    record.update(best_top1=best["top1"], best_step=best["step"])
    run.metrics.write(record)
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    if run.is_main:
        logger.info("step %d (epoch %.2f): top-1 %.2f%% / top-5 %.2f%% (EMA %.2f%% / %.2f%%) on %d images; best "
                    "%.2f%% (%s, step %d)", step, epoch, online["top1"], online["top5"], averaged["top1"],
                    averaged["top5"], online["images"], best["top1"], best["weights"], best["step"])
    core.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- export
def export_weights(task: ClassifierTask, run: Run) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """The weights ``--export-weights`` asks for: ``(which, state dict, info)``."""
    choice, best = run.settings.evaluation.export_weights, task.best_record
    if choice == "best" and best is not None and (run.out / BEST_DIR / "weights.safetensors").is_file():
        return best["weights"], load_file(str(run.out / BEST_DIR / "weights.safetensors")), dict(best)
    which = "online" if choice == "online" else "ema"
    return which, _weights_state(run, which), {}


def export_model(task: ClassifierTask, run: Run, step: int) -> Path:
    """``<output-dir>/model``: a transformers folder (``SDTHForImageClassification``, ``id2label`` from the data,
    the evaluation image processor) with timm's format in ``model/timm`` and the model card (``README.md``,
    :mod:`.cards`); written atomically (main process)."""
    s, p = run.settings, run.plan
    resolution, crop_pct, preset = s.data.resolution, s.evaluation.eval_crop_pct, s.model.model
    which, state, info = export_weights(task, run)
    with run.core.forked_rng():  # building the export models draws initial weights
        model = build_model(p, preset)
        model.load_state_dict(state)
        model.eval()
        hf = sdt_h_to_transformers(model, p.sdt_h_kwargs, p.data.id2label)
    tmp = run.out / (MODEL_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    processor = sdt_h_image_processor(crop_size=resolution)
    processor.crop_pct = crop_pct  # resize the short side to resolution / crop_pct, as evaluation does
    processor.save_pretrained(str(tmp))
    hf.save_pretrained(str(tmp))
    names = [p.data.id2label[i] for i in range(p.data.num_classes)]
    timm_models.save_for_hf(model, str(tmp / "timm"), model_config={"label_names": names}, safe_serialization=True,
                            data_config={"input_size": (3, resolution, resolution), "crop_pct": crop_pct,
                                         "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    summary = {"weights": which, "export_weights": s.evaluation.export_weights, "step": step, "model": preset,
               "resolution": resolution, **({"best": info} if info else {})}
    atomic_write_text(tmp / "training_summary.json", json.dumps(summary, indent=2))
    write_model_card(tmp, classifier_card_facts(
        model, p.model_config, p.data.id2label, run.out, step, which, info or None,
        location=str(run.out / MODEL_DIR), repo_id=s.hub.hub_model_id, license=s.hub.hub_license))
    return replace_dir(tmp, run.out / MODEL_DIR)


# ------------------------------------------------------------------------------------------------- task
class ClassifierTask(engine.Task):
    """Image classification with SDT-H and the paper's (RMT's) recipe."""

    name = "classification"
    prog = "train_classifier.py"
    export_name = MODEL_DIR
    mutable_model_keys = ("attention_backend", "drop_path_rate")
    restored_hparams = (("weight_decay", "--weight-decay"),)  # the lr follows the schedule of the flags
    quiet_loggers = ("accelerate", "datasets", "timm", "torch", "transformers")
    input_errors = (UnreadableImageError,)  # an image that broke during training (see --verify-images)

    def __init__(self) -> None:
        self.eval_set: TransformedImages | None = None
        self.best_record: dict[str, Any] | None = None

    def plan(self, settings: ClassifierSettings, accelerator: Any, **layout: Any) -> ClassifierPlan:
        return plan_classification(settings, accelerator, **layout)

    def check_plan(self, settings: ClassifierSettings, plan: ClassifierPlan, accelerator: Any) -> None:
        """Every training and validation image decoded first (``--verify-images``, :func:`~..data.verify_images`)."""
        sets = [plan.data.train] + ([plan.data.eval] if plan.data.eval is not None else [])
        verify_images(sets, settings.data.verify_images, accelerator)

    def stream_fingerprint(self, settings: ClassifierSettings, plan: ClassifierPlan) -> dict[str, Any]:
        """The training images (file list and sizes, or a ``datasets`` dataset's fingerprint), the class names, the
        resolution and every augmentation setting (crop, flip, RandAugment, erasing, Mixup/CutMix, smoothing,
        repeated augmentation); the validation data decides no training batch."""
        data = plan.data.train.fingerprint()
        augment = {f.name: getattr(settings.augment, f.name) for f in fields(settings.augment)}
        return {DATA: data, class_key(data): plan.data.class_names, "resolution": settings.data.resolution,
                **augment}

    def build(self, settings: ClassifierSettings, plan: ClassifierPlan, accelerator: Any) -> ClassifierCore:
        return build_core(settings, plan, accelerator)

    def start(self, run: Run) -> None:
        s, plan, out = run.settings, run.plan, run.out
        step = plan.start_step if plan.resume_from is not None else 0
        self.best_record = read_best(out, step) if plan.resume_from is not None else None
        if plan.data.eval is not None:
            self.eval_set = TransformedImages(plan.data.eval, eval_transform(s.data.resolution,
                                                                             s.evaluation.eval_crop_pct))
        if not run.is_main:
            return
        d = plan.data
        logger.info("data: %s, %d images, %d classes%s; %d processes x %d per device x %d accumulation = global "
                    "batch %d", d.train.description, len(d.train), d.num_classes,
                    f"; evaluation on {d.eval.description} ({len(d.eval)} images)" if d.eval else "", plan.world,
                    plan.per_device, plan.accum, s.run.global_batch_size)
        logger.info("learning rate %.4g = --learning-rate %g x global batch %d / --lr-base-batch %d (linear scaling "
                    "rule); %d warm-up steps from %g, cosine to %g over %d steps (%d per epoch)", plan.learning_rate,
                    s.optim.learning_rate, s.run.global_batch_size, s.schedule.lr_base_batch, plan.warmup_steps,
                    s.schedule.warmup_lr, s.schedule.min_lr, plan.total_steps, plan.steps_per_epoch)
        if s.augment.repeated_aug > 1 and plan.world == 1:
            logger.warning("--repeated-aug %d with one process: the copies of an image share a batch (the recipe "
                           "assumes several processes; pass --repeated-aug 1 for single-device runs)",
                           s.augment.repeated_aug)
        if not self.best_record and (out / BEST_DIR).exists():
            shutil.rmtree(out / BEST_DIR)

    def config_record(self, plan: ClassifierPlan) -> dict[str, Any]:
        return {"learning_rate_scaled": plan.learning_rate, "steps_per_epoch": plan.steps_per_epoch,
                "total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps, **init_record(plan)}

    def state_record(self, run: Run) -> dict[str, Any]:
        return {"id2label": run.plan.data.id2label, "resolution": run.settings.data.resolution,
                **init_record(run.plan)}

    def dataset(self, run: Run) -> Any:
        s = run.settings
        return AugmentedImages(run.plan.data.train, train_transform(s.data.resolution, s.augment), s.run.seed)

    def after_checkpoint(self, run: Run, step: int, final: bool) -> None:
        """The evaluation at an epoch's end; at the last step the final evaluation and the export."""
        every = run.settings.evaluation.eval_every_epochs
        due = final or (every > 0 and step % (every * run.plan.steps_per_epoch) == 0)
        if self.eval_set is not None and due:
            evaluate(self, run, step)
        if final and run.is_main:
            model_dir = export_model(self, run, step)
            logger.info("exported the %s weights to %s (transformers) and %s (timm)",
                        run.settings.evaluation.export_weights, model_dir, model_dir / "timm")

    def best(self, run: Run | None, output_dir: Path, step: int) -> dict[str, Any] | None:
        return self.best_record if run is not None else read_best(output_dir, step)


def train_classifier(args: argparse.Namespace | ClassifierSettings, *, loss_hook: LossHook | None = None
                     ) -> TrainResult:
    """Run (or resume) a classification run (see :func:`~.engine.train`); a resume of a finished run returns at
    once.

    Raises:
        ConfigError: a bad flag, data, model or checkpoint (before any compute).
        NonFiniteLossError: the loss became NaN/inf (nothing saved after the last good checkpoint).
    """
    settings = args if isinstance(args, ClassifierSettings) else settings_from_args(args)
    return engine.train(ClassifierTask(), settings, loss_hook)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 non-finite loss or unreadable image, 2 bad input)."""
    return engine.run_command(ClassifierTask, lambda: train_classifier(parse_args(argv)))


def cli() -> NoReturn:
    """Process entry point (``training/train_classifier.py``, ``sdt-train-classifier``,
    ``python -m sdt_diffusion.training.classifier_trainer``)."""
    engine.exit_process(lambda: main())


if __name__ == "__main__":
    cli()
