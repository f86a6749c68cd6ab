"""The model card of an export, from the run folder: the facts :mod:`sdt_diffusion.hub` writes into ``README.md``,
and the upload of a finished run's export.

Both trainers and ``sdt-export`` read the same records of a run (``train_config.yaml``, ``metrics.jsonl``,
``samples/step-<step>.png``), each up to the step of the exported weights, so a card made by ``sdt-export`` from
a checkpoint says what the trainer's own export at that step said.  A checkpoint moved out of its run folder
still gets a card, with what its weights and ``training_state.json`` tell.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data import is_saved_dataset
from ..hub import CardFacts, Metric, data_name, fid_metrics, known_datasets, push_folder
from ..models import count_parameters
from ..utils.safe_yaml import load_yaml
from .tracking import METRICS_FILE

__all__ = ["SAMPLES_DIR", "classifier_card_facts", "grid_of_step", "pipeline_card_facts", "push_export",
           "read_metrics", "read_run_config"]

logger = logging.getLogger("sdt_diffusion.training")

RUN_CONFIG = "train_config.yaml"
SAMPLES_DIR = "samples"
_GRID = re.compile(r"step-(\d+)\.png")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """``<run>/train_config.yaml`` (the flags and resolved values), ``{}`` where missing or unreadable."""
    try:
        config = load_yaml(Path(run_dir) / RUN_CONFIG)
    except (OSError, ValueError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def read_metrics(run_dir: str | Path, up_to_step: int) -> list[dict[str, Any]]:
    """The records of ``<run>/metrics.jsonl`` at or before ``up_to_step`` (a line cut short by a crash skipped)."""
    try:
        text = (Path(run_dir) / METRICS_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= up_to_step:
            records.append(record)
    return records


def _last(records: list[dict[str, Any]], key: str) -> tuple[int, float] | None:
    """``(step, value)`` of the last record holding the number ``key``."""
    for record in reversed(records):
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return record["step"], float(value)
    return None


def grid_of_step(run_dir: str | Path, step: int) -> Path | None:
    """The newest sample grid ``<run>/samples/step-<n>.png`` with ``n <= step``, or ``None``."""
    folder = Path(run_dir) / SAMPLES_DIR
    if not folder.is_dir():
        return None
    grids = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _GRID.fullmatch(p.name)) and p.is_file()]
    grids = [g for g in grids if g[0] <= step]
    return max(grids)[1] if grids else None


def _training_data(config: Mapping[str, Any]) -> str | None:
    """The training data as the card names it (the last two parts of its path; a ``--dataset`` that is no local
    path, a Hub id or a builder name, as given)."""
    for key, what in (("latents_dir", "latent cache"), ("data_dir", "image folder"), ("dataset", "dataset")):
        if config.get(key):
            value = str(config[key])
            if key == "dataset" and not Path(value).exists():
                return f"{value} (load_dataset)"
            if key == "dataset" and is_saved_dataset(Path(value)):
                what = "saved dataset"
            return f"{data_name(value)} ({what})"
    return None


def _init_source(config: Mapping[str, Any]) -> str | None:
    """The ``--init-from`` source of the run as the card names it (``train_config.yaml``'s ``init_from``)."""
    init = config.get("init_from")
    if not isinstance(init, Mapping) or not init.get("source"):
        return None
    details = [str(init.get("kind", "?")), f"{init.get('weights', 'saved')} weights"]
    if init.get("step") is not None:
        details.append(f"step {init['step']:,}" if isinstance(init["step"], int) else f"step {init['step']}")
    if init.get("sha256"):
        details.append(f"sha256 {str(init['sha256'])[:12]}")
    source = str(init["source"])  # a local folder by its last two parts (as the data), a Hub id as it is
    return f"{data_name(source) if Path(source).expanduser().exists() else source} ({', '.join(details)})"


def pipeline_card_facts(transformer: torch.nn.Module, id2label: Mapping[int, str] | None, run_dir: str | Path | None,
                        step: int, *, location: str, repo_id: str | None = None, license: str | None = None,
                        fid_results: Mapping[str, Any] | None = None, model: str | None = None) -> CardFacts:
    """The card of a pipeline export of ``transformer`` at ``step``: the run's recipe, its held-out loss up to
    ``step``, its newest sample grid up to ``step`` and the ``sdt-fid`` numbers given (``run_dir=None``: no run
    records)."""
    config = read_run_config(run_dir) if run_dir is not None else {}
    records = read_metrics(run_dir, step) if run_dir is not None else []
    model_config = dict(transformer.config)
    metrics: list[Metric] = []
    held_out = data_name(config.get("eval_data_dir")) or "held-out images"
    for key, name in (("eval_loss_ema", "held-out loss (EMA weights)"), ("eval_loss", "held-out loss (online)")):
        found = _last(records, key)
        if found is not None:
            metrics.append(Metric("loss", name, found[1], f"{held_out}, step {found[0]:,}"))
    if fid_results is not None:
        metrics += fid_metrics(fid_results)
    batch = config.get("global_batch_size")
    recipe = {
        "objective": "ε-prediction, DiT's hybrid loss (MSE + VB)" if model_config.get("learn_sigma", True)
        else "ε-prediction, MSE",
        "optimizer": f"AdamW, lr {config['learning_rate']:g}, weight decay {config.get('weight_decay', 0):g}"
        if isinstance(config.get("learning_rate"), int | float) else None,
        "global batch": batch,
        "EMA decay": config.get("ema_decay"),
        "label dropout": model_config.get("class_dropout_prob"),
        "resolution": config.get("resolution"),
        "VAE": config.get("vae") or ("the run's (see the pipeline's vae/)" if config else None),
        "mixed precision": config.get("mixed_precision"),
        "seed": config.get("seed"),
        "initialised from": _init_source(config),
        "exported weights": "EMA",
    }
    labels = dict(id2label or {})
    grid = grid_of_step(run_dir, step) if run_dir is not None else None
    caption = (f"EMA samples of step {int(_GRID.fullmatch(grid.name).group(1)):,}, one per sample class "
               f"(`--sample-classes`), {config.get('sample_steps', '?')} DDPM steps, guidance scale "
               f"{config.get('guidance_scale', '?')}:" if grid is not None else "")
    return CardFacts(
        kind="pipeline", model=model or config.get("model") or type(transformer).__name__,
        architecture=type(transformer).__name__, parameters=count_parameters(transformer, trainable_only=False),
        config=model_config, id2label=labels, step=step, decay=model_config.get("decay_mode"), recipe=recipe,
        data=_training_data(config), datasets=known_datasets(labels), metrics=tuple(metrics),
        samples=grid, samples_caption=caption, repo_id=repo_id, location=location, license=license)


def classifier_card_facts(model: torch.nn.Module, model_config: Mapping[str, Any], id2label: Mapping[int, str],
                          run_dir: str | Path, step: int, weights: str, best: Mapping[str, Any] | None, *,
                          location: str, repo_id: str | None = None, license: str | None = None) -> CardFacts:
    """The card of a classifier export at ``step`` holding the ``weights`` (``ema``/``online``; ``best``: the
    best evaluation they come from): the run's recipe and the top-1/top-5 of those weights."""
    config = read_run_config(run_dir)
    records = read_metrics(run_dir, step)
    validation = data_name(config.get("eval_data_dir") or config.get("eval_dataset")) or "validation images"
    metrics: list[Metric] = []
    if best:
        where = f"{validation}, step {best['step']:,} (the best evaluation, {best.get('weights')} weights)"
        metrics += [Metric("accuracy", f"top-{k} accuracy (%)", float(best[f"top{k}"]), where) for k in (1, 5)
                    if isinstance(best.get(f"top{k}"), int | float)]
    else:
        suffix = "_ema" if weights == "ema" else ""
        for k in (1, 5):
            found = _last(records, f"eval_top{k}{suffix}")
            if found is not None:
                where = f"{validation}, step {found[0]:,} ({weights} weights)"
                metrics.append(Metric("accuracy", f"top-{k} accuracy (%)", found[1], where))
    lr = config.get("learning_rate_scaled")
    recipe = {
        "epochs": config.get("epochs") if not config.get("max_steps") else None,
        "global batch": config.get("global_batch_size"),
        "optimizer": f"AdamW, peak lr {lr:g} (cosine to {config.get('min_lr', 0):g}), weight decay "
                     f"{config.get('weight_decay', 0):g}" if isinstance(lr, int | float) else None,
        "warm-up steps": config.get("warmup_steps"),
        "EMA decay": config.get("ema_decay"),
        "stochastic depth": model_config.get("drop_path_rate"),
        "augmentation": ", ".join(f"{k} {config[k]}" for k in ("auto_augment", "mixup", "cutmix", "smoothing",
                                                                 "reprob", "repeated_aug") if config.get(k) is not None)
        or None,
        "resolution": config.get("resolution"),
        "initialised from": _init_source(config),
        "exported weights": weights,
        "seed": config.get("seed"),
    }
    modes = model_config.get("decay_modes")
    return CardFacts(
        kind="classifier", model=config.get("model") or type(model).__name__, architecture="SDTHForImageClassification",
        parameters=count_parameters(model, trainable_only=False), config=dict(model_config), id2label=dict(id2label),
        step=step, decay=", ".join(modes) if isinstance(modes, list | tuple) else modes, recipe=recipe,
        data=_training_data(config), datasets=known_datasets(id2label), metrics=tuple(metrics), repo_id=repo_id,
        location=location, license=license)


def push_export(settings: Any, folder: Path) -> str:
    """Upload a finished run's export (``--push-to-hub``; the caller is the main process); returns the URL.

    Raises:
        HubError: the upload failed.
    """
    hub = settings.hub
    logger.info("uploading %s to the Hub repository %s", folder, hub.hub_model_id)
    url = push_folder(folder, hub.hub_model_id, private=hub.hub_private, token=hub.hub_token,
                      commit_message=f"Upload {folder.name} of {settings.output_dir.name} (sdt-diffusion)")
    logger.info("uploaded to %s", url)
    return url
