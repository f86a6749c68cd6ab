"""FID-50K evaluation with the ADM evaluator's definitions: FID, sFID, Inception Score, precision, recall.

:func:`compute_metrics` opens the samples and the reference, checks that the requested metrics can be
computed before any Inception forward is spent, extracts features (the reference's from its on-disk cache when
possible) and applies the formulas of :mod:`.formulas`. :func:`evaluate_main` is the command line
``sdt-fid SAMPLES REFERENCE`` (also ``python -m sdt_diffusion.evaluation.evaluate`` and ``eval/evaluate.py``):
a JSON file and a Markdown table next to the SDT paper's rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..hub import read_fid_results
from ..utils.errors import ConfigError
from ..utils.files import atomic_write_text, check_writable
from ..utils.optional import import_optional
from ..utils.runtime import MAX_NUM_WORKERS, MAX_PER_DEVICE_BATCH, default_device
from .formulas import feature_statistics, frechet_distance, inception_score, precision_recall
from .images import EvaluationInputError, ImageSource, open_images
from .inception import FEATURE_EXTRACTOR_NAME, InceptionFeatures, extract_features, load_inception
from .reference import Reference, default_cache_dir, open_reference, reference_features

torch_fidelity = import_optional("torch_fidelity", "eval")  # the evaluation extra; the error names it

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_METRICS",
    "PAPER_RESULTS",
    "build_parser",
    "compute_metrics",
    "evaluate_main",
    "format_markdown_table",
    "is_results_file",
    "npz_has_statistics",
]

ALL_METRICS = ("fid", "sfid", "is", "pr")
PAPER_NUM_SAMPLES = 50_000  # the SDT paper's (and ADM's, DiT's) FID-50K

# Paper numbers (ImageNet 256×256, FID-50K, Table 2 of the SDT paper). None = not reported.
# Rows: (label, FID, sFID, IS, precision, recall).
PAPER_RESULTS: dict[str, list[tuple[str, float | None, float | None, float | None, float | None, float | None]]] = {
    "S": [("SDT-P-S/2 (paper, 400K)", 60.70, None, None, None, None),
          ("DiT-S/2 (paper, 400K)", 68.40, None, None, None, None)],
    "B": [("SDT-P-B/2 (paper, 400K)", 37.47, None, None, None, None),
          ("DiT-B/2 (paper, 400K)", 43.47, None, None, None, None)],
    "L": [("SDT-P-L/2 (paper, 400K)", 21.28, None, None, None, None),
          ("DiT-L/2 (paper, 400K)", 23.33, None, None, None, None)],
    "XL": [("SDT-P-XL/2 (paper, 400K)", 18.20, None, None, None, None),
           ("DiT-XL/2 (paper, 400K)", 19.47, None, None, None, None),
           ("SDT-P-XL/2 (paper, 800K, batch 512)", 6.82, None, None, None, None)],
    "XL-G": [("SDT-P-XL/2-G (paper)", 2.25, 4.59, 279.85, 0.83, 0.58),
             ("DiT-XL/2-G (paper)", 2.27, 4.60, 278.24, 0.83, 0.57)],
}


# ----------------------------------------------------------------------------------------------------------
# Computing the metrics
# ----------------------------------------------------------------------------------------------------------


def npz_has_statistics(path: str | Path) -> bool:
    """Whether ``path`` is an ``.npz`` holding ADM reference statistics (``mu`` and ``sigma``); reads the zip's
    member list only."""
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".npz"):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False  # the reader names the damage
    return {"mu.npy", "sigma.npy"} <= names


def _check_argument_order(samples: Any, reference: Any) -> None:
    """Refuse samples that carry reference statistics while the reference does not: the two were swapped.

    OpenAI's ADM evaluator (``evaluator.py REFERENCE SAMPLES``) takes the reference first, this command the
    samples first; swapped, the scores come out plausible and wrong.

    Raises:
        EvaluationInputError: naming both files and both orders.
    """
    if not isinstance(samples, (str, Path)) or not npz_has_statistics(samples):
        return
    if isinstance(reference, Reference):
        ref_has_stats = reference.has_pool_stats
    else:
        ref_has_stats = isinstance(reference, (str, Path)) and npz_has_statistics(reference)
    if not ref_has_stats:
        raise EvaluationInputError(
            f"the samples {samples} hold reference statistics ('mu'/'sigma') and the reference {_label(reference)} "
            f"does not: the two look swapped. sdt-fid takes SAMPLES REFERENCE (samples first); OpenAI's ADM "
            f"evaluator takes REFERENCE SAMPLES. Run: sdt-fid {_label(reference)} {samples} (or name them: "
            f"--samples {_label(reference)} --reference {samples})")


def _label(source: Any) -> str:
    return source.label if isinstance(source, (Reference, ImageSource)) else \
        "<array>" if isinstance(source, np.ndarray) else str(source)


def _check_resolutions(src: ImageSource, ref: Reference, allow: bool) -> None:
    """Refuse samples whose size differs from the reference images' (e.g. 512 px samples against the 256 px
    ADM batch): Inception resizes both to 299 px, so the numbers look valid and compare nothing.

    Raises:
        EvaluationInputError: naming both sizes and ``--allow-resolution-mismatch``.
    """
    if allow or ref.images is None:
        return
    if (src.height, src.width) != (ref.images.height, ref.images.width):
        raise EvaluationInputError(
            f"the samples {src.label} are {src.height}×{src.width} and the reference images {ref.label} "
            f"{ref.images.height}×{ref.images.width}; FID against a reference of another resolution compares "
            f"nothing (pass --allow-resolution-mismatch, allow_resolution_mismatch=True, to score them anyway)")


def _computable_metrics(requested: set[str], ref: Reference) -> tuple[set[str], list[str]]:
    """The requested metrics that ``ref`` can serve, and a note for each one it cannot."""
    wanted, notes = set(requested), []
    if "pr" in wanted and ref.images is None:
        notes.append(f"{ref.label}: reference has statistics but no 'arr_0' images; precision/recall skipped (null)")
        wanted.discard("pr")
    if "sfid" in wanted and not ref.has_spatial_stats and ref.images is None:
        notes.append(f"{ref.label}: reference has no 'mu_s'/'sigma_s' and no images; sFID skipped (null)")
        wanted.discard("sfid")
    if "fid" in wanted and not ref.has_pool_stats and ref.images is None:
        notes.append(f"{ref.label}: reference has no 'mu'/'sigma' and no images; FID skipped (null)")
        wanted.discard("fid")
    return wanted, notes


def _needs_reference_images(wanted: set[str], ref: Reference) -> bool:
    """Whether the reference images must go through Inception: precision/recall, or statistics it lacks."""
    return ref.images is not None and (
        "pr" in wanted or ("fid" in wanted and not ref.has_pool_stats) or ("sfid" in wanted and not ref.has_spatial_stats)
    )


def _check_counts(wanted: set[str], src: ImageSource, ref: Reference, k: int, is_splits: int) -> None:
    """Raise :class:`EvaluationInputError` where an input holds too few images for a wanted metric."""
    if "pr" in wanted:
        assert ref.images is not None  # _computable_metrics drops "pr" otherwise
        for what, count, label in (("samples", src.count, src.label), ("reference images", ref.images.count, ref.label)):
            if count < k + 1:
                raise EvaluationInputError(f"{label}: precision/recall with k={k} needs at least {k + 1} {what}, got {count}")
    if "is" in wanted and src.count < is_splits:
        raise EvaluationInputError(f"{src.label}: Inception Score with {is_splits} splits needs at least {is_splits} samples, got {src.count}")
    if ({"fid", "sfid"} & wanted) and src.count < 2:
        raise EvaluationInputError(f"{src.label}: FID needs at least 2 samples, got {src.count}")
    if _needs_reference_images(wanted, ref) and ref.images.count < 2:
        raise EvaluationInputError(f"{ref.label}: need at least 2 reference images, got {ref.images.count}")


def _metric_values(
    wanted: set[str],
    sample_feats: dict[str, np.ndarray],
    ref_feats: dict[str, np.ndarray],
    ref_stats: dict[str, np.ndarray],
    *,
    k: int,
    is_splits: int,
    pr_batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """``fid``, ``sfid``, ``inception_score``, ``precision``, ``recall``: None where not wanted."""
    result: dict[str, Any] = dict.fromkeys(("fid", "sfid", "inception_score", "precision", "recall"))
    if "fid" in wanted:
        mu, sigma = feature_statistics(sample_feats["pool"])
        result["fid"] = frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"])
    if "sfid" in wanted:
        mu_s, sigma_s = feature_statistics(sample_feats["spatial"])
        result["sfid"] = frechet_distance(mu_s, sigma_s, ref_stats["mu_s"], ref_stats["sigma_s"])
    if "is" in wanted:
        result["inception_score"] = inception_score(sample_feats["logits"], splits=is_splits)
    if "pr" in wanted:
        result["precision"], result["recall"] = precision_recall(ref_feats["pool"], sample_feats["pool"], k=k,
                                                                 batch_size=pr_batch_size, device=device)
    return result


def _provenance(
    src: ImageSource,
    ref: Reference,
    wanted: set[str],
    model: InceptionFeatures,
    *,
    k: int,
    is_splits: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """What was measured and how: the inputs, where the reference statistics came from, every setting."""
    return dict(
        samples=src.label,
        reference=ref.label,
        num_samples=src.count,
        num_reference_images=ref.images.count if ref.images is not None else None,
        sample_resolution=[src.height, src.width],
        reference_resolution=[ref.images.height, ref.images.width] if ref.images is not None else None,
        reference_statistics={
            "fid": ("npz" if ref.has_pool_stats else "computed") if "fid" in wanted else None,
            "sfid": ("npz" if ref.has_spatial_stats else "computed") if "sfid" in wanted else None,
        },
        settings={
            "metrics": [m for m in ALL_METRICS if m in wanted],
            "feature_extractor": f"torch-fidelity {FEATURE_EXTRACTOR_NAME}",
            "inception_weights": model.weights_source,
            "inception_weights_sha256": model.weights_id,
            "fid_features": "pool_3 (2048)",
            "sfid_features": "Mixed_6d.branch1x1 (mixed_6/conv), channels 0-6, 17x17 -> 2023",
            "is_splits": is_splits,
            "pr_k": k,
            "pr_distance": "squared euclidean, float64",
            "batch_size": batch_size,
            "device": str(device),
            "torch": torch.__version__,
            "torch_fidelity": getattr(torch_fidelity, "__version__", "unknown"),
        },
    )


def compute_metrics(
    samples: str | Path | np.ndarray | ImageSource,
    reference: str | Path | np.ndarray | ImageSource | Reference,
    *,
    inception_weights: str | Path | None = None,
    model: InceptionFeatures | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    metrics: Sequence[str] = ALL_METRICS,
    k: int = 3,
    is_splits: int = 10,
    pr_batch_size: int = 5000,
    progress: bool = True,
    allow_resolution_mismatch: bool = False,
) -> dict[str, Any]:
    """FID, sFID, Inception Score, precision and recall of ``samples`` against ``reference`` (ADM definitions).

    ``samples``: ADM ``.npz`` (``arr_0``), image folder or uint8 N×H×W×3 array. ``reference``: the same, or an
    ADM reference ``.npz`` whose ``mu``/``sigma``/``mu_s``/``sigma_s`` are used for FID/sFID and whose ``arr_0``
    images serve precision/recall. Metrics that cannot be computed (or are not in ``metrics``) are None, with
    the reason in ``result["warnings"]``. Bad inputs raise :class:`EvaluationInputError` before any compute,
    among them the two inputs swapped (ADM's evaluator takes the reference first) and samples of another
    resolution than the reference images (unless ``allow_resolution_mismatch``).
    """
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    _check_argument_order(samples, reference)
    src = open_images(samples, role="samples")
    ref = reference if isinstance(reference, Reference) else open_reference(reference)
    _check_resolutions(src, ref, allow_resolution_mismatch)
    wanted, notes = _computable_metrics(set(metrics), ref)
    for message in notes:
        warnings.warn(message, stacklevel=2)
    _check_counts(wanted, src, ref, k, is_splits)

    dev = default_device(device) if model is None else model.device
    if model is None:
        model = load_inception(inception_weights, dev)
    ref_feats: dict[str, np.ndarray] = {}
    if _needs_reference_images(wanted, ref):
        ref_feats = reference_features(ref.images, model, cache_dir=(cache_dir or default_cache_dir()) if use_cache else None,
                                       batch_size=batch_size, num_workers=num_workers, progress=progress)
    sample_feats = extract_features(src.batches(batch_size, num_workers), model, total=src.count,
                                    desc="Inception features (samples)", progress=progress)

    ref_stats = {**ref_feats, **ref.stats}  # stored ADM statistics take precedence over recomputed ones
    result = _metric_values(wanted, sample_feats, ref_feats, ref_stats, k=k, is_splits=is_splits,
                            pr_batch_size=pr_batch_size, device=dev)
    result.update(_provenance(src, ref, wanted, model, k=k, is_splits=is_splits, batch_size=batch_size, device=dev),
                  warnings=notes)
    return result


# ----------------------------------------------------------------------------------------------------------
# Reporting and command line
# ----------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_markdown_table(result: dict[str, Any], name: str, compare: str | None = None) -> str:
    """A Markdown table ``| model | FID | sFID | IS | Prec | Rec |`` with our row and, optionally, the paper's."""
    rows = [(name, result.get("fid"), result.get("sfid"), result.get("inception_score"),
             result.get("precision"), result.get("recall"))]
    if compare is not None:
        if compare not in PAPER_RESULTS:
            raise ValueError(f"unknown --compare {compare!r}; choose from {sorted(PAPER_RESULTS)}")
        rows += PAPER_RESULTS[compare]
    lines = ["| model | FID | sFID | IS | Prec | Rec |", "|---|---|---|---|---|---|"]
    for label, fid, sfid, isc, prec, rec in rows:
        lines.append(f"| {label} | {_fmt(fid)} | {_fmt(sfid)} | {_fmt(isc)} | {_fmt(prec)} | {_fmt(rec)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``sdt-fid`` (``eval/evaluate.py``)."""
    p = argparse.ArgumentParser(
        prog="sdt-fid",
        description="FID / sFID / Inception Score / precision / recall with the ADM evaluator's definitions "
        "(torch-fidelity inception-v3-compat features).",
        epilog="example: sdt-fid samples.npz VIRTUAL_imagenet256_labeled.npz --output results.json --compare XL",
    )
    p.add_argument("samples", nargs="?", default=None,
                   help="samples: ADM-style .npz (arr_0 uint8 N×H×W×3) or a folder of png/jpg images (first; "
                   "ADM's evaluator.py takes them second)")
    p.add_argument("reference", nargs="?", default=None,
                   help="reference: ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz), an .npz with "
                   "arr_0, or an image folder")
    p.add_argument("--samples", dest="samples_flag", metavar="SAMPLES", default=None,
                   help="the samples, named (instead of the first argument)")
    p.add_argument("--reference", dest="reference_flag", metavar="REFERENCE", default=None,
                   help="the reference, named (instead of the second argument)")
    p.add_argument("--output", type=Path, default=None,
                   help="write the results as JSON to this file (default: print only); an existing file is replaced "
                   "only when it is an earlier sdt-fid result, or with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="let --output replace an existing file that is not an sdt-fid result")
    p.add_argument("--allow-resolution-mismatch", action="store_true",
                   help="score samples whose size differs from the reference images' (default: refused)")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="local weights-inception-2015-12-05-6726825d.pth (default: download via torch hub)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default 64)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"reference feature cache (default {default_cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the reference feature cache")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help=f"image-decoding workers for folders (default {min(4, os.cpu_count() or 1)}: min(4, CPUs))")
    p.add_argument("--compare", choices=sorted(PAPER_RESULTS), default=None,
                   help="print the SDT paper's Table 2 numbers for this size next to ours (default: none)")
    p.add_argument("--name", default=None, help="model name for the table row (default: samples file name)")
    p.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default {','.join(ALL_METRICS)}: all)")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall (default 3)")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10, as ADM for 50K)")
    p.add_argument("--pr-batch-size", type=int, default=5000, help="block size of the distance computations (default 5000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    return p


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: compute the metrics, optionally write JSON, print a Markdown table."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    # Named inputs take their role; the positional ones fill the other roles in order (samples, then reference).
    positionals = [x for x in (args.samples, args.reference) if x is not None]
    free = [role for role in ("samples", "reference") if getattr(args, f"{role}_flag") is None]
    if len(positionals) > len(free):
        parser.error(f"too many inputs ({', '.join(positionals)} beside the named ones): give SAMPLES REFERENCE, or "
                     f"--samples SAMPLES --reference REFERENCE")
    for role in ("samples", "reference"):
        value = getattr(args, f"{role}_flag")
        if value is None:
            value = positionals.pop(0) if positionals else None
        if value is None:
            parser.error(f"no {role}: sdt-fid SAMPLES REFERENCE, or --samples SAMPLES --reference REFERENCE")
        setattr(args, role, value)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if min(args.batch_size, args.k, args.pr_batch_size, args.is_splits) < 1 or args.num_workers < 0:
        parser.error("--batch-size, --k, --is-splits and --pr-batch-size must be positive, --num-workers >= 0")
    if args.batch_size > MAX_PER_DEVICE_BATCH:
        parser.error(f"--batch-size must lie in [1, {MAX_PER_DEVICE_BATCH}], got {args.batch_size}")
    if args.num_workers > MAX_NUM_WORKERS:
        parser.error(f"--num-workers must lie in [0, {MAX_NUM_WORKERS}], got {args.num_workers}")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics or set(metrics) - set(ALL_METRICS):
        parser.error(f"--metrics must be a comma-separated subset of {','.join(ALL_METRICS)}")
    if args.output is not None:
        problem = _output_problem(args.output, args.samples, args.reference, args.overwrite)
        if problem:
            parser.error(f"--output {_printable(problem)}")
        try:
            check_writable(args.output)  # before hours of Inception features, not after
        except OSError as e:
            parser.error(f"--output {_printable(str(e))}")
    try:
        result = compute_metrics(
            args.samples, args.reference, inception_weights=args.inception_weights, device=args.device,
            batch_size=args.batch_size, num_workers=args.num_workers, cache_dir=args.cache_dir,
            use_cache=not args.no_cache, metrics=metrics, k=args.k, is_splits=args.is_splits, pr_batch_size=args.pr_batch_size,
            progress=not args.quiet, allow_resolution_mismatch=args.allow_resolution_mismatch,
        )
    except EvaluationInputError as e:
        parser.exit(2, f"{parser.prog}: error: {_printable(str(e))}\n")
    name = _printable(args.name or Path(args.samples).name)
    result["name"] = name
    print(format_markdown_table(result, name, args.compare), flush=True)  # first: the numbers are never lost
    if args.compare is not None and result.get("num_samples") != PAPER_NUM_SAMPLES:
        note = (f"the paper's rows are FID-50K; this row scores {result.get('num_samples')} samples (FID is biased "
                f"upward for fewer samples), so the two do not compare")
        result.setdefault("warnings", []).append(note)
        print(f"{parser.prog}: warning: {note}", file=sys.stderr, flush=True)
    if args.output is not None:
        try:
            atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
        except OSError as e:
            parser.exit(1, f"{parser.prog}: error: cannot write --output {args.output} ({e}); the table above "
                           f"holds the numbers\n")
        logger.info("wrote %s", args.output)
    return 0


def is_results_file(path: str | Path) -> bool:
    """Whether ``path`` holds an ``sdt-fid`` result (a JSON object with its ``fid``, ``samples`` and ``settings``)."""
    try:
        read_fid_results(path)  # the one definition, shared with the model cards (sdt-export --fid-results)
    except ConfigError:
        return False
    return True


def _output_problem(output: Path, samples: str, reference: str, overwrite: bool) -> str | None:
    """Why ``--output`` must not be written, or ``None``: it is one of the inputs (a tab-completion slip would
    replace it with the JSON), or an existing file that is not an earlier result (without ``--overwrite``)."""
    for role, given in (("samples", samples), ("reference", reference)):
        same = output.exists() and Path(given).exists() and os.path.samefile(output, given)
        if same or output.resolve() == Path(given).resolve():
            return f"{output} is the {role} input; name another file for the results"
    if output.is_file() and not overwrite and not is_results_file(output):
        return (f"{output} exists and is not an sdt-fid result; refusing to replace it (pass --overwrite to "
                f"replace it anyway)")
    return None


def _printable(text: str) -> str:
    """``text`` with undecodable file-name bytes shown as ``\\xNN`` (printing them would fail)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


if __name__ == "__main__":  # python -m sdt_diffusion.evaluation.evaluate
    sys.exit(evaluate_main())
