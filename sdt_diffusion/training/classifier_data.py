"""Training data of the SDT-H classifier: timm's augmentations made a pure function of ``(seed, epoch, image)``.

The images come from :mod:`sdt_diffusion.data` (image folders, ``save_to_disk`` folders or anything ``datasets.load_dataset`` reads, the same reader
``eval/classify.py`` uses).  Every random choice of the training transform (timm's random-resized crop, flip,
RandAugment, random erasing) is drawn from generators seeded with ``(seed, epoch, copy, index)`` inside a fork of
the global generators, so an image's augmentation does not depend on data-loader workers, processes or restarts;
the order of the images comes from :class:`~sdt_diffusion.data.EpochSampler` (a pure function of ``(seed,
epoch)``), extended here with repeated augmentation.  Mixup/CutMix act on whole batches in the training process
with the global numpy generator, whose state every checkpoint saves; together this makes a resumed run see
exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..data import EpochSampler, LabelledImages
from ..models.sdt_h import IMAGENET_MEAN, IMAGENET_STD
from ..utils.optional import import_optional
from .classifier_config import AugmentSpec

timm_data = import_optional("timm.data", "timm")
timm_auto_augment = import_optional("timm.data.auto_augment", "timm")
timm_loss = import_optional("timm.loss", "timm")

__all__ = ["AugmentedImages", "RepeatedAugmentSampler", "build_criterion", "build_mixup", "posterize_any_bits",
           "seeded_rngs", "train_transform"]


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """RandAugment's posterize as the Pillow versions RMT trained with computed it, for any bit count: keep the
    ``bits_to_keep`` most significant bits of every channel (0 bits: a black image).

    timm's ``PosterizeIncreasing`` asks for 0 bits when a sampled magnitude reaches 10 (``m9-mstd0.5`` does so for
    about 2% of its draws); Pillow 12 and later refuse 0 in ``ImageOps.posterize`` with a ``ValueError``, which
    would stop training within the first batches.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return Image.new(img.mode, img.size, 0)


def train_transform(resolution: int, spec: AugmentSpec) -> Callable[[Image.Image], torch.Tensor]:
    """timm's ImageNet training transform: random-resized crop, flip, RandAugment (colour jitter only without it,
    as timm does), to tensor, ImageNet normalisation, random erasing.  RandAugment's posterize takes every bit count
    (:func:`posterize_any_bits`)."""
    transform = timm_data.create_transform(
        input_size=resolution, is_training=True, scale=spec.scale, ratio=spec.ratio, hflip=spec.hflip, vflip=0.0,
        color_jitter=spec.color_jitter, auto_augment=spec.auto_augment, interpolation=spec.interpolation,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, re_prob=spec.reprob, re_mode=spec.remode, re_count=spec.recount,
        re_num_splits=0,
    )
    for stage in getattr(transform, "transforms", []):
        if isinstance(stage, timm_auto_augment.RandAugment):
            for op in stage.ops:
                if op.aug_fn is timm_auto_augment.posterize:
                    op.aug_fn = posterize_any_bits
    return transform


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's (CPU) global generators with ``seed`` inside the block; their previous
    states come back on exit (also on errors), so the block changes no other random stream."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class AugmentedImages(Dataset):
    """Training items ``{"pixel_values", "labels", "index"}`` for keys ``(index, epoch, copy)``; the augmentation
    of a key is drawn from ``SeedSequence([seed, epoch, copy, index])``."""

    def __init__(self, images: LabelledImages, transform: Callable[[Image.Image], torch.Tensor], seed: int) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def item_seed(self, index: int, epoch: int, copy: int) -> int:
        """The augmentation seed of one key."""
        return int(np.random.SeedSequence([self.seed, epoch, copy, index]).generate_state(1, np.uint64)[0] >> 1)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        index, epoch, copy = key
        image = self.images.image(int(index))
        with seeded_rngs(self.item_seed(int(index), int(epoch), int(copy))):
            pixels = self.transform(image)
        return {"pixel_values": pixels, "labels": int(self.images.labels[index]), "index": int(index)}


class RepeatedAugmentSampler(EpochSampler):
    """:class:`~sdt_diffusion.data.EpochSampler`'s seeded order with keys ``(index, epoch, copy)`` and repeated
    augmentation.

    With ``repeats = r > 1`` (DeiT's and RMT's repeated augmentation) each epoch's permutation has every index
    ``r`` times in a row, process ``rank`` takes every ``num_replicas``-th entry, and each process keeps its
    first ``num_samples // num_replicas`` keys: an epoch is as long as without repetition, the ``r`` copies of
    an image land on different processes (with one process, in the same batch), with different augmentations.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, repeats: int = 1) -> None:
        super().__init__(num_samples, num_replicas, rank, seed, shuffle=True, random_flip=False)
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.repeats = repeats

    def epoch_keys(self, epoch: int) -> list[tuple[int, int, int]]:  # type: ignore[override]
        if self.repeats == 1:
            return [(index, epoch, 0) for index, _ in super().epoch_keys(epoch)]
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        indices = np.repeat(order, self.repeats)
        copies = np.tile(np.arange(self.repeats), self.num_samples)
        mine = slice(self.rank, None, self.num_replicas)
        keep = len(self)
        return [(int(i), epoch, int(c)) for i, c in zip(indices[mine][:keep], copies[mine][:keep])]


def build_mixup(spec: AugmentSpec, num_classes: int) -> Any | None:
    """timm's ``Mixup`` (Mixup/CutMix with label smoothing folded into the soft targets), or ``None`` when off."""
    if not spec.mixes:
        return None
    return timm_data.Mixup(mixup_alpha=spec.mixup, cutmix_alpha=spec.cutmix, prob=spec.mixup_prob,
                           switch_prob=spec.mixup_switch_prob, mode=spec.mixup_mode, label_smoothing=spec.smoothing,
                           num_classes=num_classes)


def build_criterion(spec: AugmentSpec) -> torch.nn.Module:
    """Soft-target cross-entropy with Mixup/CutMix, else label-smoothing cross-entropy (plain without smoothing)."""
    if spec.mixes:
        return timm_loss.SoftTargetCrossEntropy()
    if spec.smoothing > 0:
        return timm_loss.LabelSmoothingCrossEntropy(smoothing=spec.smoothing)
    return torch.nn.CrossEntropyLoss()
