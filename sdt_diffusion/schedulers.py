"""The noise schedule and the samplers, defined once for training, pipelines, sampling and the CLIs.

DiT's diffusion process (Peebles & Xie 2023, following ADM): 1000 linear β steps from 1e-4 to 0.02,
ε-prediction, no clipping; the variance is learned (``"learned_range"``) when the model predicts it and
``"fixed_large"`` otherwise.  The trainer builds its loss tables from :func:`default_scheduler` and exports
the same config with the pipeline, so training and sampling always share the β values.
"""

from __future__ import annotations

from typing import Any

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

__all__ = ["LEARNED_VARIANCE", "NUM_TRAIN_TIMESTEPS", "SCHEDULER_NAMES", "default_scheduler", "make_scheduler"]

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULER_NAMES = ("ddpm", "ddim", "dpm")
LEARNED_VARIANCE = ("learned", "learned_range")


def default_scheduler(learn_sigma: bool = True) -> DDPMScheduler:
    """DiT's sampler: DDPM, 1000 linear steps β 1e-4..0.02, no clipping, ε-prediction.

    ``variance_type`` is ``"learned_range"`` for a model that predicts its variance and ``"fixed_large"``
    (DiT's choice without learned sigma) otherwise; the β values do not depend on it.
    ``timestep_spacing="linspace"`` picks the same respaced steps as DiT's ``space_timesteps`` (0 and 999
    included), e.g. for its 250-step FID sampler.
    """
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="learned_range" if learn_sigma else "fixed_large",
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="linspace",
    )


def make_scheduler(name: str, config: Any | None = None):
    """A scheduler by short name, built from ``config`` (e.g. ``pipe.scheduler.config``) for the same noise schedule.

    ``"ddpm"``: DDPM keeping the config's variance type (learned range for DiT's sampler); ``"ddim"``: DDIM,
    η = 0, trailing spacing; ``"dpm"``: DPM-Solver++ (2M). Settings that do not fit the target (a learned
    ``variance_type`` for DPM, DDIM's spacing) are overridden.
    """
    config = config if config is not None else default_scheduler().config
    name = name.lower()
    if name == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=False, timestep_spacing="linspace")
    if name == "ddim":
        # DDIM steps to t - T/N, which matches the actual next timestep only for leading/trailing spacing.
        return DDIMScheduler.from_config(config, clip_sample=False, timestep_spacing="trailing")
    if name in ("dpm", "dpm++", "dpmsolver"):
        return DPMSolverMultistepScheduler.from_config(config, variance_type=None, algorithm_type="dpmsolver++",
                                                       solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULER_NAMES}")
