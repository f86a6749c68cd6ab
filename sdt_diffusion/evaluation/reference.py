"""The reference batch: images and/or precomputed ADM statistics, and its Inception features cached on disk.

ADM's reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) hold ``mu``/``sigma`` (pool features) and
``mu_s``/``sigma_s`` (spatial features) for FID/sFID, and the reference images as ``arr_0`` for
precision/recall. Features computed from reference images are cached as plain ``.npz`` (no pickle), keyed by the
images' content and the Inception weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.files import atomic_write
from .formulas import feature_statistics
from .images import EvaluationInputError, ImageSource, MissingInputError, NpzImages, open_images
from .inception import POOL_DIM, SPATIAL_DIM, InceptionFeatures, extract_features

logger = logging.getLogger(__name__)

__all__ = ["STAT_KEYS", "Reference", "default_cache_dir", "open_reference", "reference_features"]

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_FORMAT_VERSION = "sdt-diffusion-ref-features-v1"


@dataclass
class Reference:
    """A reference set: images (for precision/recall, or statistics) and/or precomputed ADM statistics."""

    label: str
    images: ImageSource | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def has_pool_stats(self) -> bool:
        return "mu" in self.stats and "sigma" in self.stats

    @property
    def has_spatial_stats(self) -> bool:
        return "mu_s" in self.stats and "sigma_s" in self.stats


def _check_stats(stats: dict[str, np.ndarray], where: str) -> None:
    expected = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM,) * 2}
    for key, arr in stats.items():
        if arr.shape != expected[key]:
            raise EvaluationInputError(f"{where}: '{key}' has shape {arr.shape}, expected {expected[key]} (ADM format)")
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise EvaluationInputError(f"{where}: '{key}' must be finite floating-point statistics")
    for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (a in stats) != (b in stats):
            raise EvaluationInputError(f"{where}: has '{a if a in stats else b}' without '{b if a in stats else a}'")


def open_reference(source: str | Path | np.ndarray | ImageSource) -> Reference:
    """Open a reference: an ADM reference ``.npz`` (stats and/or ``arr_0``), an image folder or an array."""
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if not path.exists():
            raise MissingInputError(f"{path}: reference file or folder does not exist")
        if path.is_file() and path.suffix.lower() == ".npz":
            try:
                with np.load(path, allow_pickle=False) as npz:
                    names = set(npz.files)
                    stats = {k: np.asarray(npz[k]) for k in STAT_KEYS if k in names}
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as e:
                raise EvaluationInputError(f"{path}: cannot read the reference npz ({type(e).__name__}: {e})") from e
            _check_stats(stats, str(path))
            images = NpzImages(path) if "arr_0" in names else None
            if images is None and not stats:
                raise EvaluationInputError(f"{path}: reference npz has neither 'arr_0' images nor 'mu'/'sigma' statistics")
            return Reference(label=str(path), images=images, stats=stats)
    images = open_images(source, role="reference")
    return Reference(label=images.label, images=images)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sdt_diffusion/features`` (``~/.cache/sdt_diffusion/features``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdt_diffusion" / "features"


def _cache_key(images: ImageSource, model: InceptionFeatures) -> str:
    """sha256 of the cache format, the images' content and the Inception weights."""
    return hashlib.sha256(f"{CACHE_FORMAT_VERSION}|{images.content_hash()}|{model.weights_id}".encode()).hexdigest()


def _load_cached(path: Path, key: str, count: int) -> dict[str, np.ndarray] | None:
    """The cached features at ``path`` if it holds ``key`` and ``count`` images; None (and a log line) otherwise."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            cached = {k: npz[k] for k in ("pool", *STAT_KEYS)}
            stored_key = str(npz["key"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        logger.warning("ignoring unreadable reference cache %s (%s)", path, e)
        return None
    if stored_key != key or cached["pool"].shape != (count, POOL_DIM):
        logger.warning("ignoring stale reference cache %s", path)
        return None
    return cached


def _save_cache(path: Path, key: str, features: dict[str, np.ndarray], source: str, weights: str) -> None:
    """Write the features as a plain npz, atomically (a reader never sees a half-written cache).  A cache that
    cannot be written costs only a warning: the features just computed are still used."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, key=np.array(key), source=np.array(source),
                                              weights=np.array(weights), **features))
    except OSError as e:
        logger.warning("could not cache the reference features in %s (%s); continuing without the cache", path, e)
        return
    logger.info("cached reference features in %s", path)


def reference_features(
    images: ImageSource,
    model: InceptionFeatures,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Pool features and pool/spatial statistics of reference images, cached on disk.

    Returns ``{"pool": N×2048 float32, "mu", "sigma", "mu_s", "sigma_s"}``. The cache file (plain npz, loaded
    with ``allow_pickle=False``) is keyed by sha256 of the image content and of the Inception weights.
    ``cache_dir=None`` disables caching.
    """
    path = key = None
    if cache_dir is not None:
        key = _cache_key(images, model)
        path = Path(cache_dir).expanduser() / f"ref-{key[:40]}.npz"
        cached = _load_cached(path, key, images.count) if path.is_file() else None
        if cached is not None:
            logger.info("reference features for %s loaded from cache %s", images.label, path)
            return cached

    feats = extract_features(images.batches(batch_size, num_workers), model, total=images.count,
                             desc="Inception features (reference)", progress=progress)
    mu, sigma = feature_statistics(feats["pool"])
    mu_s, sigma_s = feature_statistics(feats["spatial"])
    result = {"pool": feats["pool"], "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if path is not None and key is not None:
        _save_cache(path, key, result, images.label, model.weights_source)
    return result
