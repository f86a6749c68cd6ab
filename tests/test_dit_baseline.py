"""DiT, the baseline, built by the same registry and sampled by the same pipeline as SDT-P."""

from __future__ import annotations

import pytest
import torch

from sdt_diffusion import SDTPipeline, default_scheduler
from sdt_diffusion.models.dit import DIT_PRESETS, DiTTransformer2DModel
from sdt_diffusion.models.registry import (
    all_presets,
    build_transformer,
    learns_sigma,
    model_class_of,
    num_classes_of,
    preset_config,
)

TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "in_channels": 3, "out_channels": 6,
        "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}


def test_presets_follow_dits_sizes():
    assert preset_config("DiT-XL/2") == {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72,
                                         "patch_size": 2}
    assert preset_config("DiT-S/8")["patch_size"] == 8
    assert model_class_of("DiT-B/4") is DiTTransformer2DModel
    assert set(DIT_PRESETS) <= set(all_presets()) and "SDT-P-XL/2" in all_presets()
    with pytest.raises(ValueError, match="DiT-XS/2"):
        preset_config("DiT-XS/2")
    with pytest.raises(ValueError, match="unknown model class"):
        build_transformer("UNet2DModel", {})


def test_dit_initialisation_is_dits():
    model = build_transformer("DiTTransformer2DModel", TINY)
    for block in model.transformer_blocks:
        assert block.norm1.linear.weight.abs().max() == 0  # adaLN-Zero
        assert abs(block.norm1.emb.class_embedder.embedding_table.weight.std().item() - 0.02) < 0.01
        assert block.attn1.to_q.bias.abs().max() == 0
    assert model.proj_out_2.weight.abs().max() == 0 and model.proj_out_1.weight.abs().max() == 0
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([3, 7]), torch.tensor([1, 10])).sample  # 10 = the null label
    assert out.shape == (2, 6, 8, 8) and out.abs().max() == 0  # zero final layer: a zero prediction at init
    assert num_classes_of(model) == 10 and learns_sigma(model)
    assert not learns_sigma(build_transformer("DiTTransformer2DModel", {**TINY, "out_channels": 3}))


def test_pipeline_samples_and_round_trips_dit(tmp_path):
    torch.manual_seed(0)
    model = build_transformer("DiTTransformer2DModel", TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from the zero init, so outputs depend on the label
    pipe = SDTPipeline(transformer=model.eval(), vae=None, scheduler=default_scheduler())
    assert pipe.num_classes == 10
    images = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    pipe.save_pretrained(tmp_path / "dit")
    again = SDTPipeline.from_pretrained(tmp_path / "dit")
    assert isinstance(again.transformer, DiTTransformer2DModel)
    images2 = again(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
    torch.testing.assert_close(torch.from_numpy(images2), torch.from_numpy(images))
