"""DiT, the baseline, built by the same registry and sampled by the same pipeline as SDT-P."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import call_and_reset, reset_accelerate

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
        build_transformer({"_class_name": "UNet2DModel"})


def test_dit_initialisation_is_dits():
    model = build_transformer({"_class_name": "DiTTransformer2DModel", **TINY})
    for block in model.transformer_blocks:
        assert block.norm1.linear.weight.abs().max() == 0  # adaLN-Zero
        assert abs(block.norm1.emb.class_embedder.embedding_table.weight.std().item() - 0.02) < 0.01
        assert block.attn1.to_q.bias.abs().max() == 0
    assert model.proj_out_2.weight.abs().max() == 0 and model.proj_out_1.weight.abs().max() == 0
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([3, 7]), torch.tensor([1, 10])).sample  # 10 = the null label
    assert out.shape == (2, 6, 8, 8) and out.abs().max() == 0  # zero final layer: a zero prediction at init
    assert num_classes_of(model) == 10 and learns_sigma(model)
    assert not learns_sigma(build_transformer({"_class_name": "DiTTransformer2DModel", **TINY, "out_channels": 3}))


def test_pipeline_samples_and_round_trips_dit(tmp_path):
    torch.manual_seed(0)
    model = build_transformer({"_class_name": "DiTTransformer2DModel", **TINY})
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


def test_the_trainer_trains_resumes_exports_and_samples_dit(tmp_path):
    """DiT through the same trainer: same data, loss, EMA, checkpoints, export; the export samples like SDT-P's."""
    from PIL import Image

    from sdt_diffusion.training.diffusion_config import parse_args
    from sdt_diffusion.training.trainer import train

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in range(3):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / f"class{c}" / f"{i}.png")
    kwargs = '{"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}'

    def flags(out, steps):
        return ["--model", "DiT-S/2", "--model-kwargs", kwargs, "--data-dir", str(data), "--vae", "none",
                "--resolution", "8", "--global-batch-size", "4", "--max-steps", str(steps), "--checkpoint-every",
                "2", "--num-workers", "0", "--report-to", "none", "--log-every", "1", "--cpu",
                "--no-progress-bar", "--output-dir", str(out)]

    def run(argv):
        reset_accelerate()
        return call_and_reset(train, parse_args(argv))

    full = run(flags(tmp_path / "full", 4))
    part = run(flags(tmp_path / "part", 2))
    resumed = run([*flags(tmp_path / "part", 4), "--resume", "latest"])
    assert full.step == resumed.step == 4 and part.step == 2
    pipe_full = SDTPipeline.from_pretrained(full.pipeline_dir)
    pipe_resumed = SDTPipeline.from_pretrained(resumed.pipeline_dir)
    assert isinstance(pipe_full.transformer, DiTTransformer2DModel)
    for a, b in zip(pipe_full.transformer.parameters(), pipe_resumed.transformer.parameters()):
        torch.testing.assert_close(a, b)  # the continuation is exact
    state = json.loads((tmp_path / "full" / "checkpoint-4" / "training_state.json").read_text())
    assert state["model_config"]["_class_name"] == "DiTTransformer2DModel"
    assert state["model_config"]["out_channels"] == 6  # DiT learns its variance
    images = pipe_full(class_labels=[0, 2], num_inference_steps=2, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()


def test_dit_refuses_sdt_only_flags(tmp_path):
    from PIL import Image

    from sdt_diffusion.training.diffusion_config import parse_args
    from sdt_diffusion.training.trainer import train
    from sdt_diffusion.utils.errors import ConfigError

    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "a" / "0.png")
    common = ["--data-dir", str(tmp_path / "d"), "--vae", "none", "--resolution", "8", "--cpu", "--report-to", "none"]
    with pytest.raises(ConfigError, match="--decay-mode is an SDT-P setting"):
        train(parse_args(["--model", "DiT-S/2", "--decay-mode", "fixed", *common, "--output-dir", str(tmp_path / "o")]))
    with pytest.raises(ConfigError, match="unknown DiTTransformer2DModel fields \\['gate_rank'\\]"):
        train(parse_args(["--model", "DiT-S/2", "--model-kwargs", '{"gate_rank": 4}', *common,
                          "--output-dir", str(tmp_path / "o2")]))
    with pytest.raises(ConfigError, match="not a preset"):
        train(parse_args(["--model", "DiT-XS/2", *common, "--output-dir", str(tmp_path / "o3")]))
    reset_accelerate()


def test_dit_drops_each_label_once_per_forward_for_every_block():
    """DiT drops a sample's label once; diffusers' port draws in each block's embedder and again for the final
    layer, so nearly no sample would be fully unconditional.  Every embedder call must see the same labels."""
    model = build_transformer({"_class_name": "DiTTransformer2DModel", **TINY, "num_layers": 4})
    seen = []
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    torch.manual_seed(0)
    labels = torch.arange(4000) % 10
    x, t = torch.randn(4000, 3, 8, 8), torch.zeros(4000, dtype=torch.long)
    model.train()
    with torch.no_grad():
        model(x, t, labels)
    assert len(seen) == 5  # 4 blocks + the final layer's call of block 0's embedder
    assert all(torch.equal(s, seen[0]) for s in seen)  # one draw, shared by every block
    dropped = (seen[0] == 10).float().mean().item()
    assert 0.08 < dropped < 0.12  # DiT's 0.1, per sample
    assert torch.equal(seen[0][seen[0] != 10], labels[seen[0] != 10])
    seen.clear()
    with torch.no_grad():
        model(x, t, class_labels=labels)  # labels given by keyword are dropped too
    assert (seen[0] == 10).any() and all(torch.equal(s, seen[0]) for s in seen)
    model.eval()
    seen.clear()
    with torch.no_grad():
        model(x[:4], t[:4], labels[:4])
    assert all(torch.equal(s, labels[:4]) for s in seen)  # no dropout in evaluation


def test_single_label_dropout_refuses_a_bad_probability():
    from sdt_diffusion.models.dit import single_label_dropout

    model = build_transformer({"_class_name": "DiTTransformer2DModel", **TINY})
    with pytest.raises(ValueError, match="prob must be <= 1"):
        single_label_dropout(model, 1.5)
    single_label_dropout(model, 1.0)  # idempotent: one hook, the new probability
    model.train()
    seen = []
    model.transformer_blocks[1].norm1.emb.class_embedder.register_forward_hook(
        lambda m, args, out: seen.append(args[0].clone()))
    with torch.no_grad():
        model(torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    assert seen[0].tolist() == [10, 10, 10]
