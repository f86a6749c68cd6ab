"""Model cards of exported models and their upload to the Hugging Face Hub.

Every export (an ``SDTPipeline`` folder of the diffusion trainer or ``sdt-export``, an SDT-H classifier folder of
the classification trainer) carries a ``README.md`` written by :func:`write_model_card` from :class:`CardFacts`:
YAML front matter (``huggingface_hub.ModelCardData``: the library, tags, the dataset and metric names where
known, the license only where given) and a body saying what the model is, how it was trained, what it scores
(held-out loss, ``sdt-fid --output`` results, top-1), a sample grid (``samples.png``) and how to load it.  The
trainers and ``sdt-export`` gather the facts from the run folder; this module imports no training code.

:func:`push_folder` uploads a folder with ``huggingface_hub.HfApi`` (``create_repo(exist_ok=True)`` then
``upload_folder``); :func:`check_hub_flags` refuses ``--push-to-hub`` without what it needs before any work.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .utils.errors import ConfigError
from .utils.labels import get_imagenet_id2label, short_name

__all__ = [
    "CARD_FILE",
    "FID_METRICS",
    "SAMPLES_FILE",
    "CardFacts",
    "HubError",
    "Metric",
    "check_hub_flags",
    "data_name",
    "fid_metrics",
    "known_datasets",
    "model_card",
    "push_folder",
    "read_fid_results",
    "write_model_card",
]

CARD_FILE = "README.md"
SAMPLES_FILE = "samples.png"
TAGS = ["sdt-diffusion", "spatial-decay-transformer"]
IMAGENET_DATASET = "ILSVRC/imagenet-1k"  # the Hub's ImageNet-1K, named when the classes are its 1000
# the keys of an sdt-fid result (read_fid_results; evaluation.evaluate.is_results_file) and the card's names
# for its metrics
RESULT_KEYS = ("fid", "samples", "reference", "settings")
FID_METRICS = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision",
               "recall": "Recall"}
MAX_RESULTS_BYTES = 1 << 20


class HubError(RuntimeError):
    """An upload to the Hub failed (network, permissions, a bad token); commands print it as one line."""


@dataclass(frozen=True)
class Metric:
    """One number of the card: its metric id (``fid``, ``loss``, ``accuracy``), label, value and what it was
    measured on."""

    type: str
    name: str
    value: float
    measured_on: str


@dataclass(frozen=True)
class CardFacts:
    """What a card says about an export (everything optional is left out of the card when unknown)."""

    kind: str  # "pipeline" (an SDTPipeline folder) or "classifier" (an SDT-H transformers folder with timm/)
    model: str  # the preset (SDT-P-XL/2, DiT-S/2, SDT-H-T) or the model class
    architecture: str  # the model class
    parameters: int
    config: Mapping[str, Any]  # the model config
    id2label: Mapping[int, str]
    step: int  # the optimizer step of the exported weights
    decay: str | None = None  # the decay mode(s)
    recipe: Mapping[str, Any] = field(default_factory=dict)  # label -> value, in order (None: left out)
    data: str | None = None  # the training data, as the card names it
    datasets: tuple[str, ...] = ()  # Hub dataset ids, where known
    metrics: tuple[Metric, ...] = ()
    samples: Path | None = None  # a sample grid, copied into the folder as samples.png
    samples_caption: str = "Samples:"
    repo_id: str | None = None  # the Hub repository (the load snippet names it)
    location: str = "pipeline"  # the export folder; without a repo_id the load snippet names path/to/<its name>
    # (never the whole local path: exports of the same weights in two run folders are the same files)
    license: str | None = None
    notes: tuple[str, ...] = ()  # extra lines for the training section

    def __post_init__(self) -> None:
        if self.kind not in ("pipeline", "classifier"):
            raise ValueError(f"CardFacts.kind must be 'pipeline' or 'classifier', got {self.kind!r}")


# ---------------------------------------------------------------------------------------------- facts
def data_name(path: str | os.PathLike | None) -> str | None:
    """How a card names a data folder: its last two path parts (``imagenet/train``), never the whole local path."""
    if not path:
        return None
    parts = Path(str(path)).expanduser().resolve().parts[-2:]
    return "/".join(p for p in parts if p not in ("/", "\\")) or str(path)


def known_datasets(id2label: Mapping[int, str] | None) -> tuple[str, ...]:
    """The Hub dataset the classes name: ImageNet-1K for its 1000 classes (the trainers give ImageNet folders and
    unnamed 1000-class data its names), else none."""
    if id2label and len(id2label) == 1000 and dict(id2label) == get_imagenet_id2label():
        return (IMAGENET_DATASET,)
    return ()


def read_fid_results(path: str | os.PathLike) -> dict[str, Any]:
    """The ``sdt-fid --output`` JSON at ``path`` (an object with ``fid``, ``samples``, ``reference`` and
    ``settings``).

    Raises:
        ConfigError: naming ``path``: missing, unreadable, too large, not JSON or not an sdt-fid result.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RESULTS_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"--fid-results {path}: {e.strerror or e}") from None
    if len(raw) > MAX_RESULTS_BYTES:
        raise ConfigError(f"--fid-results {path}: larger than {MAX_RESULTS_BYTES} bytes; not an sdt-fid result")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"--fid-results {path}: not JSON ({e})") from None
    if not isinstance(value, dict) or not set(RESULT_KEYS) <= value.keys():
        raise ConfigError(f"--fid-results {path}: not an sdt-fid --output result (expected the keys "
                          f"{', '.join(RESULT_KEYS)})")
    return value


def fid_metrics(results: Mapping[str, Any]) -> tuple[Metric, ...]:
    """The numbers of an ``sdt-fid`` result (those it computed), measured on its samples against its reference."""
    count = results.get("num_samples")
    reference = Path(str(results.get("reference") or "the reference")).name
    where = f"{count:,} samples against {reference}" if isinstance(count, int) else f"samples against {reference}"
    return tuple(Metric(key, name, float(results[key]), where) for key, name in FID_METRICS.items()
                 if isinstance(results.get(key), int | float) and not isinstance(results.get(key), bool))


# ----------------------------------------------------------------------------------------------- card
def _card_data(facts: CardFacts) -> ModelCardData:
    pipeline = facts.kind == "pipeline"
    tags = [*TAGS, "class-conditional", "image-generation"] if pipeline else [
        *TAGS, "sdt-h", "image-classification", "timm"]
    metric_ids = list(dict.fromkeys(m.type for m in facts.metrics))
    return ModelCardData(library_name="diffusers" if pipeline else "transformers", tags=tags,
                         license=facts.license, datasets=list(facts.datasets) or None, metrics=metric_ids or None,
                         pipeline_tag=None if pipeline else "image-classification")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)


def _cell(text: Any) -> str:
    """``text`` for a Markdown table cell (a ``|`` would end the cell)."""
    return str(text).replace("|", "/").replace("\n", " ")


def _classes(id2label: Mapping[int, str], limit: int = 10) -> str:
    names = [short_name(id2label[i]) for i in sorted(id2label)[:limit]]
    more = f", ... ({len(id2label)} in all)" if len(id2label) > limit else ""
    return _cell(", ".join(names) + more)


def _load_snippet(facts: CardFacts) -> str:
    where = facts.repo_id or f"path/to/{Path(facts.location).name}"
    if facts.kind == "pipeline":
        first = sorted(facts.id2label)[:2] or [0]
        return "\n".join([
            "```python", "import torch", "from sdt_diffusion import SDTPipeline  # pip install sdt-diffusion", "",
            f'pipe = SDTPipeline.from_pretrained("{where}")',
            f"images = pipe(class_labels={first}, guidance_scale=4.0, num_inference_steps=250,",
            "              generator=torch.Generator().manual_seed(0)).images", "```", "",
            "`SDTPipeline` is a third-party pipeline: load it with `SDTPipeline.from_pretrained`, not "
            "`DiffusionPipeline.from_pretrained`. Class labels are ids or names (`pipe.labels` lists them)."])
    timm_dir = (f'snapshot_download("{where}", allow_patterns="timm/*") + "/timm"' if facts.repo_id
                else f'"{Path(where, "timm").as_posix()}"')
    return "\n".join([
        "```python", "import sdt_diffusion  # pip install \"sdt-diffusion[timm]\"; registers SDT-H with transformers "
        "and timm", "from transformers import pipeline", "",
        f'classify = pipeline("image-classification", model="{where}")',
        'classify("cat.jpg")', "",
        "# the same weights in timm's format (timm/)", "import timm",
        *(["from huggingface_hub import snapshot_download"] if facts.repo_id else []),
        f'model = timm.create_model("local-dir:" + {timm_dir}, pretrained=True)', "```", "",
        f'`sdt_diffusion.SDTHForImageClassification.from_pretrained("{where}")` loads the transformers model itself.'])


def _body(facts: CardFacts, samples: bool) -> str:
    pipeline = facts.kind == "pipeline"
    what = ("a class-conditional diffusion model (an `SDTPipeline`: the transformer, its VAE where it denoises "
            "latents, and DiT's DDPM scheduler)" if pipeline else "an SDT-H image classifier (transformers, with timm's format in `timm/`)")
    title = f"{facts.model} ({'sdt-diffusion pipeline' if pipeline else 'SDT-H classifier'})"
    lines = [f"# {title}", "", f"{facts.model}, trained with sdt-diffusion, is {what}.", "",
             "## Model", "", "| | |", "|---|---|", f"| preset | {facts.model} |",
             f"| architecture | `{facts.architecture}` |", f"| parameters | {facts.parameters:,} |"]
    if facts.decay:
        lines.append(f"| decay mode | {facts.decay} |")
    lines += [f"| classes | {len(facts.id2label)}: {_classes(facts.id2label)} |" if facts.id2label else
              "| classes | unknown |", "",
              "<details><summary>model config</summary>", "", "```json",
              json.dumps({k: v for k, v in facts.config.items() if not str(k).startswith("_")}, indent=2,
                         sort_keys=True, default=str), "```", "", "</details>", ""]
    lines += ["## Training", "", "| | |", "|---|---|", f"| steps | {facts.step:,} |"]
    if facts.data:
        lines.append(f"| data | {_cell(facts.data)} |")
    if facts.datasets:
        lines.append(f"| dataset | {', '.join(facts.datasets)} |")
    lines += [f"| {label} | {_cell(_value(value))} |" for label, value in facts.recipe.items() if value is not None]
    lines += ["", *facts.notes, *([""] if facts.notes else [])]
    lines += ["## Metrics", ""]
    if facts.metrics:
        lines += ["| metric | value | measured on |", "|---|---|---|"]
        lines += [f"| {m.name} | {m.value:.4g} | {_cell(m.measured_on)} |" for m in facts.metrics]
    else:
        lines.append("None measured yet" + (" (no held-out data; score samples with `sdt-fid` and pass "
                                            "`sdt-export --fid-results`)." if pipeline else " (no validation data)."))
    lines.append("")
    if samples:
        lines += ["## Samples", "", facts.samples_caption, "",
                  f"![samples]({SAMPLES_FILE})", ""]
    lines += ["## How to load it", "", _load_snippet(facts), ""]
    return "\n".join(lines)


def model_card(facts: CardFacts, samples: bool | None = None) -> ModelCard:
    """The card of an export (``samples``: whether ``samples.png`` is shown; default: when ``facts.samples``)."""
    samples = facts.samples is not None if samples is None else samples
    return ModelCard(f"---\n{_card_data(facts).to_yaml()}\n---\n\n{_body(facts, samples)}")


def write_model_card(folder: str | os.PathLike, facts: CardFacts) -> Path:
    """Write ``README.md`` (and ``samples.png``, a copy of ``facts.samples`` where it exists) into ``folder``;
    returns the card's path.  Called on the export's temporary folder, before it is swapped in."""
    folder = Path(folder)
    samples = facts.samples is not None and Path(facts.samples).is_file()
    if samples:
        shutil.copyfile(facts.samples, folder / SAMPLES_FILE)
    path = folder / CARD_FILE
    path.write_text(str(model_card(facts, samples)), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- push
def check_hub_flags(push: bool, repo_id: str | None, token: str | None) -> None:
    """``--push-to-hub`` needs a valid ``--hub-model-id`` and a token (``--hub-token``, ``HF_TOKEN`` or a saved
    login); checked before any work, without the network.  ``--hub-model-id`` alone is checked too (the card names
    it).

    Raises:
        ConfigError: naming the flag (never the token).
    """
    if push and not repo_id:
        raise ConfigError("--push-to-hub needs --hub-model-id (the repository, e.g. your-name/sdt-p-xl2)")
    if repo_id:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ConfigError(f"--hub-model-id {repo_id!r}: not a Hub repository id ({str(e).splitlines()[0]})") \
                from None
    if push and not (token or get_token()):
        raise ConfigError("--push-to-hub needs a Hub token: set HF_TOKEN, log in with `hf auth login`, or pass "
                          "--hub-token")


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload ``folder`` to the model repository ``repo_id`` (created if missing; ``private`` only for a new
    one); returns the commit's URL.  ``token=None``: ``HF_TOKEN`` or the saved login.

    Raises:
        HubError: the upload failed (one line, naming the repository).
    """
    folder = Path(folder)
    api = HfApi()
    try:
        api.create_repo(repo_id, token=token, private=private or None, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", token=token,
                                 commit_message=commit_message or f"Upload {folder.name} with sdt-diffusion")
    except Exception as e:  # noqa: BLE001 - network, HTTP and auth errors of huggingface_hub, as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"cannot upload {folder} to the Hub repository {repo_id}: {first}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
