"""Image inputs of the evaluation: batches of uint8 N×H×W×3 images from an ADM ``.npz``, a folder or an array.

ADM's evaluator reads sample and reference batches as ``arr_0`` (uint8 N×H×W×3) in an ``.npz``; a folder of
equally sized ``.png``/``.jpg`` files and an in-memory array are read the same way.  Folder images are converted
by the data layer's :func:`~sdt_diffusion.data.images.to_rgb` (16-bit images scaled to 8 bits, 32-bit integer and
float images refused), the rule training and ``sdt-classify`` follow too. Every reader checks its
input before any compute is spent and raises :class:`EvaluationInputError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.images import IMAGE_EXTENSIONS as DATA_IMAGE_EXTENSIONS
from ..data.images import image_mode_problem, is_visible, to_rgb
from ..utils.files import sha256_file

__all__ = [
    "ArrayImages",
    "EvaluationInputError",
    "FolderImages",
    "ImageSource",
    "MissingInputError",
    "NpzImages",
    "check_image_array_shape",
    "open_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class EvaluationInputError(ValueError):
    """An input file (samples, reference, weights) is missing or malformed; the message names the file."""


class MissingInputError(EvaluationInputError, FileNotFoundError):
    """An input path does not exist (both a ValueError and a FileNotFoundError)."""


def check_image_array_shape(
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


class ImageSource(ABC):
    """A sequence of equally sized uint8 RGB images read in batches of N×H×W×3 numpy arrays."""

    label: str
    count: int
    height: int
    width: int

    @abstractmethod
    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray]:
        """Yield uint8 N×H×W×3 arrays of at most ``batch_size`` images, in a fixed order."""

    @abstractmethod
    def content_hash(self) -> str:
        """sha256 hex digest of the images' content (used as a cache key)."""


def _read_npy_header(fp: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """Parse an .npy header from ``fp``; None for format versions numpy has no public reader for."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    return None


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
        except EvaluationInputError:
            raise
        except zipfile.BadZipFile as e:
            raise EvaluationInputError(f"{self.path}: not a valid .npz file ({e})") from e
        except (OSError, ValueError, EOFError, zlib.error) as e:  # a truncated or damaged header
            raise EvaluationInputError(f"{self.path}: cannot read '{key}' ({type(e).__name__}: {e})") from e
        self._check_integrity(member)
        if header is None:  # unusual npy version: fall back to numpy's reader
            with np.load(self.path, allow_pickle=False) as npz:
                arr = npz[key]
            header = (arr.shape, False, arr.dtype)
        shape, self._fortran, dtype = header
        check_image_array_shape(shape, dtype, f"{self.path} ['{key}']", peek=self._peek)
        self.count, self.height, self.width = int(shape[0]), int(shape[1]), int(shape[2])

    def _check_integrity(self, member: str) -> None:
        """Read ``member`` through once so the zip CRC is checked: a flipped bit is found before any compute."""
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(member) as fp:
                while fp.read(1 << 24):
                    pass
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise EvaluationInputError(f"{self.path}: '{self.key}' is damaged ({type(e).__name__}: {e}); the file "
                                       f"was altered or truncated after it was written") from e

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
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as fp:
                _read_npy_header(fp)
                for i in range(0, self.count, batch_size):
                    n = min(batch_size, self.count - i)
                    batch = np.empty((n, self.height, self.width, 3), dtype=np.uint8)
                    view, filled = memoryview(batch).cast("B"), 0
                    while filled < n * image_bytes:
                        got = fp.readinto(view[filled:])
                        if not got:
                            raise EvaluationInputError(f"{self.path}: '{self.key}' is truncated (ends inside image "
                                                       f"{i + filled // image_bytes})")
                        filled += got
                    yield batch
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:  # changed since it was opened
            raise EvaluationInputError(f"{self.path}: '{self.key}' is damaged ({type(e).__name__}: {e})") from e

    def content_hash(self) -> str:
        return sha256_file(self.path)


class ArrayImages(ImageSource):
    """In-memory uint8 N×H×W×3 images (e.g. straight from a sampler)."""

    def __init__(self, images: np.ndarray, label: str = "<array>") -> None:
        images = np.asarray(images)
        check_image_array_shape(images.shape, images.dtype, label, peek=lambda: images[:8])
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


class _FolderDataset(torch.utils.data.Dataset):
    """Decoded images of a folder; a file that cannot be decoded gives ``(None, message naming it)`` rather than an
    exception, so the message survives data-loader worker processes intact."""

    def __init__(self, files: list[Path], size: tuple[int, int]) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, str | None]:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                if im.size != self.size:
                    return None, f"{path}: image size {im.size} differs from the folder's {self.size}"
                return np.asarray(to_rgb(im), dtype=np.uint8), None
        except Exception as e:  # noqa: BLE001 - truncated or corrupt image data: reported with the file named
            return None, f"{path}: cannot decode image ({type(e).__name__}: {e})"


def _stack_or_error(items: list[tuple[np.ndarray | None, str | None]]) -> tuple[np.ndarray | None, str | None]:
    errors = [e for _, e in items if e is not None]
    return (None, errors[0]) if errors else (np.stack([a for a, _ in items]), None)


class FolderImages(ImageSource):
    """All ``.png``/``.jpg``/``.jpeg`` files below a folder (recursive, sorted by relative path); one size.

    Hidden entries (names starting with ``.`` or ``__``, e.g. ``.ipynb_checkpoints``) are skipped, the data
    layer's rule; other image files (``.webp``, ``.bmp`` ...) are refused rather than silently left out.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        visible = [p for p in self.path.rglob("*")
                   if p.is_file() and all(is_visible(part) for part in p.relative_to(self.path).parts)]
        self.files = sorted((p for p in visible if p.suffix.lower() in IMAGE_EXTENSIONS),
                            key=lambda p: p.relative_to(self.path).as_posix())
        others = sorted(p for p in visible if p.suffix.lower() not in IMAGE_EXTENSIONS
                        and p.suffix.lower() in DATA_IMAGE_EXTENSIONS)
        if others:  # silently leaving them out would score fewer images than the folder holds
            raise EvaluationInputError(
                f"{self.path}: holds {len(others)} image file(s) this reader does not take (e.g. {others[0]}); "
                f"samples and references are {'/'.join(IMAGE_EXTENSIONS)} files: convert them (lossless .png) or "
                f"move them out")
        if not self.files:
            raise EvaluationInputError(f"{self.path}: no {'/'.join(IMAGE_EXTENSIONS)} images found (searched recursively)")
        size: tuple[int, int] | None = None
        for f in self.files:  # headers only: cheap, and fails before any compute is spent
            try:
                with Image.open(f) as im:
                    mode, this = im.mode, im.size
            except (UnidentifiedImageError, OSError) as e:
                raise EvaluationInputError(f"{f}: cannot read image ({e})") from e
            problem = image_mode_problem(mode)  # the data layer's rule: 16-bit images are scaled, I and F refused
            if problem is not None:
                raise EvaluationInputError(f"{f}: {problem}")
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
            loaded: Iterator[tuple[np.ndarray | None, str | None]] = (
                _stack_or_error([dataset[j] for j in range(i, min(i + batch_size, self.count))])
                for i in range(0, self.count, batch_size))
        else:
            loaded = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                      num_workers=num_workers, collate_fn=_stack_or_error))
        for batch, error in loaded:
            if error is not None:
                raise EvaluationInputError(error)
            yield batch

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            rel = f.relative_to(self.path).as_posix().encode("utf-8", "surrogateescape")  # any file name
            h.update(len(rel).to_bytes(8, "little") + rel + f.stat().st_size.to_bytes(8, "little"))
            h.update(f.read_bytes())  # one image file at a time: small
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
