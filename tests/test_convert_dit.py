"""DiT -> SDT-P: with every SDA part off the converted model IS DiT (float64, outputs and gradients); with them
on it starts inert; bad inputs are refused by name; the ``sdt-convert-dit`` command writes models and pipelines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from safetensors.torch import load_file

from sdt_diffusion import SDTPipeline, SDTTransformer2DModel, convert_dit
from sdt_diffusion.models.convert_dit import diffusers_to_dit_state_dict, main
from sdt_diffusion.models.dit import dit_initialize
from sdt_diffusion.utils.errors import ConfigError

TINY_DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 3,
            "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}


def tiny_dit(shared: bool = True, seed: int = 0, **overrides) -> DiTTransformer2DModel:
    """A diffusers DiT with random weights everywhere (adaLN and final layer too), its embedders shared."""
    torch.manual_seed(seed)
    model = dit_initialize(DiTTransformer2DModel(**{**TINY_DIT, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if shared:
            first = model.transformer_blocks[0].norm1.emb.state_dict()
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first)
    return model.eval()


def inputs(dtype=torch.float64, requires_grad: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return x, torch.tensor([0, 417, 999]), torch.tensor([1, 9, 10])  # 10: the null label


def forward(model, x, t, y) -> torch.Tensor:
    return model(x, t, y).sample


def test_sda_off_is_diffusers_dit_exactly_forward_and_backward():
    dit = tiny_dit().double()
    sdt = convert_dit(dit, dtype=torch.float64)
    assert sdt.config.freq_shift == 1 and sdt.config.norm_eps == dit.config.norm_eps == 1e-5
    assert sdt.config.decay_mode == "none" and not sdt.config.use_rope and sdt.config.use_abs_pos_embed
    assert all(b.attn.lpe is None and b.attn.gate_down is None and b.attn.gate is None for b in sdt.blocks)

    x, t, y = inputs(requires_grad=True)
    out_dit = forward(dit, x, t, y)
    x2 = x.detach().clone().requires_grad_(True)
    out_sdt = forward(sdt, x2, t, y)
    assert out_dit.abs().max() > 0.1  # a real function, not a zero init
    assert (out_dit - out_sdt).abs().max().item() <= 1e-10

    w = torch.randn_like(out_dit)
    (out_dit * w).sum().backward()
    (out_sdt * w).sum().backward()
    assert (x.grad - x2.grad).abs().max().item() <= 1e-10
    b0, s0 = dit.transformer_blocks[1], sdt.blocks[1]
    qkv = torch.cat([b0.attn1.to_q.weight.grad, b0.attn1.to_k.weight.grad, b0.attn1.to_v.weight.grad])
    assert (qkv - s0.attn.qkv.weight.grad).abs().max().item() <= 1e-10
    assert (b0.ff.net[0].proj.weight.grad - s0.mlp[0].weight.grad).abs().max().item() <= 1e-10
    assert (dit.proj_out_1.weight.grad - sdt.final_layer.adaLN_modulation[1].weight.grad).abs().max() <= 1e-10
    # one shared embedder in SDT-P = the sum of the gradients of diffusers' per-block copies
    shared = sum(b.norm1.emb.timestep_embedder.linear_1.weight.grad for b in dit.transformer_blocks)
    assert (shared - sdt.emb.timestep_embedder.linear_1.weight.grad).abs().max().item() <= 1e-10


def test_original_checkpoint_is_dit_exactly(tmp_path):
    """DiT's own code = diffusers' port with k/128 frequencies and eps 1e-6 before the MLP: switched so, the
    diffusers model is the reference for a checkpoint saved under DiT's key names."""
    dit = tiny_dit(norm_eps=1e-6).double()
    for block in dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # DiT's exp(-ln(1e4) k / 128)
    state = {k: v.float() for k, v in diffusers_to_dit_state_dict(tiny_dit(norm_eps=1e-6)).items()}
    state["pos_embed"] = dit.pos_embed.pos_embed.float().clone()  # DiT stores its fixed table
    path = tmp_path / "DiT-tiny.pt"
    torch.save(state, path)
    dit.load_state_dict(tiny_dit(norm_eps=1e-6).state_dict())  # the same float32 values as the file, in float64

    sdt = convert_dit(path, num_attention_heads=2, dtype=torch.float64)
    assert sdt.config.freq_shift == 0 and sdt.config.norm_eps == 1e-6 and sdt.config.sample_size == 8
    assert sdt.config.num_embeds_ada_norm == 10 and sdt.config.learn_sigma
    x, t, y = inputs()
    with torch.no_grad():
        assert (forward(dit, x, t, y) - forward(sdt, x, t, y)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("decay_mode", ["cdsf", "1d", "bidirectional"])
def test_sda_parts_on_start_inert_and_learn(decay_mode):
    dit = tiny_dit().double()
    sdt = convert_dit(dit, decay_mode=decay_mode, use_lpe=True, use_output_gate=True, dtype=torch.float64)
    x, t, y = inputs()
    with torch.no_grad():
        ref = forward(dit, x, t, y)
        rel = ((forward(sdt, x, t, y) - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1e-5  # the decay is ~1e-7 per unit of distance, not exactly zero
    tokens = torch.randn(2, 16, sdt.inner_dim)
    attn = convert_dit(dit, use_output_gate=True, use_lpe=True).blocks[0].attn  # float32, rank 16
    assert torch.equal(attn.gate_up(torch.sigmoid(attn.gate_down(tokens))), torch.ones(2, 16, sdt.inner_dim))
    assert attn.lpe.weight.abs().max() == 0
    assert not torch.equal(attn.gate_up.weight[:, 0], attn.gate_up.weight[:, 1])  # symmetry broken
    # every new part gets a gradient, so fine-tuning learns the decay, LPE and gate
    sdt.train()
    forward(sdt, x, t, y).square().mean().backward()
    for name in ("attn.gate.bias", "attn.lpe.weight", "attn.gate_up.weight", "attn.gate_down.weight"):
        grad = sdt.get_parameter(f"blocks.0.{name}").grad
        assert grad is not None and grad.abs().max() > 0, name


def test_differing_embedders_are_refused_unless_block0_is_taken():
    dit = tiny_dit(shared=False)
    with pytest.raises(ConfigError, match="embedders differ .*take_block0_embedder"):
        convert_dit(dit)
    with pytest.warns(UserWarning, match="taking block 0's"):
        sdt = convert_dit(dit, take_block0_embedder=True)
    assert torch.equal(sdt.emb.class_embedder.weight,
                       dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight)


def test_rope_warns_that_the_function_changes():
    with pytest.warns(UserWarning, match="no longer DiT's function"):
        sdt = convert_dit(tiny_dit(), use_rope=True)
    assert sdt.config.use_rope


@pytest.mark.parametrize("kwargs, message", [
    ({"decay_mode": "fixed"}, "cannot start from DiT's function"),
    ({"decay_mode": "decomposed"}, "cannot start from DiT's function"),
    ({"decay_mode": "spiral"}, "spiral"),
    ({"use_lpe": "yes"}, "use_lpe must be True or False"),
    ({"dtype": torch.int8}, "dtype must be a floating"),
    ({"use_abs_pos_embed": False}, "set by the conversion"),
    ({"num_attention_heads": 0}, "num_attention_heads must be >= 1"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert_dit(tiny_dit(), **kwargs)


def test_bad_sources_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        convert_dit(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read DiT checkpoint"):
        convert_dit(tmp_path / "notes.pt")
    state = diffusers_to_dit_state_dict(tiny_dit())
    with pytest.raises(ConfigError, match="not one of DiT's sizes: give num_attention_heads"):
        convert_dit(state, sample_size=8)
    with pytest.raises(ConfigError, match="no pos_embed: give sample_size"):
        convert_dit(state, num_attention_heads=2)
    with pytest.raises(ConfigError, match="no 'x_embedder.proj.weight'"):
        convert_dit({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match="norm_type"):
        convert_dit(_with_config(tiny_dit(), norm_type="layer_norm"))


def _with_config(model: DiTTransformer2DModel, **fields) -> DiTTransformer2DModel:
    model.register_to_config(**fields)
    return model


def test_the_command_converts_a_pipeline_folder(tmp_path):
    root = tmp_path / "dit-pipeline"
    tiny_dit().save_pretrained(root / "transformer")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                  sample_size=8).save_pretrained(root / "vae")
    DDPMScheduler(variance_type="learned_range").save_pretrained(root / "scheduler")
    names = {str(i): f"class {i}" for i in range(10)}
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "id2label": names}))
    assert main([str(root), "--output-dir", str(tmp_path / "out"), "--decay-mode", "cdsf", "--lpe"]) == 0
    pipe = SDTPipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipe.transformer, SDTTransformer2DModel) and pipe.transformer.config.decay_mode == "cdsf"
    assert pipe.transformer.config.use_lpe and not pipe.transformer.config.use_output_gate
    assert pipe.get_label_ids(["class 7"]) == [7]  # the DiT pipeline's class names are kept
    images = pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 8, 8, 3)


def test_the_command_converts_a_model_folder_and_refuses_bad_input(tmp_path, capsys):
    tiny_dit().save_pretrained(tmp_path / "dit")
    assert main([str(tmp_path / "dit"), "--output-dir", str(tmp_path / "sdt"), "--dtype", "bfloat16"]) == 0
    saved = load_file(tmp_path / "sdt" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16} and "blocks.0.attn.qkv.weight" in saved
    assert not SDTTransformer2DModel.from_pretrained(tmp_path / "sdt").config.use_lpe
    assert main([str(tmp_path / "dit"), "--output-dir", str(tmp_path / "sdt")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "sdt_diffusion.models.convert_dit", str(tmp_path / "nope"),
                          "--output-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode == 2 and "does not exist" in run.stderr and not (tmp_path / "x").exists()
