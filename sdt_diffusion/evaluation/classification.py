"""Image-classification evaluation: top-1 / top-5 of a saved classifier with the standard evaluation transform.

The transform is the one SDT-H's paper inherits from RMT (and DeiT, Swin): resize the short side to
``resolution / 0.875`` (256 for 224) with bicubic interpolation, centre-crop ``resolution``, normalise with
ImageNet's mean and std.  Data: an image folder with one sub-folder per class (ImageNet's ``train`` / ``val``
layout) or a ``datasets`` folder written by ``save_to_disk`` with an image and a label column, or ``--dataset``:
also anything ``datasets.load_dataset`` takes (a Hub id, local data files; not streamed).  Models: a
transformers folder (``save_pretrained``; SDT-H's or any ``AutoModelForImageClassification``), a timm folder
(``timm.models.save_for_hf``: ``config.json`` with ``architecture``) or a timm weight file with its
architecture named.  Data classes are matched to the model's by name (its ``id2label``; :func:`check_classes`),
so a folder with only some of the model's classes is scored against the right ones.

The data reader is :mod:`sdt_diffusion.data`'s (re-exported here: :func:`open_labelled_images`,
:class:`LabelledImages`, :func:`check_labels`, ...).  The training loop (``sdt_diffusion.training.classifier_trainer``)
evaluates with the same transform, reader and top-k counts, so a number it logs and a number ``eval/classify.py``
prints mean the same thing.  This module never imports training code.

    python eval/classify.py runs/sdt-h-t/model /data/imagenet/val --output top1.json
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification

from ..data import (
    DATASET_HELP,
    MAX_RESOLUTION,
    DataInputError,
    FolderRows,
    LabelledImages,
    TransformedImages,
    check_labels,
    class_names_to_id2label,
    find_unreadable_images,
    open_dataset,
    open_labelled_images,
    parse_data_files,
    refuse_streaming,
)
from ..models.sdt_h import IMAGENET_MEAN, IMAGENET_STD, PRESET_OF_TIMM_NAME, SDT_H_PRESETS, SDTH
from ..utils.cli_args import add_deprecated_alias
from ..utils.files import atomic_write_text, check_writable
from ..utils.optional import import_optional
from ..utils.runtime import MAX_NUM_WORKERS, MAX_PER_DEVICE_BATCH, default_device

__all__ = [
    "DEFAULT_CROP_PCT",
    "MAX_RESOLUTION",
    "PAPER_TABLE1",
    "ClassificationInputError",
    "LabelledImages",
    "LoadedClassifier",
    "TransformedImages",
    "check_classes",
    "check_labels",
    "classify",
    "classify_main",
    "count_topk",
    "eval_transform",
    "evaluate_classifier",
    "find_unreadable_images",
    "load_classifier",
    "markdown_rows",
    "open_data",
    "open_labelled_images",
    "preset_of",
    "summarise",
]

DEFAULT_CROP_PCT = 0.875  # 224 / 256
# Paper, Table 1 (ImageNet-1K, 224x224): parameters (M), GFLOPs, top-1 (%).
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "SDT-H-T": {"params_m": 14, "gflops": 2.7, "top1": 82.7},
    "SDT-H-S": {"params_m": 27, "gflops": 4.8, "top1": 84.2},
    "SDT-H-B": {"params_m": 54, "gflops": 10.8, "top1": 85.1},
    # RMT (Fan et al. 2024) as the paper's Table 1 lists it (the baseline SDT-H is compared against)
    "RMT-T": {"params_m": 14, "gflops": 2.5, "top1": 82.4},
    "RMT-S": {"params_m": 27, "gflops": 4.5, "top1": 84.1},
    "RMT-B": {"params_m": 54, "gflops": 9.7, "top1": 85.0},
}


# Unusable evaluation input (data folder, dataset, labels, image, model folder); the message names it.  The data
# layer's error, so one ``except`` catches a bad model folder and bad data alike (a ConfigError: exit status 2).
ClassificationInputError = DataInputError
# Why --streaming is refused: the data's classes are matched to the model's, and every label checked, first.
STREAMING_REASON = ("the data's classes are matched to the model's and every label is checked before any image is "
                    "classified, which needs a map-style dataset")


# ------------------------------------------------------------------------------------------- transform
def eval_transform(resolution: int = 224, crop_pct: float = DEFAULT_CROP_PCT,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   interpolation: str = "bicubic") -> transforms.Compose:
    """Resize the short side to ``floor(resolution / crop_pct)`` (256 for 224), centre-crop ``resolution``,
    to a float tensor, normalise (RMT's and timm's evaluation transform)."""
    if resolution <= 0 or not 0 < crop_pct <= 1:
        raise ValueError(f"resolution must be > 0 and crop_pct in (0, 1], got {resolution} and {crop_pct}")
    mode = transforms.InterpolationMode(interpolation)
    return transforms.Compose([
        transforms.Resize(math.floor(resolution / crop_pct), interpolation=mode),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize(list(mean), list(std)),
    ])


# ------------------------------------------------------------------------------------------- counting
def count_topk(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows have their label among the ``k`` highest logits, for each ``k`` (capped at the classes)."""
    k_max = min(max(ks), logits.shape[-1])
    top = logits.topk(k_max, dim=-1).indices
    hits = top.eq(labels[:, None])
    return [int(hits[:, : min(k, k_max)].any(dim=-1).sum()) for k in ks]


def evaluate_classifier(logits_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, device: torch.device,
                        batch_size: int = 256, num_workers: int = 4, indices: Sequence[int] | None = None,
                        progress: bool = False, desc: str = "eval") -> torch.Tensor:
    """Sums over ``dataset`` (or its ``indices``): a float64 tensor ``[images, top-1 hits, top-5 hits, summed
    cross-entropy]`` on ``device``, ready for an all-reduce across processes."""
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    if len(subset) == 0:
        return sums
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    with torch.no_grad():
        for pixels, labels in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
            pixels, labels = pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = logits_fn(pixels).float()
            if logits.shape[-1] <= int(labels.max()):
                raise ClassificationInputError(f"label {int(labels.max())} is out of range for a model with "
                                               f"{logits.shape[-1]} classes")
            top1, top5 = count_topk(logits, labels)
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            sums += torch.tensor([len(labels), top1, top5, loss.item()], dtype=torch.float64, device=device)
    return sums


def summarise(sums: torch.Tensor) -> dict[str, float]:
    """``{"top1", "top5" (percent), "loss" (mean cross-entropy), "images"}`` from :func:`evaluate_classifier` sums."""
    n, top1, top5, loss = (float(v) for v in sums.tolist())
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "images": int(sums[0].item())}


# ------------------------------------------------------------------------------------------------ models
def preset_of(sdt_h_kwargs: dict[str, Any]) -> str | None:
    """The preset (SDT-H or RMT) whose architecture the kwargs have, else ``None``.

    Widths, depths, heads and MLP ratios fix the size and must be given; the decay modes, the output gate's rank
    and the RoPE layout tell SDT-H-T from RMT-T (same size, different attention) and are compared when the kwargs
    give them (an SDT-H name comes first in the table, so size alone names the SDT-H preset).
    """
    sizes = ("embed_dims", "depths", "num_heads", "mlp_ratios")
    attention = ("decay_modes", "gate_rank", "rope_layout")
    defaults = {name: p.default for name, p in inspect.signature(SDTH.__init__).parameters.items()}

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return [str(x) if isinstance(x, str) else float(x) for x in a] == [
                str(y) if isinstance(y, str) else float(y) for y in b]
        return a == b

    for name, preset in SDT_H_PRESETS.items():
        if all(k in sdt_h_kwargs and same(sdt_h_kwargs[k], preset[k]) for k in sizes) and all(
                same(sdt_h_kwargs[k], preset.get(k, defaults.get(k))) for k in attention if k in sdt_h_kwargs):
            return name
    return None


@dataclass
class LoadedClassifier:
    """A classifier ready to call on normalised pixels, with what its folder says about its inputs and classes."""

    model: torch.nn.Module
    kind: str  # "transformers" or "timm"
    num_labels: int
    id2label: dict[int, str] | None
    resolution: int | None  # the input side its folder records (None: unknown)
    crop_pct: float = DEFAULT_CROP_PCT
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    preset: str | None = None  # SDT-H-T / S / B when the architecture is a preset's
    config: dict[str, Any] = field(default_factory=dict)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels) if self.kind == "transformers" else self.model(pixels)
        return out.logits if hasattr(out, "logits") else out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ClassificationInputError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise ClassificationInputError(f"{path}: expected a JSON object")
    return value


def _load_transformers(folder: Path, config: dict[str, Any]) -> LoadedClassifier:
    model = AutoModelForImageClassification.from_pretrained(str(folder))
    processor = folder / "preprocessor_config.json"
    info: dict[str, Any] = {}
    if processor.is_file():
        p = _read_json(processor)
        size = p.get("size") or {}
        info["resolution"] = (size.get("shortest_edge") or size.get("height")) if isinstance(size, dict) else size
        info["crop_pct"] = float(p.get("crop_pct") or DEFAULT_CROP_PCT)
        if p.get("image_mean") and p.get("image_std"):
            info["mean"], info["std"] = tuple(p["image_mean"]), tuple(p["image_std"])
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    preset = preset_of(config) if config.get("model_type") == "sdt_h" else None
    return LoadedClassifier(model, "transformers", int(model.config.num_labels), id2label or None,
                            info.pop("resolution", None), preset=preset, config=config, **info)


def _timm_info(model: torch.nn.Module, kind_config: dict[str, Any]) -> dict[str, Any]:
    data = import_optional("timm.data", "timm").resolve_data_config({}, model=model)
    names = getattr(model, "pretrained_cfg", {}).get("label_names")
    id2label = ({i: str(n) for i, n in enumerate(names)} if isinstance(names, (list, tuple))
                else {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None)
    args = kind_config.get("model_args") or {}
    return dict(id2label=id2label, resolution=int(data["input_size"][-1]), crop_pct=float(data["crop_pct"]),
                mean=tuple(data["mean"]), std=tuple(data["std"]), interpolation=str(data["interpolation"]),
                preset=preset_of({**_preset_defaults(kind_config.get("architecture")), **args}))


def _preset_defaults(architecture: str | None) -> dict[str, Any]:
    """The preset arguments behind a timm SDT-H name (``sdt_h_tiny`` ...), else nothing."""
    preset = PRESET_OF_TIMM_NAME.get(architecture or "")
    return dict(SDT_H_PRESETS[preset]) if preset is not None else {}


def _load_timm_folder(folder: Path, config: dict[str, Any]) -> LoadedClassifier:
    timm = import_optional("timm", "timm")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    return LoadedClassifier(model, "timm", int(model.num_classes), config=config, **_timm_info(model, config))


def _load_timm_file(path: Path, arch: str, model_kwargs: dict[str, Any]) -> LoadedClassifier:
    timm = import_optional("timm", "timm")
    state = timm.models.load_state_dict(str(path), weights_only=True)  # never unpickles code
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)
    classifier = model.pretrained_cfg.get("classifier")
    weight = state.get(f"{classifier}.weight") if classifier else None
    if weight is None:
        raise ClassificationInputError(f"{path}: no {classifier}.weight (the classifier of timm's {arch})")
    model.reset_classifier(int(weight.shape[0]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        given = f"--model-kwargs {json.dumps(model_kwargs)}" if model_kwargs else "its default arguments"
        raise ClassificationInputError(f"{path}: the weights do not fit timm's {arch} with {given}: "
                                       f"{str(e).splitlines()[0]}") from None
    config = {"architecture": arch, "model_args": model_kwargs}
    return LoadedClassifier(model, "timm", int(model.num_classes), config=config, **_timm_info(model, config))


def load_classifier(path: str | os.PathLike, arch: str | None = None,
                    model_kwargs: dict[str, Any] | None = None) -> LoadedClassifier:
    """A saved classifier in eval mode on the CPU.

    ``path`` is a transformers folder (``config.json`` with ``model_type``), a timm folder (``config.json`` with
    ``architecture``, as ``timm.models.save_for_hf`` writes), a folder holding a ``timm/`` sub-folder and nothing
    else usable (then that), or a timm weight file (``.safetensors``, ``.pth``; ``arch`` names its timm model and
    ``model_kwargs`` its arguments).  ``import sdt_diffusion`` registers SDT-H with both libraries.

    Raises:
        ClassificationInputError: nothing loadable at ``path``.
    """
    path = Path(path)
    try:
        return _load_classifier(path, arch, model_kwargs)
    except ClassificationInputError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown architectures, pickled or damaged weights: one line naming it
        first = (str(e).strip().splitlines() or [""])[0][:300]
        what = f" as timm's {arch!r}" if arch and path.is_file() else ""
        raise ClassificationInputError(f"{path}: cannot load the model{what} ({type(e).__name__}: {first})") from None


def _load_classifier(path: Path, arch: str | None, model_kwargs: dict[str, Any] | None) -> LoadedClassifier:
    """:func:`load_classifier` without its error translation."""
    if path.is_file():
        if not arch:
            raise ClassificationInputError(f"{path} is a weight file: name its timm architecture (--arch, e.g. "
                                           f"sdt_h_tiny) and any --model-kwargs")
        timm = import_optional("timm", "timm")
        if not timm.is_model(arch):
            close = [n for n in timm.list_models(f"*{arch.split('_')[0]}*")][:5]
            raise ClassificationInputError(f"--arch {arch!r} is not a timm architecture"
                                           + (f" (similar: {', '.join(close)})" if close else ""))
        loaded = _load_timm_file(path, arch, dict(model_kwargs or {}))
    elif (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if "model_type" in config:
            loaded = _load_transformers(path, config)
        elif "architecture" in config:
            loaded = _load_timm_folder(path, config)
        else:
            raise ClassificationInputError(f"{path / 'config.json'}: neither a transformers config (model_type) nor "
                                           f"a timm config (architecture)")
    elif (path / "timm" / "config.json").is_file():
        return _load_classifier(path / "timm", None, None)
    else:
        raise ClassificationInputError(f"{path}: no model here (expected a transformers or timm folder with "
                                       f"config.json, or a weight file)")
    loaded.model.eval()
    return loaded


_GENERIC_NAME = re.compile(r"^(LABEL_|class )\d+$")  # transformers' and the label index's placeholder names


def _model_names(model: LoadedClassifier) -> list[str] | None:
    """The model's class names by id, or ``None`` when it has none, or only placeholders (``LABEL_0`` ...)."""
    if not model.id2label:
        return None
    names = [model.id2label.get(i) for i in range(model.num_labels)]
    if any(n is None for n in names) or all(_GENERIC_NAME.match(n) for n in names):
        return None
    return names


def check_classes(model: LoadedClassifier, images: LabelledImages) -> LabelledImages:
    """The data with its labels renumbered to the model's class ids, matched by class name.

    A class folder numbers its classes by its own listing, so a folder with only some of the model's classes (or
    a validation folder missing one) would score images against the wrong class.  Where both name their classes,
    each data class becomes the model class of the same name (the data's names as the exported model records
    them: :func:`~sdt_diffusion.data.class_names_to_id2label`, e.g. a full ImageNet folder's WordNet ids become
    ImageNet's names).  Where either does not (a saved dataset without ``ClassLabel`` names, a model with only
    ``LABEL_i`` placeholders), labels are taken as model ids and must cover the model's classes exactly or lie
    below its class count (a saved dataset's stored ids).

    Raises:
        ClassificationInputError: a data class name the model does not know (named), a name the model uses for
            two classes, a class folder whose classes cannot be matched by name and whose count differs from the
            model's, or a label outside the model's classes.
    """
    model_names = _model_names(model)
    data_names = images.class_names
    if data_names is not None and model_names is not None:
        # the folder names themselves, or as an export names them (a full ImageNet folder's WordNet ids: ImageNet's
        # names), whichever the model knows
        exported = list((class_names_to_id2label(data_names, len(data_names)) or {}).values()) or data_names
        if model_names in (data_names, exported):
            check_labels(images, model.num_labels, "label")
            return images
        index: dict[str, int] = {}
        twice = set()
        for i, name in enumerate(model_names):
            if name in index:
                twice.add(name)
            index[name] = i
        if all(n in index for n in exported) and not all(n in index for n in data_names):
            data_names = exported
        unknown = [n for n in data_names if n not in index]
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ClassificationInputError(
                f"{images.description}: {len(unknown)} of its {len(data_names)} class(es) are not classes of the "
                f"model ({shown}); the model's classes are named by its id2label (e.g. {model_names[0]!r}), and "
                f"data classes are matched to them by name")
        ambiguous = sorted(twice.intersection(data_names))
        if ambiguous:
            raise ClassificationInputError(f"the model names several classes {ambiguous[0]!r}, so the data class of "
                                           f"that name cannot be matched to one of them")
        mapping = np.array([index[n] for n in data_names], dtype=np.int64)
        check_labels(images, len(data_names), "label")
        return dataclasses.replace(images, labels=mapping[images.labels], class_names=model_names,
                                   num_classes=model.num_labels)
    if isinstance(images.dataset, FolderRows) and images.num_classes != model.num_labels:
        raise ClassificationInputError(
            f"{images.description} has {images.num_classes} class folders and the model {model.num_labels} classes, "
            f"and the model does not name its classes (id2label), so the folders cannot be matched to its classes "
            f"(ids would follow the folder listing and score images against the wrong class); evaluate a folder "
            f"with all {model.num_labels} classes, or a model whose id2label holds the folder names")
    check_labels(images, model.num_labels, "label")
    return images


# ------------------------------------------------------------------------------------------------ report
def markdown_rows(result: dict[str, Any]) -> str:
    """A Markdown table: this evaluation's row, then the paper's Table 1 row of the same preset (SDT-H or RMT, if any)."""
    head = "| model | resolution | images | top-1 (%) | top-5 (%) | params (M) | source |\n|---|---|---|---|---|---|---|\n"
    name = result.get("preset") or "custom"
    params = f"{result['params'] / 1e6:.2f}" if result.get("params") else "–"
    row = (f"| {name} ({result['model']}) | {result['resolution']} | {result['images']} | {result['top1']:.2f} | "
           f"{result['top5']:.2f} | {params} | this evaluation |\n")
    paper = PAPER_TABLE1.get(result.get("preset") or "")
    if paper:
        row += (f"| {result['preset']} | 224 | 50000 (ImageNet-1K val) | {paper['top1']:.1f} | – | "
                f"{paper['params_m']:g} | paper, Table 1 |\n")
    return head + row


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``sdt-classify`` (``eval/classify.py``, ``python -m sdt_diffusion.evaluation.classification``)."""
    p = argparse.ArgumentParser(
        prog="sdt-classify",
        description="Top-1 / top-5 of a saved classifier (transformers or timm) on an image folder or a saved "
                    "dataset, with the standard evaluation transform (resize 256 bicubic -> centre crop 224, "
                    "ImageNet mean/std; sizes scale with --resolution).",
        epilog="example: sdt-classify runs/sdt-h-t/model /data/imagenet/val --output top1.json",
    )
    p.add_argument("model", help="transformers folder, timm folder, or timm weight file (with --arch)")
    p.add_argument("data", nargs="?", default=None,
                   help="image folder (one sub-folder per class) or a save_to_disk dataset (or give --dataset)")
    p.add_argument("--dataset", default=None, help=DATASET_HELP["dataset"] + " (instead of DATA)")
    p.add_argument("--dataset-config", default=None, help=DATASET_HELP["dataset_config"])
    p.add_argument("--dataset-split", default=None,
                   help=DATASET_HELP["dataset_split"] + ", e.g. validation (default: the only split)")
    p.add_argument("--data-files", default=None, help=DATASET_HELP["data_files"])
    p.add_argument("--image-column", default="image", help=DATASET_HELP["image_column"] + " or DATA (default image)")
    p.add_argument("--label-column", default="label", help=DATASET_HELP["label_column"] + " or DATA (default label)")
    p.add_argument("--streaming", action="store_true", help=f"stream --dataset: refused ({STREAMING_REASON})")
    p.add_argument("--resolution", type=int, default=None,
                   help="centre-crop side (default: the model folder's, else 224); the resize is resolution/0.875")
    p.add_argument("--crop-pct", type=float, default=None, help="crop fraction (default: the model's, else 0.875)")
    p.add_argument("--arch", default=None,
                   help="timm architecture of a weight file, e.g. sdt_h_tiny (default: read from the model folder)")
    p.add_argument("--model-kwargs", default=None,
                   help="JSON arguments of --arch, e.g. '{\"decay_modes\": ...}' (default: none)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward (default 128)")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding workers (default 4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--check-images", action="store_true", help="decode every image before evaluating")
    p.add_argument("--output", default=None, help="write the result as JSON to this file (default: print only)")
    p.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", default=True,
                   help="no progress bar")
    add_deprecated_alias(p, "--split", "--dataset-split")  # its name before --dataset came
    return p


def open_data(args: argparse.Namespace) -> LabelledImages:
    """DATA (an image folder or a saved dataset) or ``--dataset`` (also anything load_dataset takes).

    Raises:
        ClassificationInputError: neither or both, ``--streaming``, a load_dataset flag without ``--dataset``, or
            the reader's errors.
    """
    if (args.data is None) == (args.dataset is None):
        raise ClassificationInputError("pass exactly one of DATA (an image folder or a save_to_disk dataset) and "
                                       "--dataset")
    refuse_streaming(args.streaming, STREAMING_REASON)
    if args.data is not None:
        for flag_name, value in (("--dataset-config", args.dataset_config), ("--data-files", args.data_files)):
            if value:
                raise ClassificationInputError(f"{flag_name} {value!r} needs --dataset (it is load_dataset's "
                                               f"argument); DATA {args.data} is read as a folder")
        return open_labelled_images(args.data, args.dataset_split, args.image_column, args.label_column)
    return open_dataset(args.dataset, args.dataset_split, args.image_column, args.label_column,
                        config=args.dataset_config, data_files=parse_data_files(args.data_files))


def classify(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``args.model`` on ``args.data``; returns the JSON result (see :func:`classify_main`).

    Raises:
        ClassificationInputError: bad data, model or flags (before any image is classified).
    """
    if not 0 < args.batch_size <= MAX_PER_DEVICE_BATCH:
        raise ClassificationInputError(f"--batch-size must lie in [1, {MAX_PER_DEVICE_BATCH}], got {args.batch_size}")
    if not 0 <= args.num_workers <= MAX_NUM_WORKERS:
        raise ClassificationInputError(f"--num-workers must lie in [0, {MAX_NUM_WORKERS}], got {args.num_workers}")
    if args.resolution is not None and not 0 < args.resolution <= MAX_RESOLUTION:
        raise ClassificationInputError(f"--resolution must lie in [1, {MAX_RESOLUTION}], got {args.resolution}")
    if args.crop_pct is not None and not (math.isfinite(args.crop_pct) and 0 < args.crop_pct <= 1):
        raise ClassificationInputError(f"--crop-pct must lie in (0, 1], got {args.crop_pct}")
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise ClassificationInputError(f"--model-kwargs is not JSON: {e}") from None
    images = open_data(args)
    loaded = load_classifier(args.model, args.arch, kwargs)
    images = check_classes(loaded, images)
    if args.check_images:
        problems = find_unreadable_images(images, progress=args.progress_bar)
        if problems:
            raise ClassificationInputError(f"{len(problems)} unreadable image(s): " + "; ".join(problems[:5]))
    resolution = args.resolution if args.resolution is not None else (loaded.resolution or 224)
    crop_pct = args.crop_pct if args.crop_pct is not None else loaded.crop_pct
    transform = eval_transform(resolution, crop_pct, loaded.mean, loaded.std, loaded.interpolation)
    device = default_device(args.device)
    model = loaded.model.to(device)
    sums = evaluate_classifier(loaded.logits, TransformedImages(images, transform), device, args.batch_size,
                               args.num_workers, progress=args.progress_bar, desc="classify")
    result = {"model": str(args.model), "data": str(args.data if args.data is not None else args.dataset),
              "source": images.description, "kind": loaded.kind, "preset": loaded.preset,
              "params": sum(p.numel() for p in model.parameters()), "resolution": resolution,
              "resize": math.floor(resolution / crop_pct), "crop_pct": crop_pct, "num_classes": loaded.num_labels,
              **summarise(sums)}
    if loaded.preset in PAPER_TABLE1:
        result["paper_table1"] = PAPER_TABLE1[loaded.preset]
    result["markdown"] = markdown_rows(result)
    return result


def classify_main(argv: Sequence[str] | None = None) -> int:
    """``sdt-classify``: prints ``top-1`` / ``top-5`` and a Markdown row; exit 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output:
        output = Path(args.output).resolve()
        data = args.data if args.data is not None else args.dataset
        for role, named in (("model", args.model), ("data", data)):
            given = Path(named).resolve() if named is not None else None
            if given is not None and (output == given or given in output.parents):
                print(f"{parser.prog}: error: --output {args.output} is {'inside ' if output != given else ''}the "
                      f"{role} {named}; name another file for the result", file=sys.stderr, flush=True)
                return 2
        try:
            check_writable(args.output)  # before any image is classified, not after
        except OSError as e:
            print(f"{parser.prog}: error: --output {e}", file=sys.stderr, flush=True)
            return 2
    try:
        result = classify(args)
    except ClassificationInputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  ({result['images']} images, "
          f"{result['resolution']}px, {result['kind']} model)")
    print(result["markdown"], end="")
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # python -m sdt_diffusion.evaluation.classification
    sys.exit(classify_main())
