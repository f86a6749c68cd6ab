"""Moving SDT-H weights between its two faces: the timm model (:class:`~.sdt_h.SDTH` itself) and
transformers' :class:`~.sdt_h_transformers.SDTHForImageClassification`.

Both hold the same :class:`~.sdt_h.SDTH`; the transformers classifier keeps it as ``sdt_h.encoder`` without
its final Linear, which is ``classifier``.  So a state dict maps key by key: ``head.fc.*`` <-> ``classifier.*``
and every other key ``k`` <-> ``sdt_h.encoder.k``.  No value is changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .sdt_h import SDTH
from .sdt_h_transformers import SDTHConfig, SDTHForImageClassification

__all__ = ["sdt_h_state_to_transformers", "sdt_h_state_from_transformers", "sdt_h_to_transformers"]

_ENCODER = "sdt_h.encoder."
_FC, _CLASSIFIER = "head.fc.", "classifier."


def sdt_h_state_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`SDTH` (timm) state dict under :class:`SDTHForImageClassification`'s names."""
    return {(_CLASSIFIER + k[len(_FC):]) if k.startswith(_FC) else _ENCODER + k: v for k, v in state.items()}


def sdt_h_state_from_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`SDTHForImageClassification` state dict under :class:`SDTH`'s (timm's) names.

    Raises:
        ValueError: a key that belongs to neither the encoder nor the classifier.
    """
    out = {}
    for k, v in state.items():
        if k.startswith(_CLASSIFIER):
            out[_FC + k[len(_CLASSIFIER):]] = v
        elif k.startswith(_ENCODER):
            out[k[len(_ENCODER):]] = v
        else:
            raise ValueError(f"{k!r} is not an SDTHForImageClassification weight (expected sdt_h.encoder.* or "
                             f"classifier.*)")
    return out


def sdt_h_to_transformers(model: SDTH, sdt_h_kwargs: Mapping[str, Any], id2label: Mapping[int, str] | None = None,
                          ) -> SDTHForImageClassification:
    """The transformers classifier holding ``model``'s weights (copied, on the CPU, in float32).

    Args:
        model: a classifier (``num_labels > 0``) whose architecture arguments are ``sdt_h_kwargs``.
        sdt_h_kwargs: :class:`SDTH`'s keyword arguments that built ``model`` (without ``num_labels``).
        id2label: class names; default ``LABEL_0`` ... as transformers names them.

    Raises:
        ValueError: ``model`` has no classifier, or its weights do not fit the architecture.
    """
    if model.head is None or model.num_classes == 0:
        raise ValueError("the model has no classifier (num_labels=0 or a pruned head); nothing to export as "
                         "SDTHForImageClassification")
    kwargs = {k: v for k, v in sdt_h_kwargs.items() if k != "num_labels"}
    labels = {"id2label": {int(i): str(n) for i, n in id2label.items()}} if id2label else {}
    if labels and len(labels["id2label"]) != model.num_classes:
        raise ValueError(f"id2label names {len(labels['id2label'])} classes, the model has {model.num_classes}")
    config = SDTHConfig(**kwargs, num_labels=model.num_classes, **labels)
    if labels:
        config.label2id = {n: i for i, n in config.id2label.items()}
    hf = SDTHForImageClassification(config)
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sdt_h_state_to_transformers(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"the weights do not fit SDTHForImageClassification: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return hf.eval()
