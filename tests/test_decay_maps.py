"""Decay-map visualisation: the maps equal the equations, and sdt-visualize writes the expected PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_transformer, make_tiny_vae
from PIL import Image

from sdt_diffusion import SDTPipeline, spatial_decay_bias
from sdt_diffusion.tools.cli import visualize_main
from sdt_diffusion.tools.decay_maps import compute_decay_maps, figure_size_pixels


def test_learned_map_is_the_cdsf_row():
    model = make_tiny_transformer()
    latents = torch.randn(1, 4, 8, 8)
    maps = compute_decay_maps(model, latents, class_label=3, timestep=100, query=(1, 2))
    assert maps.learned.shape == (2, 2, 4, 4) and maps.fixed.shape == (2, 2, 4, 4)
    # layer 0's input is reproducible by hand: recompute its gates and the full bias
    xs = []
    h = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        model(latents, torch.tensor([100]), torch.tensor([3]))
    h.remove()
    gate = model.blocks[0].attn.gate  # W_g (eq. 4-5)
    with torch.no_grad():
        gates = torch.nn.functional.logsigmoid(xs[0] @ gate.weight.T + gate.bias)
        bias = spatial_decay_bias(gates.reshape(1, 4, 4, 2), model.config.alpha)
    np.testing.assert_allclose(maps.learned[0], bias[0, :, 1 * 4 + 2].reshape(2, 4, 4).numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(maps.learned <= 0) and maps.learned[0, 0, 1, 2] == 0  # no decay on the query itself


def test_decomposed_has_no_single_map():
    model = make_tiny_transformer(decay_mode="decomposed")
    with pytest.raises(ValueError, match="no single L x L decay map"):
        compute_decay_maps(model, torch.randn(1, 4, 8, 8), 0)


@pytest.mark.parametrize("latent", [True, False])
def test_sdt_visualize_writes_png_of_expected_size(tmp_path, latent):
    if latent:
        pipe = SDTPipeline(transformer=make_tiny_transformer(), vae=make_tiny_vae(), scheduler=None)
    else:
        pipe = SDTPipeline(transformer=make_tiny_transformer(in_channels=3, decay_mode="fixed"), vae=None, scheduler=None)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "maps.png"
    args = ["--pipeline", str(tmp_path / "pipe"), "--class", "3", "--steps", "2", "--output", str(out)]
    assert visualize_main(args) == 0
    assert Image.open(out).size == figure_size_pixels(2, 2)
    size = 16 if latent else 8
    Image.fromarray(np.full((size, size, 3), 200, np.uint8)).save(tmp_path / "in.png")
    assert visualize_main(args + ["--image", str(tmp_path / "in.png"), "--query", "0", "0"]) == 0
    with pytest.raises(SystemExit):
        visualize_main(args + ["--query", "9", "9"])


def test_sdt_visualize_old_out_spelling_still_works_with_one_warning(tmp_path, capsys):
    pipe = SDTPipeline(transformer=make_tiny_transformer(in_channels=3, decay_mode="fixed"), vae=None, scheduler=None)
    pipe.save_pretrained(tmp_path / "pipe")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "old.png"
    argv = ["--pipeline", str(tmp_path / "pipe"), "--class", "class 3", "--image", str(tmp_path / "in.png"),
            "--out", str(out)]
    assert visualize_main(argv) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "deprecated" in x]  # one line, no traceback
    assert line.startswith("warning: --out is deprecated") and line.endswith("use --output")
    assert Image.open(out).size == figure_size_pixels(2, 2)
