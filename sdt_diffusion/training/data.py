"""Training data: image folders / saved datasets with ADM preprocessing, the latent cache, seeded sampling.

Every random choice about the data (the order and the horizontal flips) is made by :class:`EpochSampler`
from ``(seed, epoch)`` alone, so the stream of batches is a pure function of the seed, the epoch, the
number of processes and the per-device batch: independent of data-loader workers, of the training RNG and
of restarts.  Resuming replays an epoch's keys and skips the consumed batches.

Samples are dicts: ``{"pixel_values": (3, R, R) in [-1, 1], "labels": int, "index": int}`` for images and
``{"latent_mean": (C, h, w), "latent_std": (C, h, w), "labels": int, "index": int}`` for the latent cache.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.data_loader import skip_first_batches as accelerate_skip_first_batches
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ..utils.labels import default_id2label
from .config import ConfigError

__all__ = [
    "CACHE_FORMAT",
    "EpochSampler",
    "FolderRows",
    "IMAGE_EXTENSIONS",
    "ImageClassDataset",
    "ImageSource",
    "LatentCacheDataset",
    "center_crop_arr",
    "iterate_batches",
    "load_image_folder",
    "load_image_source",
    "load_saved_dataset",
    "pil_to_tensor",
    "read_cache_metadata",
]

CACHE_FORMAT = "sdt-diffusion-latents"
CACHE_VERSION = 1
_SYNSET = re.compile(r"^n\d{8}$")


# ----------------------------------------------------------------------------------------------- images
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


def _open_image(value: Any, where: str) -> Image.Image:
    """Decode one image cell (``{"bytes", "path"}``, a PIL image or an array) to RGB, naming ``where`` on failure."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            if value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(value["path"])
            else:
                raise ValueError("the image cell has neither bytes nor a path")
        elif isinstance(value, (str, Path)):
            image = Image.open(value)
        else:
            image = Image.fromarray(np.asarray(value))
        image.load()
        return image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise OSError(f"cannot read image {where}: {type(e).__name__}: {e}") from e


@dataclass
class ImageSource:
    """An image/label dataset and its class names."""

    dataset: Any  # rows ``{image_column: cell}``: a datasets.Dataset with images not decoded, or FolderRows
    image_column: str
    labels: np.ndarray
    num_classes: int
    class_names: list[str] | None
    description: str

    def __len__(self) -> int:
        return len(self.labels)


# Files PIL can open, matched case-insensitively (the same set datasets' ``imagefolder`` builder reads).
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _visible(name: str) -> bool:
    return not name.startswith((".", "__"))


class FolderRows:
    """The rows of an image folder, ``{"image": {"path", "bytes": None}}``, from a compact array of paths.

    Paths are kept as file-system bytes in one numpy array (about 50 MB for ImageNet's 1.28M files, shared
    with data-loader workers without per-object reference counts), so any file name, UTF-8 or not, works.
    """

    def __init__(self, root: Path, relative_paths: Sequence[bytes]) -> None:
        self.root = os.fsencode(root)
        self.paths = np.array(relative_paths, dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, dict[str, Any]]:
        return {"image": {"path": os.fsdecode(os.path.join(self.root, bytes(self.paths[index]))), "bytes": None}}


def _list_images(folder: Path, root: Path) -> list[bytes]:
    """Image files below ``folder`` (any depth, hidden entries skipped) as paths relative to ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(folder)):
        dirnames[:] = [d for d in dirnames if _visible(os.fsdecode(d))]
        for name in filenames:
            decoded = os.fsdecode(name)
            if _visible(decoded) and os.path.splitext(decoded)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(dirpath, name), os.fsencode(root)))
    return found


def load_image_folder(data_dir: str | Path, flag: str = "--data-dir") -> ImageSource:
    """An image folder with one subfolder per class, read from the file system (no ``datasets`` cache).

    Class ids follow the sorted subfolder names; every image below a class folder (at any depth) belongs to
    that class; images are ordered by their path (the order of datasets' ``imagefolder`` builder).

    Raises:
        ConfigError: no class subfolders, or a class subfolder without images (its id would shift the rest);
            the message starts with ``flag`` (the flag that named the folder) and the folder.
    """
    root = Path(data_dir)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not classes:
        raise ConfigError(f"{flag} {data_dir}: expected an image folder with one subfolder per class, found no "
                          f"subfolders")
    files: list[tuple[bytes, int]] = []
    for label, name in enumerate(classes):
        images = _list_images(root / name, root)
        if not images:
            raise ConfigError(
                f"{flag} {data_dir}: class folder {name!r} holds no images; class ids follow the folder "
                f"listing, so remove the folder or add its images"
            )
        files.extend((path, label) for path in images)
    files.sort()
    labels = np.array([label for _, label in files], dtype=np.int64)
    rows = FolderRows(root, [path for path, _ in files])
    return ImageSource(rows, "image", labels, len(classes), classes, f"image folder {data_dir}")


def load_saved_dataset(dataset: str, split: str = "train", image_column: str = "image",
                       label_column: str = "label") -> ImageSource:
    """A ``save_to_disk`` dataset (or one split of a ``DatasetDict``), images left undecoded.

    Raises:
        ConfigError: not a saved dataset, a missing split or column, no rows or negative labels.
    """
    try:
        ds = datasets.load_from_disk(dataset)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--dataset {dataset}: not a dataset saved with save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"--dataset {dataset}: no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    for flag, col in (("--image-column", image_column), ("--label-column", label_column)):
        if col not in ds.column_names:
            raise ConfigError(f"--dataset {dataset}: no column {col!r} ({flag}); columns: {ds.column_names}")
    feature = ds.features[label_column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    description = f"dataset {dataset}"
    if len(ds) == 0:
        raise ConfigError(f"{description}: no images")
    labels = np.asarray(ds[label_column], dtype=np.int64)
    if labels.min() < 0:
        raise ConfigError(f"{description}: negative labels in column {label_column!r}")
    num_classes = len(names) if names is not None else int(labels.max()) + 1
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    ds = ds.select_columns([image_column])
    return ImageSource(ds, image_column, labels, num_classes, names, description)


def load_image_source(
    data_dir: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    folder_flag: str = "--data-dir",
) -> ImageSource:
    """An image folder (:func:`load_image_folder`, errors naming ``folder_flag``) or a ``save_to_disk`` dataset
    (:func:`load_saved_dataset`).

    Images stay undecoded (decoded per sample in :class:`ImageClassDataset`, so a bad file is named).
    """
    if data_dir is not None:
        return load_image_folder(data_dir, folder_flag)
    return load_saved_dataset(dataset, split, image_column, label_column)


def class_names_to_id2label(names: Sequence[str] | None, num_classes: int) -> dict[int, str] | None:
    """id2label for the exported pipeline: folder / ClassLabel names; WordNet ids of a 1000-class folder
    (ImageNet's ``n01440764`` ...) and unnamed 1000-class data get the shipped ImageNet names."""
    if names is None or (len(names) == 1000 and all(_SYNSET.match(n) for n in names)):
        return default_id2label(num_classes)
    return {i: str(n) for i, n in enumerate(names)}


class ImageClassDataset(Dataset):
    """ADM-preprocessed images; a key is ``index`` or ``(index, flip)`` (flip decided by the sampler)."""

    def __init__(self, source: ImageSource, resolution: int, label_map: np.ndarray | None = None) -> None:
        self.source = source
        self.resolution = resolution
        self.labels = source.labels if label_map is None else label_map[source.labels]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, flip = (key, 0) if isinstance(key, (int, np.integer)) else key
        cell = self.source.dataset[int(index)][self.source.image_column]
        where = cell.get("path") if isinstance(cell, dict) and cell.get("path") else f"row {index} of {self.source.description}"
        arr = center_crop_arr(_open_image(cell, str(where)), self.resolution)
        if flip:
            arr = arr[:, ::-1]
        return {"pixel_values": pil_to_tensor(arr), "labels": int(self.labels[index]), "index": int(index)}


# ----------------------------------------------------------------------------------------- latent cache
def read_cache_metadata(cache_dir: str | Path) -> dict[str, Any]:
    """The cache's ``metadata.json``, checked for format and completeness.

    Raises:
        ConfigError: missing or foreign metadata, or a missing shard.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / "metadata.json"
    if not path.is_file():
        raise ConfigError(f"latent cache {cache_dir}: no metadata.json (extraction incomplete?)")
    try:
        meta = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON file ({e}); the cache is damaged: re-run the extraction") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != CACHE_FORMAT:
        raise ConfigError(f"latent cache {cache_dir}: not an sdt-diffusion latent cache (format {found!r})")
    if meta.get("version") != CACHE_VERSION:
        raise ConfigError(f"latent cache {cache_dir}: version {meta.get('version')}, this code reads {CACHE_VERSION}")
    for shard in meta["shards"]:
        for name in ("mean.npy", "std.npy", "labels.npy", "indices.npy"):
            if not (cache_dir / shard / name).is_file():
                raise ConfigError(f"latent cache {cache_dir}: missing {shard}/{name}")
    return meta


class LatentCacheDataset(Dataset):
    """Reads the latent cache of ``training/extract_latents.py`` through memory maps (shared by processes).

    Each shard stores, for both flips (index 0: as is, 1: horizontally flipped), the VAE posterior's mean and
    std; a key ``(index, flip)`` returns that flip's ``latent_mean``/``latent_std`` as float32.  The trainer
    draws ``z = (mean + std·ε)·scaling_factor``, the same draw as encoding on the fly.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.meta = read_cache_metadata(self.cache_dir)
        self.shards: list[str] = list(self.meta["shards"])
        channels, height, width = (int(v) for v in self.meta["latent_shape"])
        labels, shard_of, row_of, indices = [], [], [], []
        for s, shard in enumerate(self.shards):
            idx = self._read(shard, "indices.npy", None)
            if idx.ndim != 1:
                raise ConfigError(f"{self.cache_dir / shard / 'indices.npy'}: expected a 1-d array, got shape {idx.shape}")
            indices.append(idx)
            labels.append(self._read(shard, "labels.npy", (len(idx),)))
            for name in ("mean.npy", "std.npy"):  # opened once here, so a truncated file is named before training
                self._read(shard, name, (len(idx), 2, channels, height, width), mmap=True)
            shard_of.append(np.full(len(idx), s, dtype=np.int64))
            row_of.append(np.arange(len(idx), dtype=np.int64))
        all_idx = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        n = int(self.meta["num_samples"])
        order = np.argsort(all_idx, kind="stable")
        if len(all_idx) != n or not np.array_equal(all_idx[order], np.arange(n)):
            raise ConfigError(
                f"latent cache {self.cache_dir}: shard indices do not cover 0..{n - 1} exactly once "
                f"(found {len(all_idx)} entries); re-run the extraction"
            )
        self.labels = np.concatenate(labels)[order]
        self._shard = np.concatenate(shard_of)[order]
        self._row = np.concatenate(row_of)[order]
        self.latent_shape = tuple(self.meta["latent_shape"])
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None

    def _read(self, shard: str, name: str, shape: tuple[int, ...] | None, mmap: bool = False) -> np.ndarray:
        """One array of the cache (a memory map when ``mmap``), checked for its shape.

        Raises:
            ConfigError: the file is truncated, not an ``.npy`` array, or of the wrong shape (the file is named).
        """
        path = self.cache_dir / shard / name
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ConfigError(f"{path}: unreadable latent cache array ({type(e).__name__}: {e}); the file is truncated "
                              f"or damaged: re-run training/extract_latents.py") from None
        if shape is not None and arr.shape != shape:
            raise ConfigError(f"{path}: shape {arr.shape}, the cache's metadata.json says {shape}; re-run the extraction")
        return arr

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # memory maps are reopened in each worker
        return state

    def _open(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None:
            self._arrays = [
                (np.load(self.cache_dir / s / "mean.npy", mmap_mode="r", allow_pickle=False),
                 np.load(self.cache_dir / s / "std.npy", mmap_mode="r", allow_pickle=False))
                for s in self.shards
            ]
        return self._arrays

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, flip = (key, 0) if isinstance(key, (int, np.integer)) else key
        mean, std = self._open()[self._shard[index]]
        row = self._row[index]
        return {
            "latent_mean": torch.from_numpy(np.array(mean[row, flip], dtype=np.float32)),
            "latent_std": torch.from_numpy(np.array(std[row, flip], dtype=np.float32)),
            "labels": int(self.labels[index]),
            "index": int(index),
        }


# ------------------------------------------------------------------------------------------- sampling
class EpochSampler(Sampler):
    """DistributedSampler-like keys ``(index, flip)`` for one process, a pure function of ``(seed, epoch)``.

    Each epoch draws one permutation and one flip bit per sample from ``numpy.random.default_rng([seed,
    epoch])``, drops the tail that does not divide evenly across processes, and gives process ``rank`` every
    ``num_replicas``-th key, so the processes' keys are disjoint.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, random_flip: bool = True) -> None:
        if num_samples < num_replicas:
            raise ConfigError(f"{num_samples} samples cannot be split across {num_replicas} processes")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas

    def epoch_keys(self, epoch: int) -> list[tuple[int, int]]:
        """This process's keys of ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        flips = rng.integers(0, 2, self.num_samples) if self.random_flip else np.zeros(self.num_samples, np.int64)
        keep = len(self) * self.num_replicas
        mine = order[:keep][self.rank::self.num_replicas]
        return [(int(i), int(flips[i])) for i in mine]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.epoch_keys(self.epoch))


def iterate_batches(
    dataset: Dataset,
    sampler: EpochSampler,
    batch_size: int,
    start_batch: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    skip_first_batches: Callable[[DataLoader, int], DataLoader] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless ``(epoch, batch)`` stream of this process, starting after ``start_batch`` consumed batches.

    Batches are ``batch_size`` keys (the last partial one of an epoch is dropped).  Skipping inside the
    resumed epoch uses ``skip_first_batches`` (``accelerator.skip_first_batches``), which skips keys, not
    decoded images.  The loader gets its own generator so creating it never consumes the global RNG.
    """
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"each process sees {len(sampler)} samples per epoch, fewer than one batch of {batch_size}; "
            f"use a smaller batch or more data"
        )
    skip_first_batches = skip_first_batches or accelerate_skip_first_batches
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_sampler=BatchSampler(sampler, batch_size, drop_last=True),
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(sampler.seed),
        )
        if skip:
            loader = skip_first_batches(loader, skip)
            skip = 0
        for batch in loader:
            yield epoch, batch
        epoch += 1
