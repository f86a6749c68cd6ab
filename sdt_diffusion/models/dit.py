"""DiT, the SDT-P baseline of the paper's Table 2, as diffusers' ``DiTTransformer2DModel``.

The same trainer, pipeline and sampler run DiT and SDT-P: ``training/train.py --model DiT-S/2`` builds a
diffusers ``DiTTransformer2DModel`` of DiT's size (Peebles & Xie 2023, Table 1) with DiT's initialisation
(their ``models.py``: xavier-uniform linears with zero biases, N(0, 0.02) timestep MLP and class table,
zero-initialised adaLN modulations and final layer), and :class:`~sdt_diffusion.SDTPipeline` samples it.

diffusers' port keeps one timestep/class embedder per block (the original shares one); each is initialised
and trained on its own here, as the diffusers model is built.

Class-label dropout for guidance is DiT's: each sample's label is replaced by the null label (``num_classes``)
with probability 0.1, drawn ONCE per sample and forward (:func:`single_label_dropout`).  diffusers' port draws
in each of its per-block embedders and once more for the final layer (``num_layers + 1`` independent draws), so
the fully unconditional input that guidance needs would be seen by only 0.1^(num_layers+1) of the samples.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from ..utils.validation import check_finite
from .transformer_sdt import size_presets
from .utils import dit_base_init

__all__ = ["DIT_LABEL_DROPOUT", "DIT_PRESETS", "DiTTransformer2DModel", "dit_initialize", "single_label_dropout"]

# DiT's class-label dropout probability (DiT's train.py: class_dropout_prob=0.1).
DIT_LABEL_DROPOUT = 0.1

DIT_PRESETS: dict[str, dict[str, int]] = size_presets("DiT")


def dit_initialize(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """DiT's initialisation on diffusers' module names (DiT ``models.py``, ``initialize_weights``)."""
    dit_base_init(model, model.pos_embed.proj)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def single_label_dropout(model: DiTTransformer2DModel, prob: float = DIT_LABEL_DROPOUT) -> DiTTransformer2DModel:
    """Drop each sample's label once per forward in training mode, as DiT does, for every block alike.

    Switches off the label dropout of every per-block embedder (their tables keep the null row) and registers
    a forward pre-hook that, while ``model.training``, replaces each label by the null label ``num_classes``
    with probability ``prob``, one draw per sample.  Evaluation and explicit null labels are unchanged.
    Idempotent: a second call only updates ``prob``.
    """
    check_finite("prob", prob, minimum=0.0, maximum=1.0)
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    model.label_dropout_prob = float(prob)
    if not getattr(model, "_single_label_dropout", False):
        model.register_forward_pre_hook(_drop_labels_once, with_kwargs=True)
        model._single_label_dropout = True
    return model


def _drop_labels_once(model: DiTTransformer2DModel, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """Forward pre-hook of :func:`single_label_dropout`: one drop mask per forward."""
    if not model.training or model.label_dropout_prob <= 0:
        return None
    in_kwargs = "class_labels" in kwargs
    labels = kwargs["class_labels"] if in_kwargs else (args[2] if len(args) > 2 else None)
    if labels is None:
        return None
    labels = torch.as_tensor(labels, device=args[0].device if args else None)
    drop = torch.rand(labels.shape, device=labels.device) < model.label_dropout_prob
    labels = torch.where(drop, model.config.num_embeds_ada_norm, labels)
    if in_kwargs:
        return args, {**kwargs, "class_labels": labels}
    return (*args[:2], labels, *args[3:]), kwargs
