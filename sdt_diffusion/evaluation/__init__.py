"""Evaluation: FID-50K sampling from pipeline folders and the ADM metrics. It reads pipelines, never training.

The metrics need the ``eval`` extra (torch-fidelity, scipy):

- :mod:`.formulas`: Fréchet distance, Inception Score, precision/recall on feature arrays;
- :mod:`.images`: sample and reference image readers (ADM ``.npz``, folders, arrays) and the input errors;
- :mod:`.inception`: the Inception-V3 feature extractor, loaded without unpickling;
- :mod:`.reference`: the reference batch (images and/or ADM statistics) and its cached features;
- :mod:`.evaluate`: :func:`compute_metrics`, the Markdown table and the ``eval/evaluate.py`` command line;
- :mod:`.sampling`: distributed sampling of a pipeline folder into an ADM ``.npz`` (``eval/sample.py``).
"""

from .evaluate import (
    ALL_METRICS,
    PAPER_RESULTS,
    build_parser,
    compute_metrics,
    evaluate_main,
    format_markdown_table,
)
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
