"""The training engine: one loop for every task, driven by a small :class:`Task` interface.

The diffusion trainer (:mod:`.trainer`, SDT-P / DiT) and the classification trainer (:mod:`.classifier_trainer`,
SDT-H) are two implementations of :class:`Task`; everything else a run does is here, once:

0. lock the output folder for the life of the run (:func:`lock_output`): a second run on it is refused;
1. plan (:func:`plan_run`): the output folder (an earlier run's records need ``--resume`` or ``--overwrite``,
   :func:`check_fresh_output`), the resume point, the batch split, then the task's data and model
   (:meth:`Task.plan`) and its data stream's fingerprint (:meth:`Task.stream_fingerprint`), then the checkpoint's
   checks (format, files, task, model config) and whether the resume would be exact (:func:`check_exactness`: the
   seed, the batch layout, the data stream, the RNG files): every ``ConfigError`` before any compute;
2. build (:meth:`Task.build`) and :func:`restore`: weights, AdamW, EMA, grad scaler and every process's RNG
   states from a code-free checkpoint, the flags' hyper-parameters winning over the checkpoint's; a resume from
   an older checkpoint than the newest moves the newer ones to ``abandoned/`` (:func:`start_lineage`);
3. the loop (:func:`run_loop`): :func:`~.step.train_step`, logging (:mod:`.tracking`), checkpoints
   (:func:`save_run_checkpoint`), SIGTERM/SIGINT (:class:`~.signals.StopSignal`) and the NaN stop
   (:class:`~.step.NonFiniteLossError`);
4. after each checkpoint (:func:`after_checkpoint`): the task's evaluations and exports
   (:meth:`Task.after_checkpoint`), and at the last step ``training_done.json``, the only record that a run
   is finished;
5. ``--push-to-hub`` (:func:`push_finished`): the finished run's export goes to the Hub.

Exact resumption: the data stream is a pure function of ``(seed, epoch)`` and skips the consumed batches; every
process's RNG states, the weights, AdamW and the EMA come back from files that cannot carry code
(:mod:`.checkpointing`); evaluations and exports never touch the global RNG.  A resume first redoes what was
due after its checkpoint (at or past the last step the whole tail), so a run stopped anywhere ends with the
same files.  A resume that cannot be exact is refused unless ``--allow-inexact-resume`` is given.  SIGTERM/SIGINT
finish the current step, save a checkpoint and return (exit code 0); a second SIGINT aborts; a signal during
the tail or after the run has finished changes nothing.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

from ..data import iterate_batches
from ..hub import HubError
from ..utils.errors import ConfigError, error_line
from ..utils.files import check_writable
from ..utils.run_lock import LOCK_FILE, RunLock, lock_run
from ..utils.runtime import cpu_multiprocess
from .cards import push_export
from .checkpointing import (
    ABANDONED_DIR,
    DONE_FILE,
    CheckpointWriteError,
    check_checkpoint,
    clear_done,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    read_done,
    read_rng_states,
    read_training_state,
    resolve_resume,
    save_checkpoint,
    set_aside_newer,
    write_done,
    write_state,
)
from .config import ACCELERATE_MIXED_PRECISION, Settings, resolve_mixed_precision
from .data_stream import normalise, stream_changes
from .flags import plain
from .signals import StopSignal
from .state_files import RngState, restore_rng
from .step import LossHook, NonFiniteLossError, StepStats, TrainingCore, train_step
from .tracking import METRICS_FILE, LossWindow, MetricsWriter, resolve_report_to, tracker_config

__all__ = ["Run", "RunPlan", "Task", "TrainResult", "after_checkpoint", "check_exactness", "check_fresh_output",
           "exit_process", "lock_output", "make_accelerator", "plan_batches", "plan_run", "push_finished", "restore",
           "run_loop", "run_command", "save_run_checkpoint", "start_lineage", "start_run", "train"]

logger = logging.getLogger("sdt_diffusion.training")


@dataclass
class TrainResult:
    """What a finished (or signalled) run produced."""

    step: int
    output_dir: Path
    last_checkpoint: Path | None
    export_dir: Path | None  # the task's export (pipeline/ or model/), if there is one
    stopped_by_signal: bool
    best: dict[str, Any] | None = None  # the task's best evaluation, where it keeps one

    @property
    def pipeline_dir(self) -> Path | None:  # the diffusion task's name for its export
        return self.export_dir

    @property
    def model_dir(self) -> Path | None:  # the classification task's name for its export
        return self.export_dir


@dataclass(kw_only=True)
class RunPlan:
    """Everything decided before the first weight is built; a task's plan adds its data and schedule."""

    world: int
    rank: int
    per_device: int
    accum: int
    resume_from: Path | None
    model_config: dict[str, Any]
    sampler: Any  # len(sampler): this process's samples per epoch
    num_samples: int  # training samples (all processes)
    total_steps: int
    checkpoint_every: int
    start_state: dict[str, Any] = field(default_factory=dict)
    rng_state: RngState | None = None  # this process's RNG states from the checkpoint (None: fresh or inexact)
    inexact: list[str] = field(default_factory=list)  # why the resume is not exact (with --allow-inexact-resume)
    data_stream: dict[str, Any] = field(default_factory=dict)  # Task.stream_fingerprint (main process only)
    finished: bool = False  # the checkpoint ends a finished run: nothing to do

    @property
    def start_step(self) -> int:
        return int(self.start_state.get("step", 0))


class Task:
    """What a training task supplies to the engine (one instance per run; it may keep per-run state)."""

    name: ClassVar[str]  # recorded in training_state.json; a resume needs a checkpoint of the same task
    prog: ClassVar[str]  # the command's name in error messages
    export_name: ClassVar[str]  # the export folder in --output-dir
    # model-config keys a resume may change; values checkpoints from before a key existed had
    mutable_model_keys: ClassVar[tuple[str, ...]] = ("attention_backend",)
    legacy_model_defaults: ClassVar[dict[str, Any]] = {}
    # optimizer hyper-parameters the flags set on resume (checkpoint value replaced, with a warning)
    restored_hparams: ClassVar[tuple[tuple[str, str], ...]] = (("lr", "--learning-rate"),
                                                               ("weight_decay", "--weight-decay"))
    quiet_loggers: ClassVar[tuple[str, ...]] = ("accelerate", "datasets", "torch")
    # folders in --output-dir of per-step outputs named step-<n>[.ext]; a rollback moves the newer ones aside
    step_output_dirs: ClassVar[tuple[str, ...]] = ()
    input_errors: ClassVar[tuple[type[Exception], ...]] = ()  # bad data found during training: exit status 1

    def plan(self, settings: Any, accelerator: Any, **layout: Any) -> RunPlan:
        """The task's plan (``layout``: world, rank, per_device, accum, resume_from), checked against the data.

        Raises:
            ConfigError: anything that would fail later.
        """
        raise NotImplementedError

    def check_plan(self, settings: Any, plan: Any, accelerator: Any) -> None:
        """Checks after the resume point's (e.g. decoding every image)."""

    def stream_fingerprint(self, settings: Any, plan: Any) -> dict[str, Any]:
        """The named parts of the data stream besides the seed and the batch layout (:mod:`.data_stream`): the
        training data's fingerprint, the class names, every transform setting.  Stored in each checkpoint; a resume
        whose parts differ is not exact.  Called on the main process only (hashing a file list can take seconds)."""
        return {}

    def exported(self, output_dir: Path) -> bool:
        """Whether a finished run's export is in place (a finished resume then has nothing to do)."""
        return True

    def build(self, settings: Any, plan: Any, accelerator: Any) -> TrainingCore:
        """The model, optimizer, EMA and loss, seeded alike on every process."""
        raise NotImplementedError

    def start(self, run: Run) -> None:
        """Per-run set-up once the run is restored (evaluation sets, start-up log lines)."""

    def config_record(self, plan: Any) -> dict[str, Any]:
        """Task values for ``train_config.yaml``."""
        return {}

    def state_record(self, run: Run) -> dict[str, Any]:
        """Task values for each checkpoint's ``training_state.json``."""
        return {}

    def dataset(self, run: Run) -> Any:
        """The training dataset, indexed by the sampler's keys."""
        raise NotImplementedError

    def before_loop(self, run: Run, step: int) -> None:
        """Before the first step of this process's loop (e.g. the step-0 evaluation)."""

    def after_checkpoint(self, run: Run, step: int, final: bool) -> None:
        """Evaluations and exports due at ``step`` (``final``: the last step; the export is then due)."""

    def best(self, run: Run | None, output_dir: Path, step: int) -> dict[str, Any] | None:
        """The best evaluation so far, for the result (``run`` is ``None`` for a finished run)."""
        return None


# ------------------------------------------------------------------------------------------------- plan
def make_accelerator(settings: Settings) -> tuple[Accelerator, dict[str, Any]]:
    """The ``Accelerator`` (CPU multi-process, gloo, when several processes run without CUDA) and what it was
    given, for ``train_config.yaml``: the mixed precision and where it came from
    (:func:`~.config.resolve_mixed_precision`: ``--mixed-precision`` on the command line, else accelerate launch's
    choice, else the ``--config`` / recipe value, else ``no``) and the trackers (``--report-to auto``: tensorboard
    if installed).  The main process logs both in one line each.

    Raises:
        ConfigError: a tracker named by ``--report-to`` is not installed.
    """
    precision = resolve_mixed_precision(settings.optim.mixed_precision, settings.source("mixed_precision"))
    trackers, trackers_line = resolve_report_to(settings.logging.report_to, settings.source("report_to"))
    kwargs: dict[str, Any] = {"dynamo_backend": "inductor"} if settings.optim.compile else {}
    if precision.value != (os.environ.get(ACCELERATE_MIXED_PRECISION) or "no").lower():  # else accelerate's own
        kwargs["mixed_precision"] = precision.value
    out = settings.output_dir
    accelerator = Accelerator(cpu=settings.run.cpu or cpu_multiprocess(), log_with=trackers,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
                              **kwargs)
    used = accelerator.mixed_precision  # e.g. "no" under DeepSpeed, whose config holds the precision
    if accelerator.is_main_process:
        if precision.warning:
            logger.warning("%s", precision.warning)
        detail = f"; {precision.note}" if precision.note else ""
        detail += f"; accelerate runs {used}" if used != precision.value else ""
        logger.info("mixed precision: %s (from %s%s)", precision.value, precision.source, detail)
        if trackers_line:
            logger.info("%s", trackers_line)
    return accelerator, {"mixed_precision_resolved": used, "mixed_precision_source": precision.source,
                         "report_to_resolved": ",".join(trackers or ["none"])}


def plan_batches(global_batch: int, per_device: int | None, num_processes: int) -> tuple[int, int]:
    """``(per_device_batch, grad_accum)`` with ``per_device · processes · accum = global_batch``.

    Raises:
        ConfigError: the global batch does not split evenly.
    """
    if per_device is None:
        if global_batch % num_processes:
            raise ConfigError(f"--global-batch-size {global_batch} is not divisible by the {num_processes} processes; "
                              f"choose a multiple of {num_processes} (or set --per-device-batch)")
        return global_batch // num_processes, 1
    if global_batch % (per_device * num_processes):
        raise ConfigError(f"--global-batch-size {global_batch} is not divisible by --per-device-batch {per_device} x "
                          f"{num_processes} processes = {per_device * num_processes}")
    return per_device, global_batch // (per_device * num_processes)


def _check_resume_state(task: Task, plan: RunPlan) -> None:
    """The checkpoint must be the same task's and hold the model the flags describe."""
    state, where = plan.start_state, plan.resume_from
    if state.get("task", "diffusion") != task.name:  # checkpoints from before the task was recorded: diffusion
        raise ConfigError(f"--resume {where} is a checkpoint of the {state.get('task', 'diffusion')} trainer, "
                          f"not of the {task.name} trainer")
    saved = {**task.legacy_model_defaults, **(state.get("model_config") or {})}
    now = plan.model_config
    changed = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
               if k not in task.mutable_model_keys and saved.get(k) != now.get(k)}
    if changed:
        raise ConfigError(f"--resume {where}: the model config differs from the checkpoint's "
                          f"(field: (checkpoint, now)) {changed}")


def check_exactness(settings: Settings, plan: RunPlan) -> tuple[RngState | None, list[str]]:
    """This process's RNG states and every reason (of any process) why the resume would not continue the run
    exactly: a missing or unusable RNG state file, another ``--seed`` or batch layout, or a data stream that differs
    from the checkpoint's (:mod:`.data_stream`: files added, removed or renamed, class folders renamed, another
    transform); a checkpoint without a data-stream record (an earlier version's) is accepted with a log line.

    Raises:
        ConfigError: there is a reason and ``--allow-inexact-resume`` was not given (on every process alike).
    """
    state, reasons, seed = plan.start_state, [], settings.run.seed
    if state.get("seed") != seed:
        reasons.append(f"--seed {seed} differs from the checkpoint's seed {state.get('seed')} (it sets the data "
                       f"order and every random draw)")
    layout = (state.get("num_processes"), state.get("per_device_batch"), state.get("grad_accum"))
    if layout != (plan.world, plan.per_device, plan.accum):
        reasons.append(f"{plan.world} processes x {plan.per_device} per device x {plan.accum} accumulation differ "
                       f"from the checkpoint's {layout[0]} x {layout[1]} x {layout[2]} (the data order and the RNG "
                       f"streams change)")
    saved_stream, mine = state.get("data_stream"), []
    if not isinstance(saved_stream, dict):  # an earlier version's checkpoint: only the sample count was recorded
        if state.get("num_samples") not in (None, plan.num_samples):
            reasons.append(f"the training data has {plan.num_samples} samples, the checkpoint's had "
                           f"{state.get('num_samples')}")
        if plan.rank == 0:
            logger.info("%s holds no record of its data stream (an earlier version's checkpoint): cannot check that "
                        "the training files, classes and transforms are unchanged", plan.resume_from)
    elif plan.rank == 0:  # the fingerprint is the main process's; the others learn its reasons below
        mine, unchecked = stream_changes(saved_stream, plan.data_stream)
        if unchecked:
            logger.info("%s: cannot compare the data-stream parts %s (recorded by only one of this version and the "
                        "checkpoint's)", plan.resume_from, unchecked)
    rng_state, why = read_rng_states(plan.resume_from, state, plan.rank)
    mine += [why] if why else []
    reasons += [w for part in gather_object([mine]) for w in part]  # every process learns every process's reasons
    if reasons and not settings.checkpoints.allow_inexact_resume:
        raise ConfigError(f"--resume {plan.resume_from} would not continue the run exactly: {'; '.join(reasons)}. "
                          f"Pass --allow-inexact-resume to continue anyway (the log and metrics.jsonl then say so)")
    return rng_state, reasons


RUN_RECORDS = (DONE_FILE, METRICS_FILE, "train_config.yaml")  # with checkpoint-<step>/: a run started here


def check_fresh_output(out: Path, resume: str | None) -> None:
    """Refuse to start a new run over an earlier one's records unless the flags say what to do: without
    ``--resume`` any record (``training_done.json``, ``metrics.jsonl``, ``train_config.yaml``, checkpoints);
    with ``--resume auto`` a finished run with no checkpoint left (pruned), whose export a fresh run would replace.

    Raises:
        ConfigError: naming the folder, what it holds, and ``--resume`` / ``--overwrite``.
    """
    found = [name for name in RUN_RECORDS if (out / name).exists()]
    newest = latest_checkpoint(out)
    if resume is None and newest is not None:
        raise ConfigError(f"--output-dir {out} already holds checkpoints (newest: {newest.name}); pass --resume "
                          f"latest to continue that run, --overwrite to replace it, or choose another --output-dir")
    if resume is None and found:
        raise ConfigError(f"--output-dir {out} already holds a run ({', '.join(found)}) with no checkpoint to resume "
                          f"from; pass --overwrite to replace it, or choose another --output-dir")
    if resume == "auto" and newest is None and DONE_FILE in found:
        raise ConfigError(f"--output-dir {out} holds a finished run ({DONE_FILE}) with no checkpoint to resume from; "
                          f"pass --overwrite to train it again from scratch, or choose another --output-dir")


@contextmanager
def no_trace_if_refused(out: Path, created_here: bool) -> Iterator[None]:
    """On an exception, delete ``out`` when this run created it (``created_here``) and it holds nothing but the
    run lock: a start refused before writing anything (a bad ``--init-from``, a reference that cannot be read)
    leaves no empty run folder behind.  Anything else in it stays."""
    try:
        yield
    except BaseException:
        if created_here and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            (out / LOCK_FILE).unlink(missing_ok=True)
            with suppress(OSError):
                out.rmdir()
        raise


def lock_output(settings: Settings, accelerator: Any) -> RunLock:
    """Lock ``--output-dir`` for the life of the run (:func:`~..utils.run_lock.lock_run`: taken by the main
    process before any process writes the folder); every process raises if it is taken.

    Raises:
        OutputLockedError: another live run holds the folder (its PID and host named).
        ConfigError: the lock file cannot be created (e.g. a read-only folder or a file in the way).
    """
    out = settings.output_dir
    try:  # the same message as plan_run's for a file in the way or a read-only folder
        check_writable(out / "train_config.yaml")
    except OSError as e:
        raise ConfigError(f"--output-dir {out}: {e}") from None
    return lock_run(out / LOCK_FILE, f"--output-dir {out}", is_main=accelerator.is_main_process,
                    num_processes=accelerator.num_processes)


def plan_run(task: Task, settings: Settings, accelerator: Any) -> RunPlan:
    """Check every flag against the processes, the data and the checkpoint to resume from.

    Raises:
        ConfigError: anything that would fail later (batch split, data, model, resume point).
    """
    out = settings.output_dir
    try:  # every process, before any compute: a file in the way or a read-only folder fails here, not at step N
        check_writable(out / "train_config.yaml")
    except OSError as e:
        raise ConfigError(f"--output-dir {out}: {e}") from None
    if settings.checkpoints.overwrite:
        resume_from = None  # start_run deletes the earlier run's checkpoints and records
    else:
        check_fresh_output(out, settings.checkpoints.resume)
        resume_from = resolve_resume(settings.checkpoints.resume, out)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_device, accum = plan_batches(settings.run.global_batch_size, settings.run.per_device_batch, world)
    plan = task.plan(settings, accelerator, world=world, rank=rank, per_device=per_device, accum=accum,
                     resume_from=resume_from)
    if resume_from is not None:
        plan.start_state = read_training_state(resume_from)
        check_checkpoint(resume_from, plan.start_state)
        _check_resume_state(task, plan)
        done = read_done(out)
        plan.finished = (done is not None and done["step"] == plan.start_step
                         and plan.start_step >= plan.total_steps and task.exported(out))
    if accelerator.is_main_process and not plan.finished:  # recorded in every checkpoint, compared on resume
        plan.data_stream = normalise(task.stream_fingerprint(settings, plan))
    if resume_from is not None and not plan.finished:
        plan.rng_state, plan.inexact = check_exactness(settings, plan)
    task.check_plan(settings, plan, accelerator)
    return plan


# ------------------------------------------------------------------------------------------------ build
def restore(task: Task, core: TrainingCore, plan: RunPlan, settings: Settings) -> int:
    """Resume from ``plan.resume_from`` (weights, AdamW, EMA, grad scaler, this process's RNG) or seed a fresh
    run; returns the steps already done.

    The flags stay in charge of the hyper-parameters: those of :attr:`Task.restored_hparams` (e.g.
    ``--learning-rate``, ``--weight-decay``) and ``--ema-decay`` apply from the resumed step on when they differ
    from the checkpoint's (with a warning).
    """
    seed = settings.run.seed
    if plan.resume_from is None:
        set_seed(seed, device_specific=True)  # per-process noise, augmentation mixes, label dropout
        return 0
    built = [dict(group) for group in core.optimizer.param_groups]  # the flags' values
    saved_decay = load_state(core, plan.resume_from, plan.start_state)
    if plan.rng_state is not None:
        restore_rng(plan.rng_state)
    else:  # only with --allow-inexact-resume: fresh streams that differ from the first run's
        reseed = np.random.SeedSequence([seed, plan.start_step, core.accelerator.process_index]).generate_state(1)
        set_seed(int(reseed[0]) & 0x7FFFFFFF)
    main = core.accelerator.is_main_process
    for group, flags in zip(core.optimizer.param_groups, built):
        for key, flag in task.restored_hparams:
            if group[key] != flags[key]:
                if main:
                    logger.warning("%s %s differs from the checkpoint's %s; using %s from step %d", flag, flags[key],
                                   group[key], flags[key], plan.start_step)
                group[key] = flags[key]
    ema_decay = settings.optim.ema_decay
    if saved_decay != ema_decay and main:
        logger.warning("--ema-decay %s differs from the checkpoint's %s; using %s from step %d", ema_decay,
                       saved_decay, ema_decay, plan.start_step)
    return plan.start_step


@dataclass
class Run:
    """A built run: its task, settings and plan, the training objects, and what it has written so far."""

    task: Task
    settings: Settings
    plan: RunPlan
    core: TrainingCore
    metrics: MetricsWriter
    last_checkpoint: Path | None
    epoch: int
    started: float
    inexact_resumes: list[dict[str, Any]] = field(default_factory=list)  # recorded in every later checkpoint
    trajectory: str = ""  # the lineage id of this run's checkpoints (see start_lineage)
    parent: dict[str, Any] | None = None  # the checkpoint the next one continues: {"step", "trajectory"}

    @property
    def accelerator(self) -> Accelerator:
        return self.core.accelerator

    @property
    def is_main(self) -> bool:
        return self.core.accelerator.is_main_process

    @property
    def out(self) -> Path:
        return self.settings.output_dir

    @property
    def export_dir(self) -> Path:
        return self.out / self.task.export_name


def new_trajectory() -> str:
    """A fresh lineage id: the start time and a random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def start_lineage(plan: RunPlan, out: Path, main: bool,
                  step_dirs: tuple[str, ...] = ()) -> tuple[str, dict[str, Any] | None]:
    """The run's trajectory id and the parent of its first checkpoint.

    A fresh run starts a trajectory; a resume from the newest checkpoint continues the checkpoint's; a resume from
    an older one (e.g. to retry with a lower learning rate) starts a new one, and the main process moves the
    newer checkpoints of the old trajectory, and its newer outputs in the task's ``step_output_dirs``, to
    ``<output-dir>/abandoned/<time>-from-<step>/`` (with a copy of ``metrics.jsonl`` as it was), so that
    ``--resume latest`` and pruning follow the new trajectory and no sample grid or FID result of the old one
    reads as the new one's.
    """
    if plan.resume_from is None:
        return new_trajectory(), None
    saved = plan.start_state.get("lineage") or {}
    parent = {"step": plan.start_step, "trajectory": saved.get("trajectory")}
    if not main:  # only the main process writes training_state.json
        return "", parent
    folder, moved, outputs = set_aside_newer(out, plan.start_step, step_dirs)
    if folder is not None and (out / METRICS_FILE).is_file():
        shutil.copy2(out / METRICS_FILE, folder / METRICS_FILE)  # the resumed run drops the lines after its step
    if moved:
        also = f" and {len(outputs)} newer step outputs ({', '.join(sorted({p.parent.name for p in outputs}))})" \
            if outputs else ""
        logger.warning("resuming from step %d abandons the newer checkpoints %s%s of the earlier trajectory: moved "
                       "to %s (nothing is deleted; --resume latest and pruning now follow this run)", plan.start_step,
                       ", ".join(p.name for p in moved), also, folder)
    trajectory = saved.get("trajectory") if not moved and saved.get("trajectory") else new_trajectory()
    return trajectory, parent


def start_run(task: Task, settings: Settings, plan: RunPlan, core: TrainingCore, step: int,
              startup: dict[str, Any] | None = None) -> Run:
    """Files, metrics, trackers and the start-up log of a built (and possibly resumed) run (a resume from an older
    checkpoint moves the newer ones aside, :func:`start_lineage`); an inexact resume (``--allow-inexact-resume``)
    is recorded in the log and in ``metrics.jsonl``; ``startup`` (:func:`make_accelerator`'s record) goes into
    ``train_config.yaml``."""
    accelerator, out, main = core.accelerator, settings.output_dir, core.accelerator.is_main_process
    trajectory, parent = start_lineage(plan, out, main, task.step_output_dirs)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        config = {**settings.record(), "resolved_model_config": plan.model_config,
                  "per_device_batch_resolved": plan.per_device, "grad_accum": plan.accum, "num_processes": plan.world,
                  **(startup or {}), **task.config_record(plan)}
        (out / "train_config.yaml").write_text(yaml.safe_dump(plain(config), sort_keys=False))
        clear_done(out)  # the run is not finished (a finished one never gets here)
        if settings.checkpoints.overwrite:  # the earlier run's checkpoints, metrics and export would mix with these
            for _, path in list_checkpoints(out):
                shutil.rmtree(path)
            if (out / ABANDONED_DIR).is_dir():  # the earlier run's rolled-back checkpoints
                shutil.rmtree(out / ABANDONED_DIR)
            (out / METRICS_FILE).unlink(missing_ok=True)
            if (out / task.export_name).is_dir():
                shutil.rmtree(out / task.export_name)
    metrics = MetricsWriter(out / METRICS_FILE, step, main)
    accelerator.init_trackers(settings.logging.tracker_project, config=tracker_config(settings.record()))
    history = list(plan.start_state.get("inexact_resumes", []))
    if plan.inexact:
        history.append({"step": step, "reasons": plan.inexact})
        metrics.write({"step": step, "inexact_resume": plan.inexact})
    epoch = step * plan.accum // max(1, len(plan.sampler) // plan.per_device)
    run = Run(task, settings, plan, core, metrics, latest_checkpoint(out), epoch, time.time(), history, trajectory,
              parent)
    task.start(run)
    if main:
        if plan.resume_from is not None:
            logger.info("resumed from %s at step %d", plan.resume_from, step)
        for reason in plan.inexact:
            logger.warning("INEXACT RESUME (--allow-inexact-resume): %s", reason)
        if step > plan.total_steps:
            logger.warning("%s is at step %d, past the last step %d: the run ends at step %d", plan.resume_from, step,
                           plan.total_steps, step)
    return run


# ------------------------------------------------------------------------------------------ checkpoints
def training_state(run: Run, step: int) -> dict[str, Any]:
    """``training_state.json`` of a checkpoint: the task, the batch layout, the data position, the data stream's
    fingerprint (:mod:`.data_stream`), the lineage (the trajectory and the checkpoint this one continues) and the
    model (with the task's own values: classes, VAE, resolution), so an export needs nothing else."""
    s, p = run.settings, run.plan
    return {"task": run.task.name, "global_batch_size": s.run.global_batch_size, "per_device_batch": p.per_device,
            "grad_accum": p.accum, "num_processes": p.world, "seed": s.run.seed, "epoch": run.epoch,
            "num_samples": p.num_samples, "consumed_samples": step * s.run.global_batch_size,
            "model": s.model.model, "model_config": p.model_config, **run.task.state_record(run),
            "inexact_resumes": run.inexact_resumes, "data_stream": p.data_stream,
            "lineage": {"trajectory": run.trajectory, "parent": run.parent}}


def save_run_checkpoint(run: Run, step: int) -> Path:
    """Save ``checkpoint-<step>`` (all processes) and prune old ones."""
    core = run.core
    path = save_checkpoint(core.accelerator, run.out, step, training_state(run, step), lambda f: write_state(core, f))
    if run.is_main:
        prune_checkpoints(run.out, run.settings.checkpoints.keep_checkpoints)
        logger.info("saved %s", path)
    run.last_checkpoint = path
    run.parent = {"step": step, "trajectory": run.trajectory}
    return path


def after_checkpoint(run: Run, step: int) -> None:
    """What is due at ``step`` once its checkpoint is written: the task's evaluations and exports at their
    intervals; at (or past) the last step the task's tail (final evaluation and export), then
    ``training_done.json``, the only record that the run is finished.

    A resumed run calls it first for its starting step, so whatever a stop or crash after the checkpoint left
    undone is done (all of it is deterministic: redoing it gives the same files).
    """
    final = step >= run.plan.total_steps
    run.task.after_checkpoint(run, step, final)
    if final:
        if run.is_main:
            write_done(run.out, step, run.export_dir if run.export_dir.is_dir() else None)
            logger.info("finished at step %d (%s written)", step, DONE_FILE)
        run.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------ loop
def after_step(run: Run, step: int, stats: StepStats, window: LossWindow, bar: Any) -> None:
    """Logging and the checkpoint due after optimizer step ``step``, then :func:`after_checkpoint` (unless a stop
    signal arrived: the resumed run does that)."""
    s, plan = run.settings, run.plan
    run.epoch = stats.epoch
    window.add(stats)
    final = step >= plan.total_steps
    if step % s.logging.log_every == 0 or final:
        record = window.record(step, run.epoch, stats.lr, s.run.global_batch_size, time.time() - run.started)
        run.metrics.write(record)
        run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
    if step % plan.checkpoint_every == 0 or stats.stop_requested or final:
        save_run_checkpoint(run, step)
    if not stats.stop_requested:
        after_checkpoint(run, step)


def run_loop(run: Run, step: int, stop: StopSignal, loss_hook: LossHook | None = None) -> tuple[int, bool]:
    """Train from ``step`` to the last step or until a stop signal; returns ``(step, stopped_by_signal)``.

    Raises:
        NonFiniteLossError: with the last good checkpoint named.
    """
    plan = run.plan
    batches = iterate_batches(
        run.task.dataset(run), plan.sampler, plan.per_device, start_batch=step * plan.accum,
        num_workers=run.settings.data.num_workers, pin_memory=run.core.device.type == "cuda",
        skip_first_batches=run.accelerator.skip_first_batches,
    )
    window = LossWindow()
    bar = tqdm(total=plan.total_steps, initial=step, desc="train", dynamic_ncols=True,
               disable=not (run.is_main and run.settings.logging.progress_bar))
    try:
        run.task.before_loop(run, step)
        while step < plan.total_steps:
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
def train(task: Task, settings: Settings, loss_hook: LossHook | None = None) -> TrainResult:
    """Run (or resume) ``task``.

    A resume of a finished run (``training_done.json`` at the checkpoint's step, at or past the last step, its
    export in place) returns at once; a resume at or past the last step of an unfinished one runs the missing
    tail.

    Raises:
        ConfigError: a bad flag or a flag that contradicts the data or the checkpoint (before any compute); a
            damaged checkpoint (:class:`~.checkpointing.CheckpointError`, naming the file).
        NonFiniteLossError: the loss became NaN/inf (nothing is saved after the last good checkpoint).
    """
    out = settings.output_dir
    new_folder = not out.exists()
    with StopSignal() as stop:  # from the start: a signal before the first step stops after it; after the end, nothing
        accelerator, startup = make_accelerator(settings)
        # for the life of the run: a second run on the folder is refused; a refused start leaves no new folder
        with no_trace_if_refused(out, new_folder and accelerator.is_main_process), lock_output(settings, accelerator):
            plan = plan_run(task, settings, accelerator)
            export = out / task.export_name
            if plan.finished:
                if accelerator.is_main_process:
                    logger.info("%s: the run finished at step %d (%s); nothing to do", plan.resume_from,
                                plan.start_step, DONE_FILE)
                push_finished(settings, export, accelerator.is_main_process)  # e.g. a failed upload retried
                return TrainResult(plan.start_step, out, plan.resume_from, export if export.is_dir() else None,
                                   False, task.best(None, out, plan.start_step))
            core = task.build(settings, plan, accelerator)
            step = restore(task, core, plan, settings)
            run = start_run(task, settings, plan, core, step, startup)
            stopped = False
            try:
                if plan.resume_from is not None:
                    after_checkpoint(run, step)  # what the stopped run left undone after its checkpoint (or its tail)
                if step < plan.total_steps:
                    step, stopped = run_loop(run, step, stop, loss_hook)
            finally:
                accelerator.end_training()
            if run.is_main and not stopped:
                logger.info("done at step %d", step)
            if not stopped:
                push_finished(settings, export, run.is_main)
            return TrainResult(step, out, run.last_checkpoint, export if export.is_dir() else None, stopped,
                               task.best(run, out, step))


def push_finished(settings: Settings, export: Path, main: bool) -> None:
    """``--push-to-hub``: the main process uploads the finished run's export (model card included).

    Raises:
        HubError: the upload failed (the run stays finished; the same command with ``--resume latest`` retries it).
    """
    if not (settings.hub.push_to_hub and main):
        return
    if not export.is_dir():
        logger.warning("--push-to-hub: the run has no export in %s; nothing uploaded", export)
        return
    push_export(settings, export)


def run_command(task: type[Task], run: Callable[[], Any]) -> int:
    """A training command: ``run()`` (parse the flags, train) with one-line errors; returns the exit code (0 ok,
    1 non-finite loss, bad data or a failed checkpoint write found during training, or a failed ``--push-to-hub``
    upload, 2 bad flags or input)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        datefmt="%H:%M:%S")
    for noisy in task.quiet_loggers:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run()
    except (*task.input_errors, CheckpointWriteError) as e:  # found during training (e.g. a broken image, a full
        # disk); caught before ConfigError, which they may subclass: exit 1, not 2 (bad flags or input). A data-loader
        # worker's error carries the worker's traceback in its message: error_line prints its last line only
        print(f"{task.prog}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as e:
        print(f"{task.prog}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 2
    except HubError as e:  # training finished and its export is in place; only the upload failed
        print(f"{task.prog}: error: {e} (the run finished; rerun the command with --resume latest to retry the "
              f"upload)", file=sys.stderr, flush=True)
        return 1
    except NonFiniteLossError as e:
        print(f"{task.prog}: error: {e}. Try a lower --learning-rate, a --max-grad-norm (e.g. 5) or "
              f"--mixed-precision no.", file=sys.stderr, flush=True)
        return 1
    return 0


def exit_process(main_function: Callable[[], int]) -> NoReturn:
    """Process entry point: ``main_function()``, then exit.  Once training has stopped or finished everything is
    on disk, so a late SIGTERM/SIGINT (e.g. a scheduler's while the interpreter shuts down) is ignored rather than
    turned into a failed exit status."""
    code = main_function()
    if code == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(code)
