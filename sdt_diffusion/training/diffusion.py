"""DiT's diffusion training objective: ε-prediction with the improved-DDPM hybrid loss.

The noise schedule has one source of truth, a diffusers ``DDPMScheduler`` (1000 linear β steps from 1e-4
to 0.02, learned-range variance, no clipping; :func:`sdt_diffusion.schedulers.default_scheduler`).  The same scheduler config is
exported with the trained pipeline, so training and sampling use the same β values.  Every table the loss
needs is derived from that scheduler's β schedule in float64 (``alphas_cumprod`` = cumulative product of
``1 - β`` in float64, equal to the scheduler's float32 ``alphas_cumprod`` to float32 precision) and gathered
in the computation dtype, as iDDPM/DiT do.

The loss (Nichol & Dhariwal 2021, "hybrid" objective, as used by DiT):

* ``mse``: mean over dimensions of ``(ε - ε_θ(x_t, t))²``;
* ``vb``: the variational-bound term for the learned variance, with the predicted mean detached:
  ``KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t))`` for ``t > 0`` and the discretised Gaussian decoder
  NLL ``-log p_θ(x_0 | x_1)`` for ``t = 0``, both in bits (divided by ``log 2``) and averaged over
  dimensions.  The model variance interpolates in log space between the clipped posterior variance
  ``β̃_t`` (``t = 0`` entry replaced by ``t = 1``'s) and ``β_t``: ``log σ² = f log β_t + (1 - f) log β̃_t``
  with ``f = (v + 1) / 2`` from the model's second output half ``v``;
* ``loss = mse + vb`` per sample.  (iDDPM multiplies ``vb`` by ``num_timesteps / 1000`` only for its
  ``RESCALED_MSE`` loss type; DiT uses plain ``MSE``, and the factor is 1 for 1000 steps anyway.)

Without a learned variance (``learn_sigma=False``) the loss is the plain MSE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from ..schedulers import default_scheduler

__all__ = [
    "DiffusionSchedule",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
    "standard_normal_cdf",
    "training_losses",
    "vlb_terms",
]

def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first (per-sample mean)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats (broadcasting)."""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF used by iDDPM/ADM/DiT (max error ~2e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def standard_normal_cdf(x: Tensor) -> Tensor:
    """The exact standard normal CDF ``Φ(x) = ½ (1 + erf(x / √2))``."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x: Tensor,
    means: Tensor,
    log_scales: Tensor,
    cdf: Callable[[Tensor], Tensor] = approx_standard_normal_cdf,
) -> Tensor:
    """Elementwise log-likelihood (nats) of data in [-1, 1] quantised to 256 bins under ``N(means, e^{2 log_scales})``.

    Each value owns the bin ``[x - 1/255, x + 1/255]``; the lowest bin extends to ``-∞`` (for ``x < -0.999``)
    and the highest to ``+∞`` (for ``x > 0.999``), so the bins cover the real line.  ``cdf`` defaults to the
    tanh approximation DiT uses; pass :func:`standard_normal_cdf` for the exact one.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}")
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_lower = cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))  # lowest bin: log P(X <= x + 1/255)
    log_sf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))  # highest bin: log P(X >= x - 1/255)
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


@dataclass
class DiffusionSchedule:
    """float64 tables of the Gaussian diffusion derived from a diffusers scheduler's ``betas``/``alphas_cumprod``."""

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    log_betas: Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_scheduler(cls, scheduler: DDPMScheduler | None = None) -> DiffusionSchedule:
        """Build the tables from ``scheduler`` (default :func:`sdt_diffusion.schedulers.default_scheduler`)."""
        scheduler = scheduler if scheduler is not None else default_scheduler()
        cfg = scheduler.config
        if cfg.beta_schedule == "linear" and cfg.get("trained_betas") is None:
            # the scheduler's own float32 linspace, recomputed in float64 (= DiT's np.linspace)
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64)
        else:
            betas = scheduler.betas.double().cpu()
        # ᾱ in float64 as iDDPM does: the scheduler's float32 cumprod perturbs 1 - ᾱ_t at small t by up to
        # ~1e-4 relative (e.g. the t=0 posterior-mean coefficient would read 0.9998 instead of 1).
        ac = torch.cumprod(1.0 - betas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # β̃_0 = 0, so its log is replaced by log β̃_1 (iDDPM's "clipped" posterior log-variance).
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        return cls(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac),
            log_betas=betas.log(),
        )

    def gather(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` as ``like``'s dtype on its device, shaped ``(B, 1, 1, ...)`` to broadcast against it."""
        values = table.to(t.device)[t].to(like.dtype)
        return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε``."""
        return (self.gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of ``q(x_{t-1} | x_t, x_0)``."""
        return (self.gather(self.posterior_mean_coef1, t, x_t) * x_start
                + self.gather(self.posterior_mean_coef2, t, x_t) * x_t)

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x̂_0 = x_t / √ᾱ_t - √(1/ᾱ_t - 1) ε̂``."""
        return (self.gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self.gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def learned_range_log_variance(self, var_values: Tensor, t: Tensor) -> Tensor:
        """``f log β_t + (1 - f) log β̃_t`` with ``f = (v + 1) / 2`` (iDDPM's learned range)."""
        min_log = self.gather(self.posterior_log_variance_clipped, t, var_values)
        max_log = self.gather(self.log_betas, t, var_values)
        frac = (var_values + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log


def vlb_terms(
    schedule: DiffusionSchedule,
    x_start: Tensor,
    x_t: Tensor,
    t: Tensor,
    eps_pred: Tensor,
    var_values: Tensor,
    cdf: Callable[[Tensor], Tensor] = approx_standard_normal_cdf,
) -> Tensor:
    """Per-sample variational-bound term in bits per dimension (iDDPM's ``_vb_terms_bpd`` without clipping).

    Args:
        schedule: the diffusion tables.
        x_start, x_t: clean and noised inputs ``(B, C, ...)``.
        t: ``(B,)`` integer timesteps.
        eps_pred: predicted noise (pass it detached for the hybrid loss).
        var_values: the model's variance output ``v`` in ~[-1, 1] (learned range).
        cdf: the normal CDF for the ``t = 0`` decoder term.

    Returns:
        ``(B,)``: ``KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / log 2`` for ``t > 0`` and
        ``-log p(x_0|x_1) / log 2`` (discretised Gaussian) for ``t = 0``, each averaged over dimensions.
    """
    true_mean = schedule.q_posterior_mean(x_start, x_t, t)
    true_log_var = schedule.gather(schedule.posterior_log_variance_clipped, t, x_t)
    model_log_var = schedule.learned_range_log_variance(var_values, t)
    model_mean = schedule.q_posterior_mean(schedule.predict_xstart_from_eps(x_t, t, eps_pred), x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var, cdf)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(
    model_output: Tensor,
    x_start: Tensor,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    schedule: DiffusionSchedule,
    learn_sigma: bool = True,
) -> dict[str, Tensor]:
    """DiT's per-sample loss terms from a model output (computed in float32).

    Args:
        model_output: ``(B, 2C, ...)`` (ε and variance values) when ``learn_sigma``, else ``(B, C, ...)``.
        x_start: clean inputs ``x_0``.
        x_t: noised inputs (``schedule.q_sample(x_start, t, noise)``).
        t: ``(B,)`` timesteps.
        noise: the ε used to make ``x_t`` (the MSE target).
        schedule: the diffusion tables.
        learn_sigma: whether the model predicts its variance.

    Returns:
        ``{"loss", "mse", "vb"}``, each ``(B,)`` (``vb`` is zeros without learned sigma).
    """
    model_output = model_output.float()
    x_start, x_t, noise = x_start.float(), x_t.float(), noise.float()
    channels = x_start.shape[1]
    if learn_sigma:
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"learn_sigma needs {2 * channels} output channels, got {model_output.shape[1]}")
        eps_pred, var_values = model_output.split(channels, dim=1)
        vb = vlb_terms(schedule, x_start, x_t, t, eps_pred.detach(), var_values)
    else:
        if model_output.shape[1] != channels:
            raise ValueError(f"expected {channels} output channels, got {model_output.shape[1]}")
        eps_pred = model_output
        vb = torch.zeros(x_start.shape[0], device=x_start.device)
    mse = mean_flat((noise - eps_pred) ** 2)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
