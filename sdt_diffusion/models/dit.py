"""DiT, the SDT-P baseline of the paper's Table 2, as diffusers' ``DiTTransformer2DModel``.

The same trainer, pipeline and sampler run DiT and SDT-P: ``training/train.py --model DiT-S/2`` builds a
diffusers ``DiTTransformer2DModel`` of DiT's size (Peebles & Xie 2023, Table 1) with DiT's initialisation
(their ``models.py``: xavier-uniform linears with zero biases, N(0, 0.02) timestep MLP and class table,
zero-initialised adaLN modulations and final layer), and :class:`~sdt_diffusion.SDTPipeline` samples it.

diffusers' port keeps one timestep/class embedder per block (the original shares one); each is initialised
and trained on its own here, as the diffusers model is built.  Class-label dropout for guidance is diffusers'
built-in 0.1, DiT's value.
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel
from torch import nn

from .transformer_sdt import size_presets

__all__ = ["DIT_PRESETS", "DiTTransformer2DModel", "dit_initialize"]

DIT_PRESETS: dict[str, dict[str, int]] = size_presets("DiT")


def dit_initialize(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """DiT's initialisation on diffusers' module names (DiT ``models.py``, ``initialize_weights``)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
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
