"""scikit-learn's handwritten digits as a small, real, offline data set, and an independent judge network.

Used by the CPU demo and by ``benchmarks/ablation.py``:

* data: the 1,797 real 8x8 grey digits shipped inside scikit-learn, a fixed seeded train / held-out split,
  written as image folders (one sub-folder per class) that ``training/train.py`` reads like ImageNet;
* the judge: a one-hidden-layer perceptron trained on the real training digits only (never on generated
  images).  It classifies generated digits (class consistency) and its hidden layer is the feature space
  of a Fréchet distance between generated and held-out digits, a small-scale stand-in for FID (not
  comparable with ImageNet FID numbers).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..evaluation.formulas import feature_statistics, frechet_distance
from ..utils.optional import import_optional

DIGIT_NAMES = [f"digit {k}" for k in range(10)]
NATIVE_RESOLUTION = 8


# ----------------------------------------------------------------------------------------- data
def load_digits_arrays(resolution: int = NATIVE_RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 (N, resolution, resolution) grey images (0..255) and int labels."""
    datasets = import_optional("sklearn.datasets", "demo")
    digits = datasets.load_digits()
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    if resolution != small.shape[-1]:
        small = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC))
                          for im in small])
    return small, digits.target.astype(np.int64)


def split_indices(n: int, heldout_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded train / held-out split of ``n`` items."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - heldout_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> None:
    """An image folder with one sub-folder per class (``digit 0`` ... ``digit 9``), RGB PNGs.

    Written under a name unique to this call and swapped in by renames, so a reader never sees a half-written
    folder and an existing one is replaced only once the new one is complete.
    """
    root = Path(root)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        for name in DIGIT_NAMES:
            (tmp / name).mkdir(parents=True)
        for i, (im, y) in enumerate(zip(images, labels)):
            Image.fromarray(im).convert("RGB").save(tmp / DIGIT_NAMES[y] / f"{i:04d}.png")
        old = root.with_name(f".{root.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
        if root.exists():
            root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _preparing(data_root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``data_root`` while its folders are checked and written: two scripts preparing
    the same ``--data-root`` at once (e.g. two ablations started side by side) wait for each other instead of
    deleting each other's half-written files."""
    import fcntl

    data_root.mkdir(parents=True, exist_ok=True)
    with open(data_root / ".prepare.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_stamp(stamp: Path, info: dict) -> None:
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(stamp)


@dataclass
class DigitData:
    """The split as image folders and arrays."""

    train_dir: Path
    heldout_dir: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    heldout_images: np.ndarray
    heldout_labels: np.ndarray


def prepare_digits(data_root: Path, resolution: int = NATIVE_RESOLUTION, seed: int = 0) -> DigitData:
    """Write the train and held-out image folders (again only if missing or different) and return the arrays."""
    images, labels = load_digits_arrays(resolution)
    train, held = split_indices(len(images), 0.2, seed)
    train_dir, held_dir = data_root / "train", data_root / "heldout"
    stamp = data_root / "split.json"
    info = {"resolution": resolution, "seed": seed, "train": len(train), "heldout": len(held)}
    with _preparing(Path(data_root)):
        if not stamp.exists() or json.loads(stamp.read_text()) != info:
            write_image_folder(images[train], labels[train], train_dir)
            write_image_folder(images[held], labels[held], held_dir)
            _write_stamp(stamp, info)
    return DigitData(train_dir, held_dir, images[train], labels[train], images[held], labels[held])


def per_class_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of the first ``per_class`` items of each class after a seeded shuffle (sorted).

    Raises:
        ValueError: ``per_class`` below 1 or above the smallest class.
    """
    counts = np.bincount(labels)
    if per_class < 1 or per_class > counts.min():
        raise ValueError(f"images per class must be between 1 and {counts.min()} (the smallest class of the "
                         f"{len(labels)} training images), got {per_class}")
    order = np.random.default_rng(seed).permutation(len(labels))
    return np.sort(np.concatenate([order[labels[order] == k][:per_class] for k in range(len(counts))]))


def digits_train_subset(data: DigitData, data_root: Path, per_class: int, seed: int = 0) -> Path:
    """A training folder ``<data_root>/train_<per_class>_per_class`` with the first ``per_class`` training images of
    each class after a shuffle seeded by ``seed`` (the same images whatever the training seed); written again only
    if missing or different.  The held-out folder of ``data`` is not touched.

    Raises:
        ValueError: ``per_class`` below 1 or above the smallest class.
    """
    keep = per_class_subset(data.train_labels, per_class, seed)
    folder = data_root / f"train_{per_class}_per_class"
    stamp = data_root / f"train_{per_class}_per_class.json"
    images, labels = data.train_images[keep], data.train_labels[keep]
    content = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    info = {"resolution": int(images.shape[-1]), "per_class": per_class, "seed": seed, "sha256": content}
    with _preparing(Path(data_root)):
        if not stamp.exists() or json.loads(stamp.read_text()) != info:
            write_image_folder(images, labels, folder)
            _write_stamp(stamp, info)
    return folder


# ----------------------------------------------------------------------------------------- judge
def grey_pixels(images: np.ndarray) -> np.ndarray:
    """Grey pixels in [0, 1], flattened; accepts (N, H, W) uint8/float or (N, H, W, 3).

    The pixels are deliberately not standardised: border pixels are almost always black in the real
    digits, so per-pixel standardisation multiplies any faint ink there by ~100 and sends nearly every
    imperfect digit to one class.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = x.mean(-1)
    if x.max() > 1.5:
        x = x / 255.0
    return x.reshape(len(x), -1)


class DigitJudge:
    """A perceptron with one hidden ReLU layer (scikit-learn's ``MLPClassifier``) on grey pixels.

    ``predict`` gives the class; ``features`` the hidden activations, the feature space of
    :meth:`frechet_distance`.  Images must have the resolution the judge was trained at.
    """

    def __init__(self, hidden: int = 128, seed: int = 0) -> None:
        neural_network = import_optional("sklearn.neural_network", "demo")
        self.model = neural_network.MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=600,
                                                  random_state=seed)
        self.num_pixels: int | None = None

    @property
    def num_features(self) -> int:
        """Width of the feature space (the hidden layer)."""
        return int(self.model.hidden_layer_sizes[0])

    def fit(self, images: np.ndarray, labels: np.ndarray) -> DigitJudge:
        x = grey_pixels(images)
        self.num_pixels = x.shape[1]
        self.model.fit(x, labels)
        return self

    def _pixels(self, images: np.ndarray) -> np.ndarray:
        x = grey_pixels(images)
        if x.shape[1] != self.num_pixels:
            raise ValueError(f"the judge was trained on images of {self.num_pixels} pixels, got {x.shape[1]}")
        return x

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class of each image."""
        return self.model.predict(self._pixels(images))

    def features(self, images: np.ndarray) -> np.ndarray:
        """Hidden-layer activations ``relu(x W1 + b1)``, (N, hidden)."""
        x = self._pixels(images)
        return np.maximum(x @ self.model.coefs_[0] + self.model.intercepts_[0], 0.0)

    def class_consistency(self, images: np.ndarray, requested: np.ndarray) -> float:
        """Fraction of ``images`` that the judge assigns to the ``requested`` class."""
        return float(np.mean(self.predict(images) == np.asarray(requested)))

    def frechet_distance(self, images: np.ndarray, reference: np.ndarray) -> float:
        """Fréchet distance between Gaussians fitted to the judge's features of two image sets (FID's
        formula in this small feature space; a proxy, not ImageNet FID)."""
        mu1, s1 = feature_statistics(self.features(images))
        mu2, s2 = feature_statistics(self.features(reference))
        return frechet_distance(mu1, s1, mu2, s2)


def train_judge(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> DigitJudge:
    """The demo's independent judge, trained on the real training digits only."""
    return DigitJudge(seed=seed).fit(images, labels)
