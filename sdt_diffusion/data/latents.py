"""The latent cache ``training/extract_latents.py`` writes and ``train.py --latents-dir`` reads.

A cache folder holds ``metadata.json`` (``format`` :data:`CACHE_FORMAT`, ``version`` :data:`CACHE_VERSION`, the
shard names, ``num_samples``, ``latent_shape`` ...) and one folder per shard with ``mean.npy`` and ``std.npy``
(``(n, 2, C, h, w)``: the VAE posterior of both flips), ``labels.npy`` and ``indices.npy`` (the image row of each
entry), plain ``.npy`` arrays read with ``allow_pickle=False`` through memory maps.  Items are dicts
``{"latent_mean": (C, h, w), "latent_std": (C, h, w), "labels": int, "index": int}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import DataInputError

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "LatentCacheDataset", "read_cache_metadata"]

CACHE_FORMAT = "sdt-diffusion-latents"
CACHE_VERSION = 1
_REQUIRED_FIELDS = ("shards", "num_samples", "latent_shape")


def read_cache_metadata(cache_dir: str | Path) -> dict[str, Any]:
    """The cache's ``metadata.json``, checked for format and completeness.

    Raises:
        DataInputError: missing, foreign or incomplete metadata (a missing field named), or a missing shard file.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / "metadata.json"
    if not path.is_file():
        raise DataInputError(f"latent cache {cache_dir}: no metadata.json (extraction incomplete?)")
    try:
        meta = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataInputError(f"{path}: not a JSON file ({e}); the cache is damaged: re-run the extraction") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != CACHE_FORMAT:
        raise DataInputError(f"latent cache {cache_dir}: not an sdt-diffusion latent cache (format {found!r})")
    if meta.get("version") != CACHE_VERSION:
        raise DataInputError(f"latent cache {cache_dir}: version {meta.get('version')}, this code reads {CACHE_VERSION}")
    missing = [key for key in _REQUIRED_FIELDS if key not in meta]
    if missing:
        raise DataInputError(f"{path}: no {', '.join(missing)}; the cache is damaged: re-run the extraction")
    for shard in meta["shards"]:
        for name in ("mean.npy", "std.npy", "labels.npy", "indices.npy"):
            if not (cache_dir / shard / name).is_file():
                raise DataInputError(f"latent cache {cache_dir}: missing {shard}/{name}")
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
                raise DataInputError(f"{self.cache_dir / shard / 'indices.npy'}: expected a 1-d array, got shape {idx.shape}")
            indices.append(idx)
            labels.append(self._read(shard, "labels.npy", (len(idx),)))
            self._check_label_range(shard, labels[-1])
            for name in ("mean.npy", "std.npy"):  # opened once here, so a truncated file is named before training
                self._read(shard, name, (len(idx), 2, channels, height, width), mmap=True)
            shard_of.append(np.full(len(idx), s, dtype=np.int64))
            row_of.append(np.arange(len(idx), dtype=np.int64))
        all_idx = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        n = int(self.meta["num_samples"])
        order = np.argsort(all_idx, kind="stable")
        if len(all_idx) != n or not np.array_equal(all_idx[order], np.arange(n)):
            raise DataInputError(
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
            DataInputError: the file is truncated, not an ``.npy`` array, or of the wrong shape (the file is named).
        """
        path = self.cache_dir / shard / name
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataInputError(f"{path}: unreadable latent cache array ({type(e).__name__}: {e}); the file is truncated "
                              f"or damaged: re-run training/extract_latents.py") from None
        if shape is not None and arr.shape != shape:
            raise DataInputError(f"{path}: shape {arr.shape}, the cache's metadata.json says {shape}; re-run the extraction")
        return arr

    def _check_label_range(self, shard: str, labels: np.ndarray) -> None:
        """Every label of ``shard`` must be an integer in ``[0, num_classes)`` of ``metadata.json``: a label equal to
        the class count would train as the null label of guidance, a larger one crash at the first step.

        Raises:
            DataInputError: naming the shard file, the first bad label and the class count.
        """
        path = self.cache_dir / shard / "labels.npy"
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataInputError(f"{path}: labels of dtype {labels.dtype}, expected integers; re-run the extraction")
        num_classes = self.meta.get("num_classes")
        if num_classes is None:
            return
        bad = np.flatnonzero((labels < 0) | (labels >= int(num_classes)))
        if len(bad):
            raise DataInputError(
                f"{path}: label {int(labels[bad[0]])} (entry {int(bad[0])}) is outside [0, {int(num_classes)}), the "
                f"classes of the cache's metadata.json ({len(bad)} such label(s)); re-run the extraction")

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the cache for a resumed run's data stream: ``{"source", "count", "bytes", "sha256"}``, a
        digest of ``metadata.json`` and the size of every shard file (no array is read; a re-extraction from other
        images or with other settings changes the metadata or the sizes)."""
        digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        total = 0
        for shard in self.shards:
            for name in ("mean.npy", "std.npy", "labels.npy", "indices.npy"):
                size = (self.cache_dir / shard / name).stat().st_size
                total += size
                digest.update(f"{shard}/{name}\0{size}\n".encode())
        return {"source": "latent cache", "count": len(self), "bytes": total, "sha256": digest.hexdigest()}

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
