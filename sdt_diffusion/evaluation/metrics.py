"""FID-50K evaluation with the ADM evaluator's definitions (FID, sFID, Inception Score, precision, recall).

Features come from torch-fidelity's ``inception-v3-compat`` network, a port of the TensorFlow Inception-V3
graph ("2015-12-05") that OpenAI's guided-diffusion evaluator uses:

- FID: the 2048-d ``pool_3`` features; Fréchet distance of the two Gaussians, computed in float64 with
  ``scipy.linalg.sqrtm`` and ADM's handling of singular or slightly complex products.
- sFID: ``mixed_6/conv`` (``Mixed_6d.branch1x1`` in the port, read with a forward hook), first 7 channels of
  the 17×17 map flattened in (H, W, C) order as TensorFlow does → 7·17·17 = 2023-d.
- Inception Score: softmax of the bias-free logits, 10 contiguous splits, no shuffling.
- Precision/recall (Kynkäänniemi et al.): pool features, k = 3 nearest neighbours excluding the point itself,
  squared Euclidean distances, evaluated in bounded-memory blocks.

A reference ``.npz`` with ``mu``/``sigma``/``mu_s``/``sigma_s`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``)
supplies the FID/sFID statistics, its ``arr_0`` images the reference set for precision/recall, exactly as ADM.
Reference features are cached on disk (npz, no pickle) keyed by the file content and the Inception weights.

The command-line entry point is :func:`evaluate_main` (``python eval/evaluate.py SAMPLES REFERENCE``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_METRICS",
    "EvaluationInputError",
    "FolderImages",
    "ImageSource",
    "InceptionFeatures",
    "NpzImages",
    "PAPER_RESULTS",
    "Reference",
    "ArrayImages",
    "compute_metrics",
    "evaluate_main",
    "extract_features",
    "feature_statistics",
    "format_markdown_table",
    "frechet_distance",
    "inception_score",
    "load_inception",
    "open_images",
    "open_reference",
    "precision_recall",
    "reference_features",
]

POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2023
NUM_LOGITS = 1008
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
ALL_METRICS = ("fid", "sfid", "is", "pr")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_FORMAT_VERSION = "sdt-diffusion-ref-features-v1"
FEATURE_EXTRACTOR_NAME = "inception-v3-compat"
# Kept in sync with torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (read from there when possible).
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)

# Paper numbers (ImageNet 256×256, FID-50K, Table 2 of the SDT paper). None = not reported.
# Rows: (label, FID, sFID, IS, precision, recall).
PAPER_RESULTS: dict[str, list[tuple[str, float | None, float | None, float | None, float | None, float | None]]] = {
    "S": [("SDT-P-S/2 (paper, 400K)", 60.70, None, None, None, None),
          ("DiT-S/2 (paper, 400K)", 68.40, None, None, None, None)],
    "B": [("SDT-P-B/2 (paper, 400K)", 37.47, None, None, None, None),
          ("DiT-B/2 (paper, 400K)", 43.47, None, None, None, None)],
    "L": [("SDT-P-L/2 (paper, 400K)", 21.28, None, None, None, None),
          ("DiT-L/2 (paper, 400K)", 23.33, None, None, None, None)],
    "XL": [("SDT-P-XL/2 (paper, 400K)", 18.20, None, None, None, None),
           ("DiT-XL/2 (paper, 400K)", 19.47, None, None, None, None),
           ("SDT-P-XL/2 (paper, 800K, batch 512)", 6.82, None, None, None, None)],
    "XL-G": [("SDT-P-XL/2-G (paper)", 2.25, 4.59, 279.85, 0.83, 0.58),
             ("DiT-XL/2-G (paper)", 2.27, 4.60, 278.24, 0.83, 0.57)],
}


class EvaluationInputError(ValueError):
    """An input file (samples, reference, weights) is missing or malformed; the message names the file."""


class MissingInputError(EvaluationInputError, FileNotFoundError):
    """An input path does not exist (both a ValueError and a FileNotFoundError)."""


# ----------------------------------------------------------------------------------------------------------
# Metric formulas
# ----------------------------------------------------------------------------------------------------------


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
    from scipy import linalg

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
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    logits_t = torch.as_tensor(np.asarray(logits)) if not torch.is_tensor(logits) else logits
    if logits_t.dim() != 2:
        raise ValueError(f"logits must be N×C, got shape {tuple(logits_t.shape)}")
    if splits < 1 or logits_t.shape[0] < splits:
        raise ValueError(f"Inception Score needs at least {splits} samples for {splits} splits, got {logits_t.shape[0]}")
    out = isc_features_to_metric(logits_t.detach().cpu(), splits=splits, shuffle=False)
    return float(out[KEY_METRIC_ISC_MEAN])


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
    real = torch.as_tensor(np.asarray(real_feats) if not torch.is_tensor(real_feats) else real_feats)
    fake = torch.as_tensor(np.asarray(fake_feats) if not torch.is_tensor(fake_feats) else fake_feats)
    real, fake = real.to(dev, torch.float64), fake.to(dev, torch.float64)
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


# ----------------------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------------------


def _check_image_array_shape(
    shape: Sequence[int], dtype: np.dtype, where: str, peek: Any | None = None
) -> None:
    """Raise EvaluationInputError unless ``shape``/``dtype`` describe uint8 N×H×W×3 images.

    ``peek()`` may return a few of the images, to report their value range when the dtype is wrong.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[3] != 3:
        hint = ""
        if len(shape) == 4 and shape[1] == 3:
            hint = " It looks channels-first (N×3×H×W): transpose it with arr.transpose(0, 2, 3, 1)."
        elif len(shape) == 3:
            hint = " A single image or grayscale images? Expected a batch of RGB images."
        raise EvaluationInputError(f"{where}: expected uint8 images of layout N×H×W×3, got shape {shape}.{hint}")
    if dtype != np.uint8:
        seen = ""
        if peek is not None and (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            with contextlib.suppress(Exception):
                sample = np.asarray(peek())
                seen = f" with values in [{sample.min():.4g}, {sample.max():.4g}] (first {len(sample)} images)"
        raise EvaluationInputError(
            f"{where}: expected dtype uint8 (values 0..255), got {dtype}{seen}. Convert model outputs x in "
            "[-1, 1] with np.clip(127.5 * x + 128, 0, 255).astype(np.uint8)."
        )
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise EvaluationInputError(f"{where}: contains no images (shape {shape})")


class ImageSource:
    """A sequence of equally sized uint8 RGB images read in batches of N×H×W×3 numpy arrays."""

    label: str
    count: int
    height: int
    width: int

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray]:
        """Yield uint8 N×H×W×3 arrays of at most ``batch_size`` images, in a fixed order."""
        raise NotImplementedError

    def content_hash(self) -> str:
        """sha256 hex digest of the images' content (used as a cache key)."""
        raise NotImplementedError


def _read_npy_header(fp: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """Parse an .npy header from ``fp``; None for format versions numpy has no public reader for."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    return None


def _sha256_file(path: Path, h: Any | None = None) -> Any:
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h


class NpzImages(ImageSource):
    """Images stored ADM-style as ``arr_0`` (uint8 N×H×W×3) in an ``.npz``; streamed, never fully loaded."""

    def __init__(self, path: str | Path, key: str = "arr_0") -> None:
        self.path = Path(path)
        self.key = key
        self.label = str(self.path)
        member = f"{key}.npy"
        try:
            with zipfile.ZipFile(self.path) as zf:
                if member not in zf.namelist():
                    raise EvaluationInputError(
                        f"{self.path}: no '{key}' array in the npz (found {sorted(n[:-4] for n in zf.namelist())})"
                    )
                with zf.open(member) as fp:
                    header = _read_npy_header(fp)
        except zipfile.BadZipFile as e:
            raise EvaluationInputError(f"{self.path}: not a valid .npz file ({e})") from e
        if header is None:  # unusual npy version: fall back to numpy's reader
            with np.load(self.path, allow_pickle=False) as npz:
                arr = npz[key]
            header = (arr.shape, False, arr.dtype)
        shape, self._fortran, dtype = header
        _check_image_array_shape(shape, dtype, f"{self.path} ['{key}']", peek=self._peek)
        self.count, self.height, self.width = int(shape[0]), int(shape[1]), int(shape[2])

    def _peek(self, n: int = 8) -> np.ndarray:
        """The first ``n`` entries of the array, whatever their dtype (for error messages)."""
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as fp:
            shape, fortran, dtype = _read_npy_header(fp)
            if fortran:
                raise ValueError("Fortran order")
            count = min(n, shape[0])
            size = count * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            return np.frombuffer(fp.read(size), dtype=dtype).reshape(count, *shape[1:])

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray]:
        if self._fortran:  # rare: Fortran-ordered arrays cannot be streamed row by row
            with np.load(self.path, allow_pickle=False) as npz:
                arr = np.ascontiguousarray(npz[self.key])
            for i in range(0, self.count, batch_size):
                yield arr[i : i + batch_size]
            return
        image_bytes = self.height * self.width * 3
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as fp:
            _read_npy_header(fp)
            for i in range(0, self.count, batch_size):
                n = min(batch_size, self.count - i)
                batch = np.empty((n, self.height, self.width, 3), dtype=np.uint8)
                view, filled = memoryview(batch).cast("B"), 0
                while filled < n * image_bytes:
                    got = fp.readinto(view[filled:])
                    if not got:
                        raise EvaluationInputError(
                            f"{self.path}: '{self.key}' is truncated (ends inside image {i + filled // image_bytes})"
                        )
                    filled += got
                yield batch

    def content_hash(self) -> str:
        return _sha256_file(self.path).hexdigest()


class ArrayImages(ImageSource):
    """In-memory uint8 N×H×W×3 images (e.g. straight from a sampler)."""

    def __init__(self, images: np.ndarray, label: str = "<array>") -> None:
        images = np.asarray(images)
        _check_image_array_shape(images.shape, images.dtype, label, peek=lambda: images[:8])
        self.images = images
        self.label = label
        self.count, self.height, self.width = images.shape[:3]

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray]:
        for i in range(0, self.count, batch_size):
            yield np.ascontiguousarray(self.images[i : i + batch_size])

    def content_hash(self) -> str:
        h = hashlib.sha256(repr(self.images.shape).encode())
        for batch in self.batches(1024):
            h.update(batch.tobytes())
        return h.hexdigest()


_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"}


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: tuple[int, int]) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.files[i]
        with Image.open(path) as im:
            if im.size != self.size:
                raise EvaluationInputError(f"{path}: image size {im.size} differs from the folder's {self.size}")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)


class FolderImages(ImageSource):
    """All ``.png``/``.jpg``/``.jpeg`` files below a folder (recursive, sorted by relative path); one size."""

    def __init__(self, path: str | Path) -> None:
        from PIL import Image, UnidentifiedImageError

        self.path = Path(path)
        self.label = str(self.path)
        self.files = sorted(
            (p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.relative_to(self.path).as_posix(),
        )
        if not self.files:
            raise EvaluationInputError(f"{self.path}: no {'/'.join(IMAGE_EXTENSIONS)} images found (searched recursively)")
        size: tuple[int, int] | None = None
        for f in self.files:  # headers only: cheap, and fails before any compute is spent
            try:
                with Image.open(f) as im:
                    mode, this = im.mode, im.size
            except (UnidentifiedImageError, OSError) as e:
                raise EvaluationInputError(f"{f}: cannot read image ({e})") from e
            if mode not in _EIGHT_BIT_MODES:
                raise EvaluationInputError(f"{f}: image mode {mode!r} is not 8-bit; expected 8-bit RGB (uint8) images")
            if size is None:
                size, first = this, f
            elif this != size:
                raise EvaluationInputError(
                    f"{f}: image size {this[0]}×{this[1]} differs from {size[0]}×{size[1]} of {first}; "
                    "all images in a folder must have the same size"
                )
        assert size is not None
        self.size = size
        self.count, self.width, self.height = len(self.files), size[0], size[1]

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray]:
        dataset = _FolderDataset(self.files, self.size)
        if num_workers <= 0:
            for i in range(0, self.count, batch_size):
                yield np.stack([dataset[j] for j in range(i, min(i + batch_size, self.count))])
            return
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=np.stack
        )
        yield from loader

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            rel = f.relative_to(self.path).as_posix().encode()
            h.update(len(rel).to_bytes(8, "little") + rel + f.stat().st_size.to_bytes(8, "little"))
            _sha256_file(f, h)
        return h.hexdigest()


def open_images(source: str | Path | np.ndarray | ImageSource, role: str = "images") -> ImageSource:
    """Open an ADM ``.npz`` (``arr_0``), an image folder, or an in-memory uint8 N×H×W×3 array."""
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, np.ndarray):
        return ArrayImages(source, label=f"<{role} array>")
    path = Path(source).expanduser()
    if not path.exists():
        raise MissingInputError(f"{path}: {role} file or folder does not exist")
    if path.is_dir():
        return FolderImages(path)
    if path.suffix.lower() == ".npz":
        return NpzImages(path)
    raise EvaluationInputError(f"{path}: unsupported {role} input; expected an ADM-style .npz (arr_0) or an image folder")


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
            except (zipfile.BadZipFile, ValueError, OSError) as e:
                raise EvaluationInputError(f"{path}: cannot read the reference npz ({e})") from e
            _check_stats(stats, str(path))
            images = NpzImages(path) if "arr_0" in names else None
            if images is None and not stats:
                raise EvaluationInputError(f"{path}: reference npz has neither 'arr_0' images nor 'mu'/'sigma' statistics")
            return Reference(label=str(path), images=images, stats=stats)
    images = open_images(source, role="reference")
    return Reference(label=images.label, images=images)


# ----------------------------------------------------------------------------------------------------------
# Inception feature extractor
# ----------------------------------------------------------------------------------------------------------


def _state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_state_dict(weights_path: str | Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """Load Inception weights safely (``weights_only=True``); returns (state_dict, description)."""
    if weights_path is None:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url
        except ImportError:  # pragma: no cover - very old or very new torch-fidelity
            url = INCEPTION_WEIGHTS_URL
        try:
            # Same URL and torch-hub cache file that torch-fidelity uses; hash-checked, loaded without pickle code.
            sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                    weights_only=True)
        except Exception as e:
            raise RuntimeError(
                f"could not fetch the Inception weights from {url} ({e}); download the file elsewhere and pass "
                "--inception-weights PATH (or place it in the torch hub checkpoints folder)"
            ) from e
        return sd, url
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"{path}: Inception weights file does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvaluationInputError(f"{path}: cannot load as a tensors-only PyTorch state dict ({e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EvaluationInputError(f"{path}: expected a state dict of tensors for torch-fidelity's {FEATURE_EXTRACTOR_NAME}")
    return sd, str(path)


class InceptionFeatures(nn.Module):
    """torch-fidelity's ``inception-v3-compat`` plus a hook on ``Mixed_6d.branch1x1`` for sFID features.

    ``forward(images)`` takes uint8 N×3×H×W (any H, W: the network resizes to 299×299 like TF1 bilinear) and
    returns float32 ``{"pool": N×2048, "spatial": N×2023, "logits": N×1008}`` (logits without the fc bias).
    """

    def __init__(self, net: nn.Module, weights_id: str, weights_source: str) -> None:
        super().__init__()
        self.net = net
        self.weights_id = weights_id
        self.weights_source = weights_source
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._spatial = output

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 N×3×H×W images, got {images.dtype} {tuple(images.shape)}")
        self._spatial = None
        pool, logits = self.net(images)
        spatial = self._spatial
        self._spatial = None
        assert spatial is not None and spatial.shape[1:] == (192, SPATIAL_SIZE, SPATIAL_SIZE), "sFID hook did not fire"
        # TF's mixed_6/conv is NHWC: keep channels 0..6 and flatten (H, W, C) like ADM's reshape.
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


def load_inception(weights_path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Build the Inception feature extractor on ``device``.

    ``weights_path``: a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (loaded with
    ``weights_only=True``); None downloads it (hash-checked) into the torch hub cache, where torch-fidelity keeps it.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state_dict, source = _load_state_dict(weights_path)
    weights_id = _state_dict_digest(state_dict)
    # torch-fidelity unpickles `feature_extractor_weights_path` with weights_only=False, so hand it an in-memory
    # copy of the tensors we already loaded safely instead of the user's file.
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    try:
        net = FeatureExtractorInceptionV3(FEATURE_EXTRACTOR_NAME, ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=buffer)
    except RuntimeError as e:
        raise EvaluationInputError(f"{source}: not weights for torch-fidelity's {FEATURE_EXTRACTOR_NAME} ({e})") from e
    del buffer, state_dict
    return InceptionFeatures(net, weights_id, source).to(device).eval()


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Disable TF32 for cuDNN convolutions and CUDA matmuls (torch defaults cuDNN convs to TF32)."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9 API; never mix with the legacy flags
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def extract_features(
    images_iter: Iterable[np.ndarray | torch.Tensor],
    model: InceptionFeatures,
    *,
    total: int | None = None,
    desc: str = "Inception features",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run ``model`` over batches of uint8 images; returns float32 arrays ``pool``, ``spatial``, ``logits``.

    numpy batches are N×H×W×3 (ADM layout), torch batches N×3×H×W. Runs on ``model``'s device.
    """
    from tqdm.auto import tqdm

    device = model.device
    out: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    with torch.inference_mode(), _ieee_fp32(device), tqdm(
        total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        for batch in images_iter:
            if isinstance(batch, np.ndarray):
                _check_image_array_shape(batch.shape, batch.dtype, desc)
                x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
            else:
                x = batch
            feats = model(x.to(device, non_blocking=True))
            for key in out:
                out[key].append(feats[key].cpu().numpy())
            bar.update(x.shape[0])
    if not out["pool"]:
        raise ValueError(f"{desc}: no images")
    return {key: np.concatenate(val, axis=0) for key, val in out.items()}


# ----------------------------------------------------------------------------------------------------------
# Reference features with an on-disk cache
# ----------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sdt_diffusion/features`` (``~/.cache/sdt_diffusion/features``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdt_diffusion" / "features"


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
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{CACHE_FORMAT_VERSION}|{images.content_hash()}|{model.weights_id}".encode()).hexdigest()
        path = Path(cache_dir).expanduser() / f"ref-{key[:40]}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as npz:
                    cached = {k: npz[k] for k in ("pool", *STAT_KEYS)}
                    stored_key = str(npz["key"])
                if stored_key == key and cached["pool"].shape == (images.count, POOL_DIM):
                    logger.info("reference features for %s loaded from cache %s", images.label, path)
                    return cached
                logger.warning("ignoring stale reference cache %s", path)
            except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
                logger.warning("ignoring unreadable reference cache %s (%s)", path, e)

    feats = extract_features(images.batches(batch_size, num_workers), model, total=images.count,
                             desc="Inception features (reference)", progress=progress)
    mu, sigma = feature_statistics(feats["pool"])
    mu_s, sigma_s = feature_statistics(feats["spatial"])
    result = {"pool": feats["pool"], "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), source=np.array(images.label), weights=np.array(model.weights_source),
                     **result)
        os.replace(tmp, path)
        logger.info("cached reference features in %s", path)
    return result


# ----------------------------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def compute_metrics(
    samples: str | Path | np.ndarray | ImageSource,
    reference: str | Path | np.ndarray | ImageSource | Reference,
    *,
    inception_weights: str | Path | None = None,
    model: InceptionFeatures | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    metrics: Sequence[str] = ALL_METRICS,
    k: int = 3,
    is_splits: int = 10,
    pr_batch_size: int = 5000,
    progress: bool = True,
) -> dict[str, Any]:
    """FID, sFID, Inception Score, precision and recall of ``samples`` against ``reference`` (ADM definitions).

    ``samples``: ADM ``.npz`` (``arr_0``), image folder or uint8 N×H×W×3 array. ``reference``: the same, or an
    ADM reference ``.npz`` whose ``mu``/``sigma``/``mu_s``/``sigma_s`` are used for FID/sFID and whose ``arr_0``
    images serve precision/recall. Metrics that cannot be computed (or are not in ``metrics``) are None, with
    the reason in ``result["warnings"]``. Bad inputs raise :class:`EvaluationInputError` before any compute.
    """
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    wanted = set(metrics)
    src = open_images(samples, role="samples")
    ref = reference if isinstance(reference, Reference) else open_reference(reference)
    notes: list[str] = []

    def note(msg: str) -> None:
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)

    # ---- decide what is computable, and validate counts before spending any compute
    if "pr" in wanted and ref.images is None:
        note(f"{ref.label}: reference has statistics but no 'arr_0' images; precision/recall skipped (null)")
        wanted.discard("pr")
    if "sfid" in wanted and not ref.has_spatial_stats and ref.images is None:
        note(f"{ref.label}: reference has no 'mu_s'/'sigma_s' and no images; sFID skipped (null)")
        wanted.discard("sfid")
    if "fid" in wanted and not ref.has_pool_stats and ref.images is None:
        note(f"{ref.label}: reference has no 'mu'/'sigma' and no images; FID skipped (null)")
        wanted.discard("fid")
    if "pr" in wanted:
        for what, count, label in (("samples", src.count, src.label), ("reference images", ref.images.count, ref.label)):
            if count < k + 1:
                raise EvaluationInputError(f"{label}: precision/recall with k={k} needs at least {k + 1} {what}, got {count}")
    if "is" in wanted and src.count < is_splits:
        raise EvaluationInputError(f"{src.label}: Inception Score with {is_splits} splits needs at least {is_splits} samples, got {src.count}")
    if ({"fid", "sfid"} & wanted) and src.count < 2:
        raise EvaluationInputError(f"{src.label}: FID needs at least 2 samples, got {src.count}")
    need_ref_images = ref.images is not None and (
        "pr" in wanted or ("fid" in wanted and not ref.has_pool_stats) or ("sfid" in wanted and not ref.has_spatial_stats)
    )
    if need_ref_images and ref.images.count < 2:
        raise EvaluationInputError(f"{ref.label}: need at least 2 reference images, got {ref.images.count}")

    dev = _resolve_device(device) if model is None else model.device
    if model is None:
        model = load_inception(inception_weights, dev)

    ref_feats: dict[str, np.ndarray] = {}
    if need_ref_images:
        ref_feats = reference_features(ref.images, model, cache_dir=(cache_dir or default_cache_dir()) if use_cache else None,
                                       batch_size=batch_size, num_workers=num_workers, progress=progress)
    sample_feats = extract_features(src.batches(batch_size, num_workers), model, total=src.count,
                                    desc="Inception features (samples)", progress=progress)

    result: dict[str, Any] = dict.fromkeys(("fid", "sfid", "inception_score", "precision", "recall"))
    ref_stats = {**ref_feats, **ref.stats}  # stored ADM statistics take precedence over recomputed ones
    if "fid" in wanted:
        mu, sigma = feature_statistics(sample_feats["pool"])
        result["fid"] = frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"])
    if "sfid" in wanted:
        mu_s, sigma_s = feature_statistics(sample_feats["spatial"])
        result["sfid"] = frechet_distance(mu_s, sigma_s, ref_stats["mu_s"], ref_stats["sigma_s"])
    if "is" in wanted:
        result["inception_score"] = inception_score(sample_feats["logits"], splits=is_splits)
    if "pr" in wanted:
        result["precision"], result["recall"] = precision_recall(ref_feats["pool"], sample_feats["pool"], k=k,
                                                                 batch_size=pr_batch_size, device=dev)

    import torch_fidelity

    result.update(
        samples=src.label,
        reference=ref.label,
        num_samples=src.count,
        num_reference_images=ref.images.count if ref.images is not None else None,
        sample_resolution=[src.height, src.width],
        reference_resolution=[ref.images.height, ref.images.width] if ref.images is not None else None,
        reference_statistics={
            "fid": ("npz" if ref.has_pool_stats else "computed") if "fid" in wanted else None,
            "sfid": ("npz" if ref.has_spatial_stats else "computed") if "sfid" in wanted else None,
        },
        settings={
            "metrics": [m for m in ALL_METRICS if m in wanted],
            "feature_extractor": f"torch-fidelity {FEATURE_EXTRACTOR_NAME}",
            "inception_weights": model.weights_source,
            "inception_weights_sha256": model.weights_id,
            "fid_features": "pool_3 (2048)",
            "sfid_features": "Mixed_6d.branch1x1 (mixed_6/conv), channels 0-6, 17x17 -> 2023",
            "is_splits": is_splits,
            "pr_k": k,
            "pr_distance": "squared euclidean, float64",
            "batch_size": batch_size,
            "device": str(dev),
            "torch": torch.__version__,
            "torch_fidelity": getattr(torch_fidelity, "__version__", "unknown"),
        },
        warnings=notes,
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# Reporting and command line
# ----------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_markdown_table(result: dict[str, Any], name: str, compare: str | None = None) -> str:
    """A Markdown table ``| model | FID | sFID | IS | Prec | Rec |`` with our row and, optionally, the paper's."""
    rows = [(name, result.get("fid"), result.get("sfid"), result.get("inception_score"),
             result.get("precision"), result.get("recall"))]
    if compare is not None:
        if compare not in PAPER_RESULTS:
            raise ValueError(f"unknown --compare {compare!r}; choose from {sorted(PAPER_RESULTS)}")
        rows += PAPER_RESULTS[compare]
    lines = ["| model | FID | sFID | IS | Prec | Rec |", "|---|---|---|---|---|---|"]
    for label, fid, sfid, isc, prec, rec in rows:
        lines.append(f"| {label} | {_fmt(fid)} | {_fmt(sfid)} | {_fmt(isc)} | {_fmt(prec)} | {_fmt(rec)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``eval/evaluate.py``."""
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="FID / sFID / Inception Score / precision / recall with the ADM evaluator's definitions "
        "(torch-fidelity inception-v3-compat features).",
    )
    p.add_argument("samples", help="samples: ADM-style .npz (arr_0 uint8 N×H×W×3) or a folder of png/jpg images")
    p.add_argument("reference", help="reference: ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz), "
                   "an .npz with arr_0, or an image folder")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON to this path")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="local weights-inception-2015-12-05-6726825d.pth (default: download via torch hub)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default 64)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"reference feature cache (default {default_cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the reference feature cache")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding workers for folders (default min(4, CPUs))")
    p.add_argument("--compare", choices=sorted(PAPER_RESULTS), default=None,
                   help="print the SDT paper's Table 2 numbers for this size next to ours")
    p.add_argument("--name", default=None, help="model name for the table row (default: samples file name)")
    p.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall (default 3)")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10, as ADM for 50K)")
    p.add_argument("--pr-batch-size", type=int, default=5000, help="block size of the distance computations")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    return p


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: compute the metrics, optionally write JSON, print a Markdown table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if min(args.batch_size, args.k, args.pr_batch_size, args.is_splits) < 1 or args.num_workers < 0:
        parser.error("--batch-size, --k, --is-splits and --pr-batch-size must be positive, --num-workers >= 0")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics or set(metrics) - set(ALL_METRICS):
        parser.error(f"--metrics must be a comma-separated subset of {','.join(ALL_METRICS)}")
    try:
        result = compute_metrics(
            args.samples, args.reference, inception_weights=args.inception_weights, device=args.device,
            batch_size=args.batch_size, num_workers=args.num_workers, cache_dir=args.cache_dir,
            use_cache=not args.no_cache, metrics=metrics, k=args.k, is_splits=args.is_splits, pr_batch_size=args.pr_batch_size,
            progress=not args.quiet,
        )
    except EvaluationInputError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    name = args.name or Path(args.samples).name
    result["name"] = name
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        logger.info("wrote %s", args.output)
    print(format_markdown_table(result, name, args.compare))
    return 0
