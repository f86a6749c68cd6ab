"""FID while training (``sdt-train --fid-every N``): FID, sFID, Inception Score (and precision/recall where the
reference allows) of the EMA weights every ``N`` optimizer steps and at the last step, never at step 0.

Nothing here is a second copy of the evaluation commands: an evaluation exports the EMA exactly as the trainer's
export does (:func:`~.export.ema_transformer`, :func:`~.export.export_pipeline`, into
``<output-dir>/fid/pipeline``), samples it with ``sdt-fid-sample``'s :func:`~..evaluation.sampling.run` (its labels,
per-index generators, chunk sharding over the processes and resumable chunk files, under
``<output-dir>/fid/step-<step>/``), and the main process scores the samples with ``sdt-fid``'s
:func:`~..evaluation.evaluate.compute_metrics` against ``--fid-reference`` through the same reference feature
cache.  The result goes to ``fid/step-<step>/results.json`` (an ``sdt-fid --output`` file, usable as
``sdt-export --fid-results``), then the samples and the pipeline are deleted, then one row goes to
``metrics.jsonl`` and the trackers: ``{"step", "fid", "sfid", "inception_score", "precision", "recall",
"fid_num_samples"}``.

That row is the record of a finished evaluation: a resumed run skips every step that ``metrics.jsonl`` (as the
resume keeps it, see :class:`~.tracking.MetricsWriter`) already scores; an evaluation stopped before its row was
written is done again, reusing the sample chunks already on disk when the EMA is the same.

Every flag, the reference (read by ``sdt-fid``'s reader), its image size against the run's, and the Inception
weights (loaded by ``sdt-fid``'s loader) are checked before any compute.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..schedulers import NUM_TRAIN_TIMESTEPS, SCHEDULER_NAMES
from ..utils.errors import ConfigError
from ..utils.files import atomic_write_text
from ..utils.runtime import MAX_PER_DEVICE_BATCH
from .export import ema_transformer, export_pipeline
from .flags import flag
from .tracking import METRICS_FILE

__all__ = ["FID_DIR", "FidSettings", "TrainingFid", "check_fid_settings", "fid_due", "scored_steps"]

logger = logging.getLogger("sdt_diffusion.training")

FID_DIR = "fid"  # in --output-dir: pipeline/ (while evaluating) and step-<step>/ (samples while evaluating, results)
METRIC_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")
PR_K = 3  # sdt-fid's default --k for precision/recall


@dataclass(frozen=True, kw_only=True)
class FidSettings:
    title: ClassVar[str] = "FID while training (--fid-every; the sdt-fid-sample / sdt-fid flags with a fid- prefix)"
    fid_every: int = flag(0, "steps between FID/sFID/IS evaluations of the EMA weights, and one at the last step "
                             "(0: off; never at step 0)")
    fid_num_samples: int | None = flag(None, "images sampled per evaluation, >= 2 (sdt-fid-sample --num-samples; "
                                             "required with --fid-every)")
    fid_reference: str | None = flag(None, "what sdt-fid takes as REFERENCE: an ADM reference .npz (statistics "
                                           "and/or arr_0 images) or an image folder (required with --fid-every)")
    fid_guidance_scale: float = flag(1.0, "classifier-free guidance scale, >= 1; 1: none, as the paper's FID "
                                          "curves (sdt-fid-sample --guidance-scale)")
    fid_steps: int = flag(250, f"denoising steps, at most {NUM_TRAIN_TIMESTEPS} (sdt-fid-sample --steps)")
    fid_scheduler: str | None = flag(None, "switch the exported DDPM scheduler (sdt-fid-sample --scheduler)",
                                     choices=SCHEDULER_NAMES)
    fid_per_device_batch: int = flag(32, "images per process and pipeline call (sdt-fid-sample --per-device-batch)")
    fid_is_splits: int = flag(10, "Inception Score splits, at most --fid-num-samples (sdt-fid --is-splits)")
    fid_inception_weights: str | None = flag(None, "local Inception weights file (sdt-fid --inception-weights; "
                                                   "default: torch hub's copy, downloaded at start if missing)")


def check_fid_settings(s: FidSettings) -> None:
    """Check the ``--fid-*`` flags without touching data, models or devices.

    Raises:
        ConfigError: naming the flag at fault.
    """
    from ..evaluation.sampling import MAX_NUM_SAMPLES

    if s.fid_every < 0:
        raise ConfigError(f"--fid-every must be >= 0, got {s.fid_every}")
    if not s.fid_every:
        given = [name for name, value in (("--fid-reference", s.fid_reference),
                                          ("--fid-num-samples", s.fid_num_samples)) if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} given without --fid-every: no FID would be computed; pass "
                              f"--fid-every N (steps between evaluations)")
        return
    for name, value in (("--fid-reference", s.fid_reference), ("--fid-num-samples", s.fid_num_samples)):
        if value is None:
            raise ConfigError(f"--fid-every {s.fid_every} needs {name}")
    if not 2 <= s.fid_num_samples <= MAX_NUM_SAMPLES:
        raise ConfigError(f"--fid-num-samples must lie in [2, {MAX_NUM_SAMPLES}] (FID needs a covariance), got "
                          f"{s.fid_num_samples}")
    if not 1 <= s.fid_steps <= NUM_TRAIN_TIMESTEPS:
        raise ConfigError(f"--fid-steps must lie in [1, {NUM_TRAIN_TIMESTEPS}] (the DDPM scheduler's training "
                          f"timesteps), got {s.fid_steps}")
    if not 1 <= s.fid_per_device_batch <= MAX_PER_DEVICE_BATCH:
        raise ConfigError(f"--fid-per-device-batch must lie in [1, {MAX_PER_DEVICE_BATCH}], got "
                          f"{s.fid_per_device_batch}")
    if not 1 <= s.fid_is_splits <= s.fid_num_samples:
        raise ConfigError(f"--fid-is-splits must lie in [1, --fid-num-samples {s.fid_num_samples}], got "
                          f"{s.fid_is_splits}")
    if not (math.isfinite(s.fid_guidance_scale) and s.fid_guidance_scale >= 1.0):
        raise ConfigError(f"--fid-guidance-scale must be finite and >= 1 (1: no guidance), got {s.fid_guidance_scale}")
    if s.fid_inception_weights is not None and not Path(s.fid_inception_weights).is_file():
        raise ConfigError(f"--fid-inception-weights {s.fid_inception_weights}: no such file")
    if not Path(s.fid_reference).exists():
        raise ConfigError(f"--fid-reference {s.fid_reference}: no such file or folder")


def fid_due(step: int, final: bool, every: int) -> bool:
    """Whether an evaluation is due after optimizer step ``step``: every ``every`` steps and at the last one,
    never at step 0 nor with ``every == 0``."""
    return every > 0 and step > 0 and (final or step % every == 0)


def scored_steps(metrics_file: Path) -> set[int]:
    """The steps ``metrics.jsonl`` holds an FID row for (lines a crash cut short are ignored)."""
    steps = set()
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "fid" in record and isinstance(record.get("step"), int):
                steps.add(record["step"])
    return steps


class TrainingFid:
    """The evaluations of one run: the opened reference, the metrics it serves and the Inception network (main
    process), and the steps already scored."""

    def __init__(self, settings: FidSettings, seed: int, metrics: tuple[str, ...], inception: Any | None) -> None:
        self.settings = settings
        self.seed = seed  # the run's --seed: the same labels and noise at every evaluation
        self.metrics = metrics
        self.inception = inception
        self.done: set[int] = set()

    @classmethod
    def prepare(cls, settings: FidSettings, seed: int, image_side: int, main: bool) -> TrainingFid | None:
        """Open ``--fid-reference`` with ``sdt-fid``'s reader, check its image size against the run's
        (``image_side``), choose the metrics it serves and load the Inception weights (kept on the main process);
        ``None`` without ``--fid-every``.  Every process calls it, so a bad input stops them all alike.

        Raises:
            ConfigError: naming ``--fid-reference`` or ``--fid-inception-weights``, or the missing ``eval`` extra.
        """
        if not settings.fid_every:
            return None
        try:
            from ..evaluation.images import EvaluationInputError
            from ..evaluation.inception import load_inception
            from ..evaluation.reference import open_reference
        except ImportError as e:
            raise ConfigError(f"--fid-every needs the metrics: {e}") from None
        try:
            ref = open_reference(settings.fid_reference)
            count = ref.images.count if ref.images is not None else 0
        except EvaluationInputError as e:
            raise ConfigError(f"--fid-reference {settings.fid_reference}: {e}") from None
        if not ref.has_pool_stats and count < 2:
            raise ConfigError(f"--fid-reference {settings.fid_reference}: FID needs 'mu'/'sigma' statistics or at "
                              f"least 2 reference images, got {count} images")
        if ref.images is not None and (ref.images.height, ref.images.width) != (image_side, image_side):
            raise ConfigError(f"--fid-reference {settings.fid_reference} holds {ref.images.height}×{ref.images.width} "
                              f"images and the run makes {image_side}×{image_side} ones (--resolution); FID against a "
                              f"reference of another resolution compares nothing")
        metrics = ["fid", "sfid", "is"]
        if count > PR_K and settings.fid_num_samples > PR_K:  # sdt-fid's precision/recall needs k + 1 of each
            metrics.append("pr")
        try:
            inception = load_inception(settings.fid_inception_weights, "cpu")
        except (EvaluationInputError, RuntimeError) as e:  # torch's own message runs over several lines
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--fid-inception-weights: {first}") from None
        return cls(settings, seed, tuple(metrics), inception if main else None)

    def start(self, run: Any) -> None:
        """The steps ``metrics.jsonl`` already scores, learnt by every process; a fresh ``--overwrite`` run first
        deletes an earlier run's ``fid/`` folder."""
        from accelerate.utils import broadcast_object_list

        steps: list[Any] = [None]
        if run.is_main:
            if run.plan.resume_from is None and (run.out / FID_DIR).is_dir():
                shutil.rmtree(run.out / FID_DIR)
            steps = [sorted(scored_steps(run.out / METRICS_FILE))]
        if run.accelerator.num_processes > 1:
            broadcast_object_list(steps)
        self.done = set(steps[0])

    def evaluate(self, run: Any, step: int) -> None:
        """Export the EMA, sample ``--fid-num-samples`` images on every process, score them on the main process,
        write ``results.json`` and the ``metrics.jsonl`` row (all processes must call it; a step already scored
        is skipped).  The training RNG streams are left untouched."""
        if step in self.done:
            if run.is_main:
                logger.info("step %d: FID already in %s; not evaluated again", step, METRICS_FILE)
            return
        from ..evaluation.sampling import SamplingSettings, SettingsMismatchError
        from ..evaluation.sampling import run as sample

        s, core, accelerator = self.settings, run.core, run.accelerator
        root = run.out / FID_DIR
        folder, pipeline = root / f"step-{step:07d}", root / "pipeline"
        with core.forked_rng():
            transformer = ema_transformer(accelerator, core.model, core.ema)
            if run.is_main:
                export_pipeline(transformer, core.vae, run.plan.data.id2label, pipeline)
                folder.mkdir(parents=True, exist_ok=True)
                if not (folder / "samples.npz.shards").is_dir():  # an npz whose chunks were deleted: the sampler
                    (folder / "samples.npz").unlink(missing_ok=True)  # would refuse to replace it
            del transformer
            accelerator.wait_for_everyone()
            sampling = SamplingSettings(pipeline=str(pipeline), output=str(folder / "samples.npz"),
                                        num_samples=s.fid_num_samples, per_device_batch=s.fid_per_device_batch,
                                        guidance_scale=s.fid_guidance_scale, steps=s.fid_steps,
                                        scheduler=s.fid_scheduler, seed=self.seed)
            try:
                samples = sample(sampling)
            except SettingsMismatchError:  # chunks of other weights (a run stopped mid-evaluation, then rolled back)
                accelerator.wait_for_everyone()
                if run.is_main:
                    shutil.rmtree(folder / "samples.npz.shards")
                    (folder / "samples.npz").unlink(missing_ok=True)
                accelerator.wait_for_everyone()
                samples = sample(sampling)
            if run.is_main:
                self._score(run, step, folder, samples)
        accelerator.wait_for_everyone()
        self.done.add(step)

    def _score(self, run: Any, step: int, folder: Path, samples: Path) -> None:
        """The main process's part: the metrics, ``results.json``, the clean-up, then the row."""
        from ..evaluation.evaluate import compute_metrics

        s = self.settings
        self.inception.to(run.core.device)
        try:
            result = compute_metrics(samples, s.fid_reference, model=self.inception, metrics=self.metrics,
                                     k=PR_K, is_splits=s.fid_is_splits, progress=False)
        finally:
            self.inception.to("cpu")
        result.update(name=f"{run.out.name} EMA, step {step}", step=step)
        atomic_write_text(folder / "results.json", json.dumps(result, indent=2) + "\n")
        (folder / "samples.npz").unlink(missing_ok=True)  # first: chunks without their npz are resumable
        shutil.rmtree(folder / "samples.npz.shards", ignore_errors=True)
        (folder / "samples.npz.lock").unlink(missing_ok=True)
        shutil.rmtree(run.out / FID_DIR / "pipeline", ignore_errors=True)
        values = {k: result[k] for k in METRIC_KEYS}
        run.metrics.write({"step": step, **values, "fid_num_samples": s.fid_num_samples})
        run.accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if v is not None)
        logger.info("step %d: %s on %d EMA samples (%s)", step, shown, s.fid_num_samples, folder / "results.json")
