"""``--init-from``: a new run (fresh optimiser, step 0, new data order) that starts from trained weights.

Sources (:func:`open_diffusion_source`, :func:`open_classifier_source`), every file read being JSON or
safetensors (nothing is unpickled; a folder with ``.bin`` weights only is refused):

* diffusion: an ``SDTPipeline`` folder (``model_index.json`` + ``transformer/``), a checkpoint folder of
  ``sdt-train`` (``training_state.json``: the online weights ``model.safetensors``, or its EMA with
  ``--init-from-ema``), a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) of an
  ``SDTTransformer2DModel`` or a diffusers ``DiTTransformer2DModel`` (trained as DiT, or converted to SDT-P through
  :func:`~sdt_diffusion.models.convert_dit.convert_dit` when ``--model`` names an SDT-P preset);
* classification: a checkpoint folder of ``sdt-train-classifier``, its ``model/`` export (transformers'
  ``config.json`` + ``model.safetensors``) or the timm folder inside it (``model/timm``);
* either: a Hub id, fetched with ``huggingface_hub.snapshot_download`` (JSON and safetensors files only).

The class table (diffusion) or the head (classification) follows the new data's classes
(:func:`class_mapping`): rows kept by class name where both sides name their classes, else by index, new rows as
the model's own initialisation draws them, the null (guidance) row kept as the null row; ``--strict-classes``
refuses any change instead.  Every other weight must fit by name and shape (an error names the parameter).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..utils.errors import ConfigError
from ..utils.files import sha256_file
from .checkpointing import (
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    check_checkpoint,
    read_training_state,
    verify_file,
)

__all__ = ["ClassMapping", "InitSource", "check_fit", "check_source_fits", "class_mapping", "class_table_names",
           "diffusion_weight_names", "init_record", "load_init_weights", "log_init", "log_resume_wins", "new_head", "open_classifier_source", "open_diffusion_source",
           "resolve_init_path"]

logger = logging.getLogger("sdt_diffusion.training")

FLAG = "--init-from"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]  # never a pickle
# The class table of each model: SDT-P's one table, diffusers DiT's one per block.
CLASS_TABLE_SUFFIXES = ("emb.class_embedder.weight", "class_embedder.embedding_table.weight")
HEAD_PREFIX = "head.fc."  # SDT-H's classifier (timm names)


@dataclass
class InitSource:
    """A resolved ``--init-from``: where its weights are, how they are named, its config and classes."""

    reference: str  # as given on the command line
    path: Path  # the local folder (a Hub id's snapshot)
    kind: str  # pipeline, checkpoint, model, dit, classifier-checkpoint, transformers, timm
    weights: Path  # the safetensors file
    config: dict[str, Any]  # the model config (diffusion: with _class_name; classification: the run's SDT-H kwargs)
    id2label: dict[int, str] | None
    ema: bool = False  # the weights are a checkpoint's EMA (tensors "0".."n-1" in the EMA's order)
    step: int | None = None  # a checkpoint's step
    sha256: str | None = None  # from a checkpoint's manifest (else computed for the record)
    model_name: str | None = None  # the preset the source was trained as, where recorded
    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # to the model's names
    converted: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # a DiT converted to SDT-P
    _record: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return int(self.config.get("num_embeds_ada_norm", self.config.get("num_labels", 0)))

    def record(self) -> dict[str, Any]:
        """What ``train_config.yaml``, ``training_state.json`` and the model card say about the source (the weights
        hashed once)."""
        if self._record is not None:
            return dict(self._record)
        out: dict[str, Any] = {"source": self.reference, "path": str(self.path.resolve()), "kind": self.kind,
                               "weights": "ema" if self.ema else ("converted from DiT" if self.converted is not None
                                                                  else "as saved"),
                               "file": self.weights.name}
        if self.step is not None:
            out["step"] = self.step
        if self.converted is None:
            out["sha256"] = self.sha256 or sha256_file(self.weights)
        self._record = out
        return dict(out)

    def shapes(self, ema_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by the model's parameter name, from the safetensors header (nothing loaded)."""
        if self.converted is not None:
            return {k: tuple(v.shape) for k, v in self.converted.items()}
        try:
            with safe_open(str(self.weights), framework="pt", device="cpu") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: re-raised with the file named
            raise ConfigError(f"{FLAG} {self.reference}: {self.weights} is not a readable safetensors file "
                              f"({type(e).__name__}: {e})") from None
        return self._named(shapes, ema_names)

    def tensors(self, ema_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every tensor by the model's parameter name (CPU)."""
        if self.converted is not None:
            return dict(self.converted)
        return self._named(load_file(str(self.weights), device="cpu"), ema_names)

    def _named(self, values: dict[str, Any], ema_names: Sequence[str]) -> dict[str, Any]:
        if self.ema:
            if sorted(values) != sorted(str(i) for i in range(len(values))):
                raise ConfigError(f"{FLAG} {self.reference}: {self.weights} is not an EMA file (tensors 0..n-1)")
            if len(values) != len(ema_names):
                raise ConfigError(f"{FLAG} {self.reference}: {self.weights} holds {len(values)} EMA tensors, the "
                                  f"model has {len(ema_names)}; the source does not fit the model")
            return {name: values[str(i)] for i, name in enumerate(ema_names)}
        return self.rename(values) if self.rename is not None else values


# ------------------------------------------------------------------------------------------- resolving
def _looks_like_hub_id(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.startswith((".", "/", "~")) or value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def resolve_init_path(value: str) -> Path:
    """The local folder of ``--init-from``: the folder itself, or a Hub id's snapshot (JSON and safetensors files).

    Raises:
        ConfigError: naming ``--init-from``: no such folder, a file, or a Hub id that cannot be fetched.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{FLAG} {value}: a file, not a folder (give a pipeline, checkpoint or model folder)")
    if not _looks_like_hub_id(value):
        raise ConfigError(f"{FLAG} {value}: no such folder (and not a Hub id such as owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(value, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, not found, gated, network: one line naming the flag
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{FLAG} {value}: no such local folder, and the Hub repository cannot be fetched "
                          f"({type(e).__name__}: {first})") from None


def _read_json(path: Path, reference: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{FLAG} {reference}: {path} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{FLAG} {reference}: {path} is not a JSON object")
    return data


def _weights_file(folder: Path, name: str, reference: str) -> Path:
    f = folder / name
    if f.is_file():
        return f
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    why = f" (only {', '.join(pickles)}: pickled weights are not read; save them as safetensors)" if pickles else ""
    raise ConfigError(f"{FLAG} {reference}: no {f}{why}")


def _id2label(mapping: Any) -> dict[int, str] | None:
    if not isinstance(mapping, Mapping) or not mapping:
        return None
    try:
        return {int(k): str(v) for k, v in mapping.items()}
    except (TypeError, ValueError):
        return None


def _config_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config's model fields, with its ``_class_name`` (its other ``_`` keys dropped)."""
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def _checkpoint(path: Path, reference: str, task: str, ema: bool) -> tuple[dict[str, Any], Path, str]:
    """``(training_state, weights file, sha256)`` of a checkpoint of ``task``, checked against its manifest."""
    state = read_training_state(path)
    found = state.get("task", "diffusion")
    if found != task:
        raise ConfigError(f"{FLAG} {reference} is a checkpoint of the {found} trainer, not of the {task} trainer")
    check_checkpoint(path, state)
    name = EMA_FILE if ema else MODEL_FILE
    if name not in (state.get("files") or {}):
        raise ConfigError(f"{FLAG} {reference}: the checkpoint has no {name} (an FSDP checkpoint keeps its weights "
                          f"in shards; initialise from the pipeline the run exported)")
    weights = verify_file(path, state, name)
    return state, weights, state["files"][name]["sha256"]


def _no_ema(reference: str, what: str) -> ConfigError:
    return ConfigError(f"--init-from-ema picks the EMA weights of a training checkpoint; {FLAG} {reference} is {what}, "
                       f"which holds one set of weights (an exported pipeline's are already the run's EMA): drop "
                       f"--init-from-ema")


def open_diffusion_source(reference: str, ema: bool, convert_to_sdt: bool) -> InitSource:
    """The ``--init-from`` source of the diffusion trainer (configs read, weights not loaded; a diffusers DiT is
    converted here when ``convert_to_sdt``).

    Raises:
        ConfigError: naming ``--init-from`` (or ``--init-from-ema``): no such folder, a folder of another kind,
            missing safetensors weights, a damaged checkpoint.
    """
    path = resolve_init_path(reference)
    if (path / STATE_FILE).is_file():
        state, weights, sha = _checkpoint(path, reference, "diffusion", ema)
        config = {"_class_name": "SDTTransformer2DModel", **(state.get("model_config") or {})}
        return InitSource(reference, path, "checkpoint", weights, config, _id2label(state.get("id2label")), ema=ema,
                          step=int(state.get("step", 0)), sha256=sha, model_name=state.get("model"))
    if (path / "model_index.json").is_file() and (path / "transformer" / "config.json").is_file():
        if ema:
            raise _no_ema(reference, "a pipeline folder")
        index = _read_json(path / "model_index.json", reference)
        source = _model_folder(path / "transformer", reference, convert_to_sdt)
        source.kind, source.path, source.id2label = "pipeline", path, _id2label(index.get("id2label"))
        return source
    if (path / "config.json").is_file():
        if ema:
            raise _no_ema(reference, "a model folder")
        return _model_folder(path, reference, convert_to_sdt)
    runs = sorted(p.name for p in path.glob("checkpoint-*")) + (["pipeline"] if (path / "pipeline").is_dir() else [])
    hint = f"; it looks like a run folder: pass one of {[str(path / r) for r in runs[-2:]]}" if runs else ""
    raise ConfigError(f"{FLAG} {reference}: not a pipeline folder (model_index.json + transformer/), a checkpoint "
                      f"folder (training_state.json) or a diffusers model folder (config.json + {DIFFUSERS_WEIGHTS})"
                      f"{hint}")


def _model_folder(folder: Path, reference: str, convert_to_sdt: bool) -> InitSource:
    """A diffusers model folder of an ``SDTTransformer2DModel`` or a ``DiTTransformer2DModel``."""
    config = _config_fields(_read_json(folder / "config.json", reference))
    name = config.get("_class_name")
    weights = _weights_file(folder, DIFFUSERS_WEIGHTS, reference)
    if name == "SDTTransformer2DModel":
        return InitSource(reference, folder, "model", weights, config, None)
    if name != "DiTTransformer2DModel":
        raise ConfigError(f"{FLAG} {reference}: {folder / 'config.json'} holds a {name}, not an SDTTransformer2DModel "
                          f"or a diffusers DiTTransformer2DModel")
    if not convert_to_sdt:
        return InitSource(reference, folder, "dit", weights, config, None)
    from ..models.convert_dit import convert_dit
    from ..models.dit import DiTTransformer2DModel

    dit = DiTTransformer2DModel.from_pretrained(folder, use_safetensors=True)
    with torch.random.fork_rng(devices=[]):  # the converter's initialisation must not move the run's RNG
        model = convert_dit(dit)
    source = InitSource(reference, folder, "dit", weights, {"_class_name": "SDTTransformer2DModel",
                                                            **_config_fields(dict(model.config))}, None)
    source.converted = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return source


def open_classifier_source(reference: str, ema: bool) -> InitSource:
    """The ``--init-from`` source of the classification trainer (a checkpoint, a ``model/`` export or its timm
    folder); weights not loaded.

    Raises:
        ConfigError: naming ``--init-from`` (or ``--init-from-ema``).
    """
    from ..models.sdt_h_convert import sdt_h_state_from_transformers

    path = resolve_init_path(reference)
    if (path / STATE_FILE).is_file():
        state, weights, sha = _checkpoint(path, reference, "classification", ema)
        config = dict(state.get("model_config") or {})
        return InitSource(reference, path, "classifier-checkpoint", weights, config, _id2label(state.get("id2label")),
                          ema=ema, step=int(state.get("step", 0)), sha256=sha, model_name=state.get("model"))
    if (path / "config.json").is_file():
        if ema:
            raise _no_ema(reference, "an exported classifier")
        config = _read_json(path / "config.json", reference)
        weights = _weights_file(path, "model.safetensors", reference)
        if config.get("model_type") == "sdt_h":
            def rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                try:
                    return sdt_h_state_from_transformers(state)
                except ValueError as e:
                    raise ConfigError(f"{FLAG} {reference}: {e}") from None

            return InitSource(reference, path, "transformers", weights, {"num_labels": len(config.get("id2label") or {})},
                              _id2label(config.get("id2label")), rename=rename)
        if "architecture" in config:
            names = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
            labels = {i: str(n) for i, n in enumerate(names)} if isinstance(names, list) else None
            return InitSource(reference, path, "timm", weights, {"num_labels": int(config.get("num_classes", 0))},
                              labels)
    raise ConfigError(f"{FLAG} {reference}: not a classifier checkpoint folder (training_state.json), an exported "
                      f"model folder (transformers config.json with model_type sdt_h + model.safetensors) or its timm "
                      f"folder (config.json with architecture + model.safetensors)")


# --------------------------------------------------------------------------------------------- classes
@dataclass(frozen=True)
class ClassMapping:
    """How the new classes take the source's rows: ``rows[i]`` is the source row of new class ``i`` (``None``: a
    new row); ``by`` is ``"name"`` or ``"index"``."""

    old: int
    new: int
    rows: tuple[int | None, ...]
    by: str

    @property
    def kept(self) -> int:
        return sum(r is not None for r in self.rows)

    def describe(self, what: str) -> str:
        if self.by == "new head":
            return (f"{FLAG}: the source has {self.old} classes, the data {self.new}: a new {what} of {self.new} "
                    f"classes (initialised as the model's own initialisation draws it)")
        return (f"{FLAG}: the source has {self.old} classes, the data {self.new}: {what} resized, {self.kept} rows "
                f"kept by {self.by}, {self.new - self.kept} new (initialised as the model's own initialisation "
                f"draws them)")


def class_mapping(old_labels: Mapping[int, str] | None, old: int, new_labels: Mapping[int, str] | None, new: int,
                  strict: bool) -> ClassMapping | None:
    """The mapping of the source's classes onto the data's, ``None`` when they are the same (same count, and the
    same names where both sides name them).

    Raises:
        ConfigError: ``strict`` (``--strict-classes``) and the classes differ, naming both counts.
    """
    named = bool(old_labels) and bool(new_labels) and len(old_labels) == old and len(new_labels) == new
    if named:
        index = {name: i for i, name in old_labels.items()}
        rows = tuple(index.get(new_labels[i]) for i in range(new))
        by = "name"
    else:
        rows = tuple(i if i < old else None for i in range(new))
        by = "index"
    if old == new and rows == tuple(range(new)):
        return None
    if strict:
        detail = "" if old != new else " (the same count, other names or order)"
        raise ConfigError(f"--strict-classes: the source has {old} classes, the data {new}{detail}; drop "
                          f"--strict-classes to resize the class rows, or train on the source's classes")
    return ClassMapping(old, new, rows, by)


def new_head(mapping: ClassMapping | None) -> ClassMapping | None:
    """A classifier's answer to a class change: a whole new head (no row kept)."""
    return None if mapping is None else ClassMapping(mapping.old, mapping.new, (None,) * mapping.new, "new head")


def class_table_names(state_names: Sequence[str]) -> list[str]:
    """The class-table parameters of a diffusion model's state dict."""
    return [n for n in state_names if n.endswith(CLASS_TABLE_SUFFIXES)]


def diffusion_weight_names(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """``(class-table parameters, EMA names)`` of a diffusion model, as :func:`check_source_fits` and
    :func:`load_init_weights` take them (its EMA averages the parameters, in their order)."""
    return class_table_names(list(model.state_dict())), [n for n, _ in model.named_parameters()]


def log_resume_wins(resume_from: Path, given: str) -> None:
    """The log line of a ``--resume`` that found a checkpoint while ``--init-from`` is given (main process)."""
    logger.info("--resume: %s wins over %s %s (the source only sets the weights of step 0); its weights are not "
                "loaded", resume_from, FLAG, given)


def _remap_rows(fresh: torch.Tensor, source: torch.Tensor, mapping: ClassMapping | None, null_rows: bool
                ) -> torch.Tensor:
    """``fresh`` (the model's own initialisation) with the source rows of :class:`ClassMapping` copied in, and the
    null row (the last, where both have one) kept as the null row."""
    if mapping is None:
        return source
    out = fresh.detach().clone()
    for i, row in enumerate(mapping.rows):
        if row is not None:
            out[i] = source[row]
    if null_rows:
        out[-1] = source[-1]
    return out


def init_record(plan: Any) -> dict[str, Any]:
    """``init_from`` of ``train_config.yaml`` and of each checkpoint: the plan's ``--init-from`` source, or on a
    resume the one its checkpoint records (so every checkpoint of the run keeps it); ``{}`` for a run from
    scratch."""
    init = getattr(plan, "init", None)
    record = init.record() if init is not None else plan.start_state.get("init_from")
    return {"init_from": record} if record else {}


# --------------------------------------------------------------------------------------------- loading
def _own_only(own: Mapping[str, torch.Tensor], source: InitSource, names: set[str]) -> list[str]:
    """The model tensors a checkpoint's EMA does not hold (integer buffers such as BatchNorm's step count): they
    keep the model's values."""
    return [k for k, v in own.items() if source.ema and k not in names and not v.is_floating_point()]


def check_source_fits(model: torch.nn.Module, source: InitSource, mapping: ClassMapping | None,
                      class_params: Sequence[str], ema_names: Sequence[str]) -> None:
    """Check the source's weights against ``model`` (built on the ``meta`` device: nothing allocated) by name and
    shape, from the safetensors header alone.

    Raises:
        ConfigError: naming the first parameter that does not fit.
    """
    shapes = source.shapes(ema_names)
    own = model.state_dict()
    for k in _own_only(own, source, set(shapes)):
        shapes[k] = tuple(own[k].shape)
    check_fit(shapes, {k: tuple(v.shape) for k, v in own.items()}, source.reference,
              set(class_params) if mapping is not None else set())


def load_init_weights(model: torch.nn.Module, source: InitSource, mapping: ClassMapping | None,
                      class_params: Sequence[str], ema_names: Sequence[str]) -> None:
    """Copy the source's weights into ``model`` (freshly built and initialised): every weight as saved, the rows of
    ``class_params`` per ``mapping`` (new rows keep the model's initialisation; a last null row, where both tables
    have one, stays the null row).

    Raises:
        ConfigError: a weight is missing, left over or of another shape (named).
    """
    state = source.tensors(ema_names)
    own = model.state_dict()
    for k in _own_only(own, source, set(state)):
        state[k] = own[k]
    check_fit({k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in own.items()},
              source.reference, set(class_params) if mapping is not None else set())
    with torch.no_grad():
        for name, tensor in own.items():
            value = state[name]
            if mapping is not None and name in class_params:
                null = value.shape[0] == mapping.old + 1 and tensor.shape[0] == mapping.new + 1
                value = _remap_rows(tensor, value, mapping, null)
            tensor.copy_(value.to(tensor.dtype))


def log_init(source: InitSource, mapping: ClassMapping | None, what: str) -> None:
    """The start-up log lines of an initialised run (main process)."""
    weights = "EMA" if source.ema else "saved"
    step = f", step {source.step}" if source.step is not None else ""
    logger.info("%s %s: a new run from the %s weights of a %s%s (fresh optimiser, step 0)", FLAG, source.reference,
                weights, source.kind, step)
    if mapping is not None:
        logger.info("%s", mapping.describe(what))


def check_fit(source: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]], reference: str,
              resized: set[str]) -> None:
    """Every model tensor has a source tensor of its shape (``resized`` ones: the same shape but the first
    dimension), and the source has nothing else.

    Raises:
        ConfigError: naming the first parameter that does not fit.
    """
    missing = [k for k in model if k not in source]
    extra = [k for k in source if k not in model]
    if missing or extra:
        raise ConfigError(f"{FLAG} {reference}: the source's weights do not match the model (missing "
                          f"{missing[:5]}, not in the model {extra[:5]})")
    for name, shape in model.items():
        found = source[name]
        same = found[1:] == shape[1:] if name in resized else found == shape
        if not same:
            raise ConfigError(f"{FLAG} {reference}: parameter {name} has shape {found} in the source, {shape} in the "
                              f"model")
