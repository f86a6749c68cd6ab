"""Training state in formats that cannot carry code: safetensors for tensors, JSON for everything else.

A checkpoint must be safe to resume even when someone else made it, so nothing here unpickles: the model
(``safetensors.torch.save_model``, shared tensors handled), AdamW's per-parameter tensors (safetensors) with
its hyper-parameters (JSON), the EMA (safetensors), every process's RNG states (torch CPU and CUDA generator
states and numpy's Mersenne-Twister keys as tensors, Python's ``random`` state and numpy's position as JSON)
and the fp16 grad scaler (a JSON file).  A safetensors file's non-tensor fields are one JSON metadata entry,
so equal states give equal bytes.  Reading a file that is not what it should be (a pickle, a truncated file,
a foreign safetensors file) raises :class:`StateFileError` naming the file; the safetensors reader only
parses a JSON header and raw tensor bytes.
"""

from __future__ import annotations

import errno
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from .ema import EMA

__all__ = [
    "RngState",
    "StateFileError",
    "capture_rng",
    "load_ema_file",
    "load_model_file",
    "load_optimizer_file",
    "load_scaler_file",
    "read_rng_file",
    "restore_rng",
    "save_ema_file",
    "save_model_file",
    "save_optimizer_file",
    "save_rng_file",
    "save_scaler_file",
]

_OPTIMIZER_FORMAT = "sdt-diffusion-optimizer"
_EMA_FORMAT = "sdt-diffusion-ema"
_RNG_FORMAT = "sdt-diffusion-rng"
_META_KEY = "sdt_diffusion"


@contextmanager
def _writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write of ``path`` into an ``OSError`` that names it: safetensors reports an I/O error (a full
    disk, a read-only file system) as a ``SafetensorError`` whose text holds the OS error code."""
    try:
        yield
    except SafetensorError as e:
        text = str(e)
        if "IoError" not in text:  # not an I/O failure (e.g. tensors that cannot be serialised): as raised
            raise
        if "No space left" in text or "StorageFull" in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise OSError(errno.EIO, text, str(path)) from None
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


class StateFileError(ValueError):
    """A state file is missing, truncated, not in its format, or does not fit the objects it should restore."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, fields: dict[str, Any]) -> None:
    """``tensors`` with ``fields`` as one JSON metadata entry (safetensors keeps several metadata entries in a hash
    map, whose order, and so the file's bytes, would change from one process to the next)."""
    with _writing(path):
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(fields, sort_keys=True)})


def _read_safetensors(path: Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors (on the CPU) and the metadata fields of a file written by :func:`_save_safetensors`, checked
    for its ``format`` field."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise StateFileError(path, "missing") from None
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError: re-raised with the file named
        raise StateFileError(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        fields = json.loads(metadata[_META_KEY])
    except (KeyError, ValueError) as e:
        raise StateFileError(path, f"no {_META_KEY!r} metadata ({type(e).__name__}: {e})") from None
    if not isinstance(fields, dict) or fields.get("format") != expected_format:
        found = fields.get("format") if isinstance(fields, dict) else None
        raise StateFileError(path, f"not an {expected_format} file (format {found!r})")
    return tensors, fields


# ------------------------------------------------------------------------------------------------ model
def save_model_file(model: torch.nn.Module, path: str | Path) -> None:
    """The (unwrapped) model's weights as safetensors."""
    with _writing(path):
        save_model(model, str(path), metadata={"format": "pt"})


def load_model_file(model: torch.nn.Module, path: str | Path) -> None:
    """Load :func:`save_model_file`'s weights into ``model`` (every tensor must be present and fit)."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(path, "missing")
    try:
        load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
    except Exception as e:  # noqa: BLE001 - SafetensorError, RuntimeError (missing keys / shapes)
        raise StateFileError(path, f"cannot load the model weights ({type(e).__name__}: {e})") from None


# -------------------------------------------------------------------------------------------- optimizer
def save_optimizer_file(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """An optimizer's ``state_dict``: its per-parameter tensors as safetensors, the rest as JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    fields = {"format": _OPTIMIZER_FORMAT, "class": type(getattr(optimizer, "optimizer", optimizer)).__name__,
              "param_groups": state["param_groups"], "scalars": scalars}
    _save_safetensors(tensors, path, fields)


def load_optimizer_file(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Restore :func:`save_optimizer_file`'s state into ``optimizer`` (same class, same parameter groups)."""
    path = Path(path)
    tensors, fields = _read_safetensors(path, _OPTIMIZER_FORMAT)
    inner = type(getattr(optimizer, "optimizer", optimizer)).__name__
    if fields.get("class") != inner:
        raise StateFileError(path, f"holds the state of a {fields.get('class')} optimizer, this run uses {inner}")
    state: dict[int, dict[str, Any]] = {}
    try:
        groups, scalars = fields["param_groups"], fields["scalars"]
        for name, tensor in tensors.items():
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
        for name, value in scalars.items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
        for group in groups:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise StateFileError(path, f"does not fit this run's optimizer ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------- EMA
def save_ema_file(ema: EMA, path: str | Path) -> None:
    """The EMA's tensors (in parameter order) with its decay and update count."""
    tensors = {str(i): s.detach().contiguous() for i, s in enumerate(ema.shadow)}
    _save_safetensors(tensors, path, {"format": _EMA_FORMAT, "decay": ema.decay, "num_updates": ema.num_updates})


def load_ema_file(path: str | Path) -> tuple[list[torch.Tensor], float, int]:
    """``(shadow, decay, num_updates)`` of an EMA file (CPU tensors in parameter order)."""
    path = Path(path)
    tensors, fields = _read_safetensors(path, _EMA_FORMAT)
    try:
        shadow = [tensors[str(i)] for i in range(len(tensors))]
        return shadow, float(fields["decay"]), int(fields["num_updates"])
    except (KeyError, ValueError) as e:
        raise StateFileError(path, f"not a complete EMA state ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------- RNG
@dataclass
class RngState:
    """One process's generator states: torch CPU, torch CUDA (one per device, maybe none), numpy, Python."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]
    numpy: tuple[str, np.ndarray, int, int, float]
    python: tuple[int, tuple[int, ...], float | None]


def capture_rng() -> RngState:
    """This process's current generator states."""
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return RngState(torch.get_rng_state(), cuda, (kind, keys.copy(), int(pos), int(has_gauss), float(cached)),
                    (version, tuple(internal), gauss))


def save_rng_file(state: RngState, path: str | Path) -> None:
    """``state`` as safetensors (generator states as uint8/int64 tensors, the rest as JSON metadata)."""
    tensors = {"torch_cpu": state.torch_cpu.contiguous(),
               "numpy_keys": torch.from_numpy(state.numpy[1].astype(np.int64))}
    for i, s in enumerate(state.torch_cuda):
        tensors[f"torch_cuda_{i}"] = s.contiguous()
    kind, _, pos, has_gauss, cached = state.numpy
    _save_safetensors(tensors, path, {"format": _RNG_FORMAT, "numpy": [kind, pos, has_gauss, cached],
                                      "python": [state.python[0], list(state.python[1]), state.python[2]]})


def read_rng_file(path: str | Path) -> RngState:
    """The :class:`RngState` in a file written by :func:`save_rng_file`."""
    path = Path(path)
    tensors, fields = _read_safetensors(path, _RNG_FORMAT)
    try:
        kind, pos, has_gauss, cached = fields["numpy"]
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        version, internal, gauss = fields["python"]
        cuda = [tensors[f"torch_cuda_{i}"] for i in range(sum(k.startswith("torch_cuda_") for k in tensors))]
        state = RngState(tensors["torch_cpu"], cuda, (str(kind), keys, int(pos), int(has_gauss), float(cached)),
                         (int(version), tuple(int(v) for v in internal), gauss))
        # parse-check every part now, so a bad file is found before training starts, not at restore time
        np.random.RandomState().set_state(state.numpy)
        random.Random().setstate(state.python)
        torch.Generator().set_state(state.torch_cpu)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise StateFileError(path, f"not a complete RNG state ({type(e).__name__}: {e})") from None
    return state


def restore_rng(state: RngState) -> None:
    """Set this process's generators to ``state`` (CUDA only where the state has one per visible device)."""
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda:
        torch.cuda.set_rng_state_all(state.torch_cuda)
    np.random.set_state(state.numpy)
    random.setstate(state.python)


# ------------------------------------------------------------------------------------------ grad scaler
def save_scaler_file(scaler: Any, path: str | Path) -> None:
    """An fp16 ``GradScaler``'s state (a few numbers) as JSON."""
    with _writing(path):
        Path(path).write_text(json.dumps({k: v.item() if isinstance(v, torch.Tensor) else v
                                          for k, v in scaler.state_dict().items()}))


def load_scaler_file(scaler: Any, path: str | Path) -> None:
    """Restore :func:`save_scaler_file`'s state into ``scaler``."""
    path = Path(path)
    try:
        scaler.load_state_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise StateFileError(path, "missing (the run used fp16 mixed precision)") from None
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise StateFileError(path, f"not a grad scaler state ({type(e).__name__}: {e})") from None
