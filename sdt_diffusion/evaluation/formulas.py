"""The metric formulas on feature arrays, as OpenAI's guided-diffusion evaluator (ADM) defines them.

- FID / sFID: Fréchet distance between Gaussians fitted to two feature sets, float64, ``scipy.linalg.sqrtm``.
- Inception Score: mean over contiguous splits of exp(E_x KL(p(y|x) || p(y))), no shuffling.
- Improved precision and recall (Kynkäänniemi et al. 2019): k-th nearest-neighbour balls, squared Euclidean
  distances, evaluated in bounded-memory blocks.

Nothing here knows about images or networks.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..utils.optional import import_optional

# The evaluation extra (scipy, torch-fidelity): an ImportError naming the extra when it is missing.
linalg = import_optional("scipy.linalg", "eval")
metric_isc = import_optional("torch_fidelity.metric_isc", "eval")

__all__ = ["feature_statistics", "frechet_distance", "inception_score", "precision_recall"]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased like ``np.cov``) of an N×D feature array."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need an N×D feature array with N >= 2, got shape {features.shape}")
    mu = features.mean(axis=0, dtype=np.float64)
    sigma = np.cov(features, rowvar=False)
    return mu, np.atleast_2d(sigma)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance ||mu1-mu2||² + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians, ADM-style.

    float64 throughout; ``scipy.linalg.sqrtm`` of the product; if that is not finite, ``eps·I`` is added to both
    covariances; a small imaginary part is dropped, a large one (diagonal |imag| > 1e-3) raises ValueError.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances have shapes {sigma1.shape} and {sigma2.shape}; expected {(mu1.shape[0],) * 2}")

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # The product is often (nearly) singular; ADM silences scipy's report (disp=False) and checks finiteness.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(
                f"FID: sqrtm of the covariance product is not finite; adding {eps} to the diagonals", stacklevel=2
            )
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> float:
    """Inception Score: mean over ``splits`` contiguous splits of exp(E_x KL(p(y|x) || p(y))).

    ``logits`` are the bias-free Inception logits (N×1008); no shuffling, float64 (torch-fidelity's routine).
    """
    logits_t = _as_tensor(logits)
    if logits_t.dim() != 2:
        raise ValueError(f"logits must be N×C, got shape {tuple(logits_t.shape)}")
    if splits < 1 or logits_t.shape[0] < splits:
        raise ValueError(f"Inception Score needs at least {splits} samples for {splits} splits, got {logits_t.shape[0]}")
    out = metric_isc.isc_features_to_metric(logits_t.detach().cpu(), splits=splits, shuffle=False)
    return float(out[metric_isc.KEY_METRIC_ISC_MEAN])


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (clamped at 0), as in ADM's distance block."""
    d = a.square().sum(1, keepdim=True) - 2.0 * (a @ b.T) + b.square().sum(1).unsqueeze(0)
    return d.clamp_min_(0.0)


def _kth_neighbour_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance from each row of ``x`` to its k-th nearest other row, in batch_size² blocks."""
    n = x.shape[0]
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, batch_size):
        rows = x[r0 : r0 + batch_size]
        best = torch.full((rows.shape[0], k), float("inf"), dtype=x.dtype, device=x.device)
        for c0 in range(0, n, batch_size):
            d = _squared_distances(rows, x[c0 : c0 + batch_size])
            # exclude each point itself (global row index == global column index)
            lo, hi = max(r0, c0), min(r0 + rows.shape[0], c0 + d.shape[1])
            if lo < hi:
                idx = torch.arange(lo, hi, device=x.device)
                d[idx - r0, idx - c0] = float("inf")
            best = torch.cat([best, d], dim=1).topk(k, dim=1, largest=False).values
        radii[r0 : r0 + rows.shape[0]] = best.max(dim=1).values
    return radii


def precision_recall(
    real_feats: np.ndarray | torch.Tensor,
    fake_feats: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 5000,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.), ADM's definition.

    Each point's ball has squared radius = squared distance to its k-th nearest neighbour in its own set
    (itself excluded). Precision = fraction of fake points inside at least one real ball; recall = fraction of
    real points inside at least one fake ball (``<=``). Distances are float64, computed in blocks of at most
    ``batch_size × batch_size``. Returns ``(precision, recall)``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    real = _as_tensor(real_feats).to(dev, torch.float64)
    fake = _as_tensor(fake_feats).to(dev, torch.float64)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be N×D with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be positive, got k={k}, batch_size={batch_size}")
    for name, feats in (("reference", real), ("sample", fake)):
        if feats.shape[0] < k + 1:
            raise ValueError(f"precision/recall with k={k} needs at least {k + 1} {name} points, got {feats.shape[0]}")

    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=dev)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=dev)
    for f0 in range(0, fake.shape[0], batch_size):
        f_rows = fake[f0 : f0 + batch_size]
        f_rad = fake_radii[f0 : f0 + batch_size]
        for r0 in range(0, real.shape[0], batch_size):
            d = _squared_distances(f_rows, real[r0 : r0 + batch_size])  # fakes × reals
            fake_in[f0 : f0 + d.shape[0]] |= (d <= real_radii[r0 : r0 + d.shape[1]].unsqueeze(0)).any(dim=1)
            real_in[r0 : r0 + d.shape[1]] |= (d <= f_rad.unsqueeze(1)).any(dim=0)
    return fake_in.double().mean().item(), real_in.double().mean().item()
