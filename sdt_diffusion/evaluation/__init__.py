"""Evaluation: FID-50K sampling from pipeline folders and the ADM metrics. It reads pipelines, never training.

The metrics need the ``eval`` extra (torch-fidelity, scipy):

- :mod:`.formulas`: Fréchet distance, Inception Score, precision/recall on feature arrays;
- :mod:`.images`: sample and reference image readers (ADM ``.npz``, folders, arrays) and the input errors;
- :mod:`.inception`: the Inception-V3 feature extractor, loaded without unpickling;
- :mod:`.reference`: the reference batch (images and/or ADM statistics) and its cached features;
- :mod:`.evaluate`: :func:`compute_metrics`, the Markdown table and the ``sdt-fid`` command line;
- :mod:`.sampling`: distributed sampling of a pipeline folder into an ADM ``.npz`` (``sdt-fid-sample``);
- :mod:`.classification`: top-1 / top-5 of a saved classifier (``sdt-classify``).

The names of :mod:`.evaluate` are imported on first use, so ``python -m sdt_diffusion.evaluation.evaluate`` runs
that module once (as ``__main__``) instead of after a second import by this package.
"""

from __future__ import annotations

import importlib
from typing import Any

from .formulas import feature_statistics, frechet_distance, inception_score, precision_recall
from .images import (
    ArrayImages,
    EvaluationInputError,
    FolderImages,
    ImageSource,
    MissingInputError,
    NpzImages,
    open_images,
)
from .inception import InceptionFeatures, extract_features, load_inception
from .reference import Reference, default_cache_dir, open_reference, reference_features

__all__ = [
    "ALL_METRICS",
    "ArrayImages",
    "EvaluationInputError",
    "FolderImages",
    "ImageSource",
    "InceptionFeatures",
    "MissingInputError",
    "NpzImages",
    "PAPER_RESULTS",
    "Reference",
    "build_parser",
    "compute_metrics",
    "default_cache_dir",
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

# Names of .evaluate, imported on first access (PEP 562).
_FROM_EVALUATE = ("ALL_METRICS", "PAPER_RESULTS", "build_parser", "compute_metrics", "evaluate_main",
                  "format_markdown_table")


def __getattr__(name: str) -> Any:
    if name in _FROM_EVALUATE:
        return getattr(importlib.import_module(".evaluate", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_EVALUATE))
