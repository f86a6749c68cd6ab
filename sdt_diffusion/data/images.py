"""The labelled-image reader: class folders, ``save_to_disk`` datasets and anything ``datasets.load_dataset`` takes,
images decoded on access.

One reader serves diffusion training, latent extraction, classifier training and ``eval/classify.py``:

* **class folders**: one sub-folder per class; class ids follow the sorted sub-folder names; every image below a
  class folder (at any depth, symbolic links followed once) belongs to that class; rows are ordered by their path
  relative to the root (the order of ``datasets``' ``imagefolder`` builder).  Entries whose name starts with
  ``.`` or ``__`` are hidden (:func:`is_visible`); an image is a file whose extension PIL opens
  (:data:`IMAGE_EXTENSIONS`, case-insensitive).  An empty class folder is refused: it would shift every class id
  after it.
* **saved datasets**: a ``datasets.Dataset`` or one split of a ``DatasetDict`` written by ``save_to_disk``, with
  an image column (left undecoded) and an integer label column (``ClassLabel`` names become the class names).
* **load_dataset datasets** (:func:`load_hf_dataset`): a Hub id (``ILSVRC/imagenet-1k``), a local folder of
  parquet / arrow / image files, or a builder name (``parquet``, ``imagefolder``, ...) with ``--data-files``, plus
  a config and a split; the same columns and labels as a saved dataset.  :func:`open_dataset` (``--dataset``)
  detects a saved dataset first, so a ``save_to_disk`` folder reads as before.  Only map-style datasets: a
  streamed one (``--streaming``) is refused (:func:`refuse_streaming`).

Every error is a :class:`DataInputError` (a :class:`~sdt_diffusion.utils.errors.ConfigError`) that names the
folder, file, split, column or row at fault.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import datasets.packaged_modules
import numpy as np
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from ..utils.errors import ConfigError
from ..utils.labels import default_id2label

__all__ = [
    "AUTO_VERIFY_LIMIT",
    "DATASET_HELP",
    "EIGHT_BIT_MODES",
    "IMAGE_EXTENSIONS",
    "MAX_RESOLUTION",
    "VERIFY_IMAGES",
    "DataInputError",
    "FolderRows",
    "LabelledImages",
    "UnreadableImageError",
    "check_labels",
    "class_names_to_id2label",
    "find_unreadable_images",
    "image_mode_problem",
    "is_saved_dataset",
    "is_visible",
    "load_hf_dataset",
    "load_image_folder",
    "load_image_source",
    "load_saved_dataset",
    "open_dataset",
    "open_image",
    "open_labelled_images",
    "parse_data_files",
    "refuse_streaming",
    "to_rgb",
    "verify_images",
]

# Files PIL can open, matched case-insensitively (the set ``datasets``' ``imagefolder`` builder reads).
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
_SYNSET = re.compile(r"^n\d{8}$")
# The largest image side a command resizes to (training, extraction, classification): one 3 x 4096 x 4096 float
# image is 200 MB, so anything above is a typo (``--resolution 100000000`` would try to allocate petabytes).
MAX_RESOLUTION = 4096
# ``--verify-images``: decode every image before the work starts ('auto': when there are at most this many).
VERIFY_IMAGES = ("auto", "all", "none")
AUTO_VERIFY_LIMIT = 20_000
# datasets' packaged builders (parquet, imagefolder, arrow, ...): a --dataset of that name needs --data-files.
_PACKAGED_BUILDERS = frozenset(getattr(datasets.packaged_modules, "_PACKAGED_DATASETS_MODULES", ()))
# The help of the dataset flags, one wording for every command that has them (both trainers, sdt-extract-latents,
# sdt-classify).
DATASET_HELP = {
    "dataset": "a save_to_disk folder, or anything datasets.load_dataset takes: a Hub id (ILSVRC/imagenet-1k), a "
               "local folder of parquet/arrow/image files, or a builder name (parquet, imagefolder, arrow) with "
               "--data-files",
    "dataset_config": "load_dataset's config name (name=) of --dataset",
    "dataset_split": "split of --dataset (a saved DatasetDict's or load_dataset's)",
    "data_files": "load_dataset's data_files for --dataset: comma-separated paths or globs, or a JSON object of "
                  "split -> paths ('{\"train\": \"tr/*.parquet\", \"validation\": \"va/*.parquet\"}')",
    "image_column": "image column of --dataset",
    "label_column": "integer (ClassLabel) label column of --dataset",
    "streaming": "stream --dataset instead of loading it: refused, see docs/training.md (exact resume and the "
                 "seeded per-epoch order need a map-style dataset of known length)",
}


class DataInputError(ConfigError):
    """Unusable input data (folder, dataset, split, column, labels, image, latent cache); the message names it."""


class UnreadableImageError(DataInputError, OSError):
    """An image that cannot be decoded; the message names its file (or dataset row).

    Also an :class:`OSError`, the error a failed file read raises, so code that guards reads keeps catching it.
    """


def is_visible(name: str) -> bool:
    """Whether a file or folder name takes part in a class folder (names starting with ``.`` or ``__`` do not)."""
    return not name.startswith((".", "__"))


# Modes whose samples are 8-bit: PIL's ``convert("RGB")`` maps them to RGB without loss of range.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                             "LAB", "HSV"})


def image_mode_problem(mode: str) -> str | None:
    """Why an image of PIL ``mode`` cannot be turned into 8-bit RGB, or ``None`` when :func:`to_rgb` converts it.

    8-bit modes and 16-bit integer modes (``I;16``, ``I;16B`` ...: 16-bit PNG and TIFF) convert; 32-bit integer
    (``I``) and floating-point (``F``) images have no fixed white level, so any scaling would be a guess.
    """
    if mode in EIGHT_BIT_MODES or mode.startswith("I;16"):
        return None
    return (f"image mode {mode!r} ({'32-bit float' if mode == 'F' else '32-bit integer' if mode == 'I' else 'unusual'}"
            f" samples) has no fixed white level; save it as 8-bit or 16-bit RGB or grayscale")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, the one conversion every reader uses (training, classifiers, FID).

    16-bit images are scaled to 8 bits (``round(v / 257)``: 65535 becomes 255); PIL's own ``convert("RGB")``
    clips them, turning almost every pixel white.  A palette image with transparency goes through RGBA (its
    colours are kept, the alpha dropped, as for every image with alpha).

    Raises:
        ValueError: a mode :func:`image_mode_problem` refuses (32-bit integer or float samples).
    """
    mode = image.mode
    if mode.startswith("I;16"):
        values = np.asarray(image).astype(np.uint32)
        gray = ((values + 128) // 257).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    problem = image_mode_problem(mode)
    if problem is not None:
        raise ValueError(problem)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if mode == "RGB" else image.convert("RGB")


def open_image(value: Any, where: str) -> Image.Image:
    """Decode one image (a path, a PIL image, an array or a ``datasets`` cell ``{"bytes", "path"}``) to 8-bit RGB
    (:func:`to_rgb`: 16-bit images scaled, 32-bit and float images refused).

    Raises:
        UnreadableImageError: any decoder error or a refused mode, with ``where`` (the file or row) named.
    """
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
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        else:
            image = Image.fromarray(np.asarray(value))
        image.load()
        return to_rgb(image)
    except Exception as e:  # noqa: BLE001 - any decoder error, re-raised with the image named
        raise UnreadableImageError(f"cannot read image {where}: {type(e).__name__}: {e}") from e


class FolderRows:
    """The rows of a class folder, ``{"image": {"path", "bytes": None}}``, from a compact array of paths.

    Paths are kept as file-system bytes in one numpy array (about 50 MB for ImageNet's 1.28M files, shared
    with data-loader workers without per-object reference counts), so any file name, UTF-8 or not, works.
    """

    def __init__(self, root: str | os.PathLike, relative_paths: Sequence[bytes]) -> None:
        self.root = os.fsencode(root)
        self.paths = np.array(relative_paths, dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        """The file of row ``index``."""
        return os.fsdecode(os.path.join(self.root, bytes(self.paths[index])))

    def __getitem__(self, index: int) -> dict[str, dict[str, Any]]:
        return {"image": {"path": self.path(index), "bytes": None}}


@dataclass
class LabelledImages:
    """Images with integer labels from a class folder or a saved dataset; images are decoded on access.

    ``dataset`` holds the undecoded rows ``{image_column: cell}``: :class:`FolderRows` for a class folder, a
    ``datasets.Dataset`` (its image column only) for a saved or a ``load_dataset`` dataset.  ``origin`` holds the
    ``load_dataset`` arguments of the latter (``None`` otherwise).
    """

    description: str
    labels: np.ndarray
    class_names: list[str] | None
    num_classes: int
    dataset: Any
    image_column: str = "image"
    origin: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, index: int) -> str:
        """The file (or dataset row) of item ``index``, for messages."""
        if isinstance(self.dataset, FolderRows):
            return self.dataset.path(int(index))
        return f"row {int(index)} of {self.description}"

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these rows for a resumed run's data stream: ``{"source", "count", "bytes", "sha256"}``.

        A class folder is hashed by every file's class id, path inside its class folder and size (one ``stat`` per
        file; no image is read): an added, removed, renamed, resized or re-classed file changes the digest, a
        renamed class folder that keeps its place in the sorted listing does not (the class names are recorded
        beside it).  Modification times are left out on purpose: copying or restoring a dataset (``cp``,
        ``rsync`` without ``-t``, a fresh checkout) changes them without changing a single image.  A saved
        dataset is identified by ``datasets``' own fingerprint (kept by ``save_to_disk``, independent of the
        folder's location), its labels and the size of its Arrow files.  A ``load_dataset`` dataset likewise, plus its
        ``load_dataset`` arguments (id or resolved local path, config, split, data files); ``datasets``' fingerprint
        of it follows the Hub revision, or a local file's path and modification time (so a copied or touched local
        file counts as changed data).
        """
        digest = hashlib.sha256()
        total = 0
        if isinstance(self.dataset, FolderRows):
            source = "image folder"
            sep = os.sep.encode()
            for label, rel in zip(self.labels, self.dataset.paths):
                rel = bytes(rel)
                try:
                    size = os.stat(os.path.join(self.dataset.root, rel)).st_size
                except OSError:  # a broken link: the image checks name it; here it only counts as changed
                    size = -1
                total += max(size, 0)
                digest.update(b"%d\0%s\0%d\n" % (int(label), rel.split(sep, 1)[-1], size))
        else:
            source = "saved dataset" if self.origin is None else "load_dataset dataset"
            if self.origin is not None:
                digest.update(json.dumps(self.origin, sort_keys=True).encode() + b"\0")
            digest.update(str(getattr(self.dataset, "_fingerprint", None)).encode() + b"\0")
            digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
            for entry in getattr(self.dataset, "cache_files", None) or []:
                try:
                    total += os.stat(entry["filename"]).st_size
                except (OSError, KeyError, TypeError):
                    pass
        return {"source": source, "count": len(self), "bytes": total, "sha256": digest.hexdigest()}

    def image(self, index: int) -> Image.Image:
        """Item ``index`` as an RGB PIL image.

        Raises:
            UnreadableImageError: the image cannot be decoded (its file, or its row and stored name, named).
        """
        if isinstance(self.dataset, FolderRows):
            path = self.dataset.path(int(index))
            return open_image(path, path)
        cell = self.dataset[int(index)][self.image_column]
        where = self.where(index)
        if isinstance(cell, dict) and cell.get("path"):
            where += f" ({cell['path']})"
        return open_image(cell, where)


def _list_images(folder: Path, root: Path) -> list[bytes]:
    """Image files below ``folder`` (any depth, hidden entries skipped, each linked folder once) as paths relative
    to ``root``."""
    found = []
    rootb = os.fsencode(root)
    seen = {os.path.realpath(os.fsencode(folder))}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(folder), followlinks=True):
        keep = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if is_visible(os.fsdecode(d)) and real not in seen:  # a link loop is walked once
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            decoded = os.fsdecode(name)
            if is_visible(decoded) and os.path.splitext(decoded)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(dirpath, name), rootb))
    return found


def _named(flag: str | None, kind: str, path: str | os.PathLike) -> str:
    """How messages name an input: by the flag that gave it when known, else by its kind."""
    return f"{flag} {path}" if flag else f"{kind} {path}"


def load_image_folder(root: str | os.PathLike, flag: str | None = None) -> LabelledImages:
    """A class folder (see the module docstring), read from the file system (no ``datasets`` cache).

    Raises:
        DataInputError: not a directory, no class folders, or a class folder without images; the message starts
            with ``flag`` (the flag that named the folder) when given.
    """
    root = Path(root)
    name = _named(flag, "image folder", root)
    if not root.is_dir():
        raise DataInputError(f"{name}: not a directory")
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and is_visible(p.name))
    except OSError as e:
        raise DataInputError(f"{name}: {e}") from None
    if not classes:
        raise DataInputError(f"{name}: expected an image folder with one sub-folder per class, found none")
    files: list[tuple[bytes, int]] = []
    empty = []
    for label, class_name in enumerate(classes):
        images = _list_images(root / class_name, root)
        if not images:
            empty.append(class_name)
        files.extend((path, label) for path in images)
    if empty:
        shown = ", ".join(repr(n) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        which = f"class folder {shown} holds" if len(empty) == 1 else f"class folders {shown} hold"
        raise DataInputError(
            f"{name}: {which} no images ({len(empty)} of {len(classes)} classes); class ids follow the folder "
            f"listing, so remove the folder or add its images (any file PIL opens, e.g. .jpeg, .png, .webp)")
    files.sort()
    labels = np.array([label for _, label in files], dtype=np.int64)
    rows = FolderRows(root, [path for path, _ in files])
    return LabelledImages(f"image folder {root}", labels, classes, len(classes), rows)


def _labelled_rows(ds: Any, description: str, name: str, image_column: str, label_column: str,
                   origin: dict[str, Any] | None = None) -> LabelledImages:
    """The rows of one split (a saved or a ``load_dataset`` dataset): columns, labels and class names checked."""
    for column_flag, col in (("--image-column", image_column), ("--label-column", label_column)):
        if col not in ds.column_names:
            raise DataInputError(f"{name}: no column {col!r} ({column_flag}); columns: {ds.column_names}")
    if len(ds) == 0:
        raise DataInputError(f"{description}: no rows")
    feature = ds.features[label_column]
    names = [str(n) for n in feature.names] if isinstance(feature, datasets.ClassLabel) else None
    labels = _integer_labels(ds[label_column], description, label_column)
    num_classes = len(names) if names is not None else int(labels.max()) + 1
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    images = LabelledImages(description, labels, names, num_classes, ds.select_columns([image_column]), image_column,
                            origin)
    check_labels(images, num_classes, f"column {label_column!r}")
    return images


def _integer_labels(column: Any, description: str, label_column: str) -> np.ndarray:
    """A label column as int64: integers (or booleans) as they are, floats only when every value is a whole
    number (``1.5`` would otherwise be truncated to class 1); anything else refused."""
    def refuse(why: str) -> DataInputError:
        return DataInputError(f"{description}: column {label_column!r} does not hold integer labels ({why}); "
                              f"choose the label column with --label-column, or encode class names as ids first "
                              f"(datasets' class_encode_column)")
    try:
        raw = np.asarray(column)
    except (TypeError, ValueError) as e:
        raise refuse(str(e)) from None
    if raw.ndim != 1:
        raise DataInputError(f"{description}: column {label_column!r} holds arrays of shape {raw.shape[1:]}, "
                             f"expected one integer label per row")
    if raw.dtype.kind in "iub":
        return raw.astype(np.int64)
    if raw.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))
        if len(bad):
            raise refuse(f"{raw[bad[0]].item()!r} at row {int(bad[0])}")
        return raw.astype(np.int64)
    shown = raw[0].item() if isinstance(raw[0], np.generic) else raw[0]
    raise refuse(f"{type(shown).__name__} values such as {shown!r}")


def load_saved_dataset(path: str | os.PathLike, split: str | None = None, image_column: str = "image",
                       label_column: str = "label", flag: str | None = None,
                       split_flag: str = "--dataset-split") -> LabelledImages:
    """A ``save_to_disk`` dataset, or its ``split`` when it holds several (a ``DatasetDict``); images undecoded.

    Raises:
        DataInputError: not a saved dataset, a ``DatasetDict`` without ``split`` or without that split, a missing
            column, no rows, labels that are not integers in ``[0, classes)``.
    """
    name = _named(flag, "dataset", path)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise DataInputError(f"{name}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})") from None
    description = f"dataset {path}"
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise DataInputError(f"{name} holds the splits {list(ds)}; name one ({split_flag})")
        if split not in ds:
            raise DataInputError(f"{name}: no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
        description += f" split {split!r}"
    return _labelled_rows(ds, description, name, image_column, label_column)


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (it holds ``dataset_info.json`` or
    ``dataset_dict.json``)."""
    return (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()


def parse_data_files(text: str | None, flag: str = "--data-files") -> list[str] | dict[str, list[str]] | None:
    """``--data-files`` as ``load_dataset``'s ``data_files``: comma-separated paths or globs (a list), or a JSON
    object of split -> path/glob or list of them (a YAML mapping in a ``--config`` arrives as that JSON).

    Raises:
        DataInputError: an empty item, or JSON that is not such an object.
    """
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataInputError(f"{flag} {text!r}: not valid JSON ({e})") from None
        out = {}
        for split, files in value.items():
            files = [files] if isinstance(files, str) else files
            if not (isinstance(files, list) and files and all(isinstance(f, str) and f.strip() for f in files)):
                raise DataInputError(f"{flag} {text!r}: split {split!r} must map to a path or glob, or a list of them")
            out[str(split)] = [f.strip() for f in files]
        if not out:
            raise DataInputError(f"{flag} {text!r}: names no files")
        return out
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise DataInputError(f"{flag} {text!r}: an empty path between commas")
    return items


def refuse_streaming(streaming: bool, why: str) -> None:
    """``--streaming`` is refused (before any compute) with the command's reason ``why``.

    Raises:
        DataInputError: ``streaming`` is set.
    """
    if streaming:
        raise DataInputError(
            f"--streaming: {why}; drop --streaming (load_dataset then downloads and prepares the dataset once, in the "
            f"datasets cache), or prepare it once yourself with load_dataset(...).save_to_disk(...) and pass that "
            f"folder as --dataset")


def load_hf_dataset(dataset: str | os.PathLike, split: str | None = "train", image_column: str = "image",
                    label_column: str = "label", *, config: str | None = None,
                    data_files: str | Sequence[str] | dict[str, Any] | None = None, flag: str = "--dataset",
                    split_flag: str = "--dataset-split") -> LabelledImages:
    """``datasets.load_dataset(dataset, name=config, data_files=data_files, split=split)``: a Hub id, a local folder
    of data files, or a builder name with ``data_files``; map-style only; images undecoded.

    ``split=None`` takes the only split and refuses a choice among several.  Offline (``HF_DATASETS_OFFLINE=1``) a
    Hub id loads from the ``datasets`` cache or not at all.

    Raises:
        DataInputError: naming the flag and value: a dataset that cannot be loaded (offline, no such folder or Hub
            id), an unknown config or split, a builder name without ``data_files``, and :func:`load_saved_dataset`'s
            column and label errors.
    """
    dataset = str(dataset)
    name = f"{flag} {dataset}"
    if dataset in _PACKAGED_BUILDERS and not os.path.isdir(dataset):
        if data_files is None:
            raise DataInputError(f"{name}: the {dataset!r} builder reads the files named by --data-files; give them "
                                 f"(e.g. --data-files 'data/train-*.{'parquet' if dataset == 'parquet' else '*'}')")
        if config:  # load_dataset would take any name here as a mere label, and ignore it
            raise DataInputError(f"--dataset-config {config!r} of {name}: the {dataset!r} builder has no configs; "
                                 f"drop --dataset-config")
    try:
        ds = datasets.load_dataset(dataset, name=config, data_files=data_files, split=split)
    except Exception as e:  # noqa: BLE001 - any loading error, re-raised naming the flag and the value
        text = f"{type(e).__name__}: {e}"
        if isinstance(e, ValueError) and "BuilderConfig" in str(e):
            raise DataInputError(f"--dataset-config {config!r} of {name}: {text}") from None
        if isinstance(e, ValueError) and "Unknown split" in str(e):
            raise DataInputError(f"{split_flag} {split!r} of {name}: {text}") from None
        if isinstance(e, ConnectionError):
            raise DataInputError(
                f"{name}: not a local folder, and load_dataset cannot fetch it as a Hub dataset ({text}); offline "
                f"(HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1) a Hub dataset must already be in the datasets cache; "
                f"otherwise check the id and the network") from None
        raise DataInputError(f"{name}: load_dataset failed ({text})") from None
    description = f"dataset {dataset}" + (f" config {config!r}" if config else "")
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataInputError(f"{name} holds the splits {list(ds)}; name one ({split_flag})")
        split, ds = next(iter(ds.items()))
    if not isinstance(ds, datasets.Dataset):
        raise DataInputError(f"{name}: load_dataset gave a {type(ds).__name__}, not a map-style dataset")
    description += f" split {split!r}"
    where = str(Path(dataset).resolve()) if os.path.exists(dataset) else dataset
    origin = {"path": where, "name": config, "split": split, "data_files": data_files}
    return _labelled_rows(ds, description, name, image_column, label_column, origin)


def open_dataset(dataset: str | os.PathLike, split: str | None = "train", image_column: str = "image",
                 label_column: str = "label", *, config: str | None = None,
                 data_files: str | Sequence[str] | dict[str, Any] | None = None, flag: str = "--dataset",
                 split_flag: str = "--dataset-split") -> LabelledImages:
    """``--dataset``: a ``save_to_disk`` folder (detected first, read exactly as :func:`load_saved_dataset` does)
    or else anything ``datasets.load_dataset`` takes (:func:`load_hf_dataset`).

    Raises:
        DataInputError: ``config`` or ``data_files`` given for a saved folder, or the readers' errors.
    """
    if os.path.isdir(dataset) and is_saved_dataset(Path(dataset)):
        given = [f for f, v in (("--dataset-config", config), ("--data-files", data_files)) if v]
        if given:
            raise DataInputError(f"{flag} {dataset} is a save_to_disk folder (read with load_from_disk), which "
                                 f"takes no {' or '.join(given)}; drop {' and '.join(given)}")
        return load_saved_dataset(dataset, split, image_column, label_column, flag, split_flag)
    return load_hf_dataset(dataset, split, image_column, label_column, config=config, data_files=data_files,
                           flag=flag, split_flag=split_flag)


def open_labelled_images(path: str | os.PathLike, split: str | None = None, image_column: str = "image",
                         label_column: str = "label", flag: str | None = None) -> LabelledImages:
    """A saved dataset (a folder with ``dataset_dict.json`` or ``dataset_info.json``) or else a class folder.

    Raises:
        DataInputError: see :func:`load_saved_dataset` and :func:`load_image_folder`.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataInputError(f"{_named(flag, 'data', path)}: not a directory (an image folder or a saved dataset; "
                             f"--dataset takes a Hub id or data files)")
    if is_saved_dataset(path):
        return load_saved_dataset(path, split, image_column, label_column, flag)
    return load_image_folder(path, flag)


def load_image_source(
    data_dir: str | os.PathLike | None = None,
    dataset: str | os.PathLike | None = None,
    split: str | None = "train",
    image_column: str = "image",
    label_column: str = "label",
    folder_flag: str = "--data-dir",
    *,
    config: str | None = None,
    data_files: str | Sequence[str] | dict[str, Any] | None = None,
    dataset_flag: str = "--dataset",
    split_flag: str = "--dataset-split",
) -> LabelledImages:
    """The training commands' two flags: a class folder (``data_dir``, errors naming ``folder_flag``) or a dataset
    (``dataset``, :func:`open_dataset`: a saved folder or anything ``load_dataset`` takes, errors naming
    ``dataset_flag``; ``split`` picks the split).

    Raises:
        DataInputError: neither or both given, or the reader's errors.
    """
    if (data_dir is None) == (dataset is None):
        raise DataInputError(f"pass exactly one of {folder_flag}, {dataset_flag}")
    if data_dir is not None:
        return load_image_folder(data_dir, folder_flag)
    return open_dataset(dataset, split, image_column, label_column, config=config, data_files=data_files,
                        flag=dataset_flag, split_flag=split_flag)


def check_labels(images: LabelledImages, num_classes: int, what: str = "labels") -> None:
    """Every label must lie in ``[0, num_classes)``.

    Raises:
        DataInputError: naming the first offending label and where it is.
    """
    bad = np.flatnonzero((images.labels < 0) | (images.labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataInputError(
            f"{images.description}: {what} {int(images.labels[i])} at {images.where(i)} is out of range for "
            f"{num_classes} classes ({len(bad)} label(s) outside [0, {num_classes}))")


def find_unreadable_images(images: LabelledImages, indices: Sequence[int] | None = None,
                           progress: bool = False) -> list[str]:
    """Decode every image of ``indices`` (default all); returns one message per image that fails, naming it."""
    indices = range(len(images)) if indices is None else indices
    problems = []
    for i in tqdm(indices, desc="checking images", disable=not progress, dynamic_ncols=True):
        try:
            images.image(int(i))
        except UnreadableImageError as e:
            problems.append(str(e))
    return problems


def verify_images(sets: Sequence[LabelledImages], mode: str = "auto", accelerator: Any | None = None,
                  progress: bool = False) -> int:
    """The ``--verify-images`` check of every command that reads images for training (both trainers, latent
    extraction): decode every image of ``sets`` before the work starts, split across the processes of
    ``accelerator`` (``None``: this process alone), and refuse the data if any image fails.

    ``mode`` is ``"all"``, ``"none"`` or ``"auto"`` (all when ``sets`` hold at most :data:`AUTO_VERIFY_LIMIT`
    images together, else none).  A zero-byte file, a file that is not an image under an image extension or a
    truncated image is refused here, naming it, rather than stopping the run when the data loader reaches it.

    Returns:
        the number of images this process decoded (0 when the check was skipped).

    Raises:
        DataInputError: naming up to 5 unreadable images and their count (on every process alike).
    """
    if mode not in VERIFY_IMAGES:
        raise DataInputError(f"--verify-images must be one of {list(VERIFY_IMAGES)}, got {mode!r}")
    total = sum(len(s) for s in sets)
    if mode == "none" or (mode == "auto" and total > AUTO_VERIFY_LIMIT):
        return 0
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    problems, checked = [], 0
    for images in sets:
        mine = range(rank, len(images), world)
        problems += find_unreadable_images(images, mine, progress=progress)
        checked += len(mine)
    if world > 1:
        problems = [p for part in gather_object([problems]) for p in part]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataInputError(f"{len(problems)} unreadable image(s): {'; '.join(problems[:5])}{more}; remove or "
                             f"replace them (--verify-images none skips this check)")
    return checked


def class_names_to_id2label(names: Sequence[str] | None, num_classes: int) -> dict[int, str] | None:
    """id2label for an exported model: folder / ``ClassLabel`` names; WordNet ids of a 1000-class folder
    (ImageNet's ``n01440764`` ...) and unnamed 1000-class data get the shipped ImageNet names (else ``None``)."""
    if names is None or (len(names) == 1000 and all(_SYNSET.match(n) for n in names)):
        return default_id2label(num_classes)
    return {i: str(n) for i, n in enumerate(names)}
