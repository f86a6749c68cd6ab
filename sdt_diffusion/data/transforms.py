"""Datasets over :class:`~.images.LabelledImages`: ADM's preprocessing for diffusion, any transform for classifiers.

Items of :class:`ImageClassDataset` are dicts ``{"pixel_values": (3, R, R) in [-1, 1], "labels": int, "index":
int}``; items of :class:`TransformedImages` are ``(pixel_values, label)`` pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import LabelledImages

__all__ = ["ImageClassDataset", "TransformedImages", "center_crop_arr", "pil_to_tensor"]


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX filtering while the short side is ≥ 2·size, BICUBIC-resize the short
    side to ``size``, then crop the centre ``size × size``.  Returns a uint8 ``(size, size, C)`` array."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def pil_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` → float ``(3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)  # a writable copy


class ImageClassDataset(Dataset):
    """ADM-preprocessed images (:func:`center_crop_arr`); a key is ``index`` or ``(index, flip)`` (the flip decided
    by the sampler); ``label_map`` renumbers the labels (``label_map[label]``)."""

    def __init__(self, source: LabelledImages, resolution: int, label_map: np.ndarray | None = None) -> None:
        self.source = source
        self.resolution = resolution
        self.labels = source.labels if label_map is None else label_map[source.labels]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, flip = (key, 0) if isinstance(key, (int, np.integer)) else key
        arr = center_crop_arr(self.source.image(int(index)), self.resolution)
        if flip:
            arr = arr[:, ::-1]
        return {"pixel_values": pil_to_tensor(arr), "labels": int(self.labels[index]), "index": int(index)}


class TransformedImages(Dataset):
    """``(pixel_values, label)`` items of a :class:`~.images.LabelledImages` through ``transform``."""

    def __init__(self, images: LabelledImages, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.image(index)), int(self.images.labels[index])
