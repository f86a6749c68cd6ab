"""Shared tiny models for offline CPU tests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fe
from diffusers import AutoencoderKL
from torch import nn

from sdt_diffusion import SDTTransformer2DModel

# The environment every test that trains, samples or launches a subprocess runs under: no hub access, one
# thread per process (2-core CI machines).
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def offline_env(monkeypatch):
    """Set :data:`OFFLINE` for one test (use ``pytestmark = pytest.mark.usefixtures("offline_env")``)."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, patch_size=2,
                        num_embeds_ada_norm=10, gate_rank=4, lpe_kernel_size=3)


def _needs_cuda(item: pytest.Item) -> bool:
    """A test skipped for lack of a CUDA device: a ``skipif`` whose reason names CUDA, a GPU or an accelerator."""
    words = ("cuda", "gpu", "accelerator")
    return any(any(w in str(mark.kwargs.get("reason", "")).lower() for w in words)
               for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every CUDA-only test ``cuda`` so that ``pytest -m cuda`` selects them (benchmarks/gpu_check.py)."""
    for item in items:
        if _needs_cuda(item) and not any(m.name == "cuda" for m in item.iter_markers()):
            item.add_marker(pytest.mark.cuda)


def make_tiny_transformer(seed: int = 0, randomise: bool = True, **overrides) -> SDTTransformer2DModel:
    """A 2-layer SDT on 8x8x4 latents with 10 classes; ``randomise`` un-zeros adaLN-Zero so outputs vary."""
    torch.manual_seed(seed)
    model = SDTTransformer2DModel(**{**TINY_TRANSFORMER, **overrides})
    if randomise:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name or "attn.gate." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def make_tiny_vae(seed: int = 0):
    """A randomly initialised 2-level AutoencoderKL: 3x16x16 images <-> 4x8x8 latents (factor 2)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
    ).eval()


def forward_backward(model, x, t, y):
    """The output of ``model`` and every parameter's gradient of ``mean(out**2)``."""
    out = model(x, t, y).sample
    out.square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture
def tiny_transformer() -> SDTTransformer2DModel:
    return make_tiny_transformer()


@pytest.fixture
def tiny_vae():
    return make_tiny_vae()


def make_random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """inception-v3-compat with Kaiming convs, BN statistics calibrated on random images, a spread-out fc."""
    with pytest.MonkeyPatch.context() as mp:  # build the architecture without loading any weights
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch sets the statistics
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=gen) * 0.05)
        net.fc.bias.zero_()
        net.train()
        net((torch.rand(4, 3, 32, 32, generator=gen) * 255).to(torch.uint8))  # calibrate BN statistics
    net.eval()
    return net.state_dict()


# ------------------------------------------------------------------------------ training runs inside pytest
def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next in-process run builds a fresh ``Accelerator``."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def call_and_reset(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a trainer's ``train`` or ``main``), then :func:`reset_accelerate` whatever happens."""
    try:
        return fn(*args, **kwargs)
    finally:
        reset_accelerate()


def read_metrics(out: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ attention backends (SDT-H, RMT)
ALL_BACKENDS = ("math", "sdpa", "augmented", "dense", "auto", "reference path")


def backend_outputs_and_grads(model, x, backends=ALL_BACKENDS) -> dict[str, tuple[torch.Tensor, dict]]:
    """``{backend: (output, parameter gradients of sum(out**2))}``; "reference path" is the attention's plain
    layer-by-layer forward with the ``math`` backend."""
    from sdt_diffusion.models.spatial_decay_attention import use_reference_path

    results = {}
    for backend in backends:
        use_reference_path(model, backend == "reference path")
        model.set_attention_backend("math" if backend == "reference path" else backend)
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        results[backend] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    return results


def assert_backends_agree_float64(results: dict[str, tuple[torch.Tensor, dict]]) -> None:
    """Every backend's output and gradients equal ``math``'s to float64 rounding."""
    ref_out, ref_grads = results["math"]
    for backend, (out, grads) in results.items():
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12, msg=backend)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=f"{backend}: {name}")


def spy_backend_choices(monkeypatch) -> dict[tuple[str, int], str]:
    """Record which backend each ``(decay mode, tokens)`` grid resolves to (filled as the model runs)."""
    from sdt_diffusion.attention import backends

    picked: dict[tuple[str, int], str] = {}
    resolve = backends.resolve_backend_name

    def spy(name, device, mode, tokens):
        picked[mode, tokens] = resolve(name, device, mode, tokens)
        return picked[mode, tokens]

    monkeypatch.setattr(backends, "resolve_backend_name", spy)
    return picked
