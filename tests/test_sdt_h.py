"""SDT-H, the hierarchical classification backbone: architecture, presets, backends, timm and transformers faces.

Tiny configs (widths 16/32/32/32, one block per stage, 64x64 inputs) everywhere except the preset checks,
which build the three presets on the meta device (no weights, no compute) to count parameters and FLOPs.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_backends_agree_float64, backend_outputs_and_grads, spy_backend_choices
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoBackbone, AutoConfig, AutoModelForImageClassification, pipeline

import sdt_diffusion
from sdt_diffusion.attention import backends as attention_backends
from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.attention.modes import DecayInputs, decay_mode
from sdt_diffusion.models import count_parameters
from sdt_diffusion.models.sdt_h import (
    DEFAULT_DECAY_MODES,
    SDT_H_PRESETS,
    SDTH,
    sdt_h_extra_parameters,
)
from sdt_diffusion.models.sdt_h_transformers import (
    SDTHBackbone,
    SDTHConfig,
    SDTHForImageClassification,
    SDTHModel,
    sdt_h_image_processor,
)
from sdt_diffusion.models.spatial_decay_attention import SpatialDecayAttention

TINY = dict(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(2, 4, 4, 4), mlp_ratios=(2.0, 2.0, 2.0, 2.0),
            gate_rank=4, head_hidden_size=24, drop_path_rate=0.0)
ALL_MODES = ("none", "fixed", "1d", "bidirectional", "decomposed", "fixed_decomposed", "cdsf")
# Paper, Table 1; RMT's released models (RMT_T3, RMT_S, RMT_M2), exact trainable parameter counts.
PAPER = {"SDT-H-T": (14e6, 2.7), "SDT-H-S": (27e6, 4.8), "SDT-H-B": (54e6, 10.8)}
RMT_PARAMS = {"SDT-H-T": 14_334_216, "SDT-H-S": 26_967_240, "SDT-H-B": 54_154_896}


def tiny(seed: int = 0, randomise_gates: bool = True, **overrides) -> SDTH:
    """A tiny SDT-H; ``randomise_gates`` gives W_g non-zero weights so that the decay differs between tokens."""
    torch.manual_seed(seed)
    model = SDTH(**{**TINY, "num_labels": 5, **overrides})
    if randomise_gates:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "attn.gate." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def images(batch: int = 2, height: int = 64, width: int = 64, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------- presets
def meta_preset(name: str, **overrides) -> SDTH:
    with torch.device("meta"):
        return SDTH.from_preset(name, attention_backend="math", **overrides).eval()


@pytest.mark.parametrize("name", list(PAPER))  # the RMT presets: tests/test_rmt.py
def test_preset_parameters_and_flops_match_the_paper(name):
    model = meta_preset(name)
    params = count_parameters(model)
    paper_params, paper_gflops = PAPER[name]
    assert abs(params - paper_params) <= 0.5e6, f"{name}: {params / 1e6:.3f}M vs the paper's {paper_params / 1e6:.0f}M"
    # RMT's macro-architecture exactly; SDT adds only the gates W_g and the low-rank output gate.
    cfg = SDT_H_PRESETS[name]
    extra = sdt_h_extra_parameters(cfg["embed_dims"], cfg["depths"], cfg["num_heads"], DEFAULT_DECAY_MODES,
                                   cfg["gate_rank"])
    assert params - extra == RMT_PARAMS[name]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    gflops = counter.get_total_flops() / 2e9  # 1 multiply-add = 1 FLOP (the paper's / fvcore's convention)
    assert abs(gflops / paper_gflops - 1) <= 0.10, f"{name}: {gflops:.2f} GFLOPs vs the paper's {paper_gflops}"


def test_preset_structure_follows_rmt():
    b = meta_preset("SDT-H-B")
    blocks = [blk for stage in b.stages for blk in stage.blocks]
    assert len(blocks) == 45
    rates = [blk.drop_path_rate for blk in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4)
    steps = [b2 - b1 for b1, b2 in zip(rates, rates[1:])]
    assert max(steps) - min(steps) < 1e-12  # linear in depth
    for i, stage in enumerate(b.stages):  # layer scale in stages 3-4 only (RMT_M2), decay modes per stage
        for blk in stage.blocks:
            assert (blk.gamma_1 is not None) == (i >= 2)
            assert blk.attn.decay_mode == DEFAULT_DECAY_MODES[i]
    assert b.stages[0].blocks[0].attn.head_dim == 16 and b.stages[3].blocks[0].attn.head_dim == 32
    assert b.no_weight_decay() == {n for n, _ in b.named_parameters() if n.endswith(("gamma_1", "gamma_2"))}
    t = meta_preset("SDT-H-T")
    assert [len(s.blocks) for s in t.stages] == [2, 2, 8, 2]
    assert all(blk.gamma_1 is None for s in t.stages for blk in s.blocks)


def test_unknown_preset_and_decay_mode_name_the_problem():
    with pytest.raises(ValueError, match="SDT-H-X"):
        SDTH.from_preset("SDT-H-X")
    with pytest.raises(ValueError, match=r"decay_modes\[2\].*'cdfs'"):
        SDTH(**{**TINY, "decay_modes": ("decomposed", "decomposed", "cdfs", "cdsf")})
    with pytest.raises(ValueError, match="decay_modes must have one entry per stage"):
        SDTH(**{**TINY, "decay_modes": ("cdsf", "cdsf")})
    with pytest.raises(ValueError, match="head width divisible by 4"):
        SDTH(**{**TINY, "num_heads": (8, 4, 4, 4)})
    with pytest.raises(ValueError, match="attention_backend"):
        SDTH(**TINY, attention_backend="fast")


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("height, width", [(64, 64), (64, 96), (96, 32)])
def test_any_size_divisible_by_32(height, width):
    model = tiny().eval()
    x = images(2, height, width)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        maps = model.forward_intermediates(x, intermediates_only=True)
    for i, fmap in enumerate(maps):
        stride = 4 * 2**i
        assert fmap.shape == (2, TINY["embed_dims"][i], height // stride, width // stride)


def test_bad_input_fails_before_any_compute():
    model = tiny().eval()
    ran = []
    model.stem.register_forward_hook(lambda *_: ran.append(True))
    cases = [
        (images()[:, :2], "2 channels.*num_channels=3"),
        (images(2, 64, 80), "64x80 is not divisible by 32"),
        (images(2, 48, 64), "48x64 is not divisible by 32"),
        (images()[0], r"\(B, C, H, W\)"),
        (images().long(), "floating point"),
    ]
    for x, match in cases:
        for call in (model, model.forward_features, lambda t: model.forward_intermediates(t)):
            with pytest.raises(ValueError, match=match):
                call(x)
    with pytest.raises(ValueError, match="out_indices.*4"):
        model.forward_intermediates(images(), indices=(0, 4))
    with pytest.raises(ValueError, match="out_indices.*-5"):
        model.forward_intermediates(images(), indices=[-5])
    with pytest.raises(ValueError, match="last-n value 5"):
        model.forward_intermediates(images(), indices=5)
    assert not ran


def test_every_decay_mode_in_every_stage():
    for mode in ALL_MODES:
        model = tiny(decay_modes=(mode,) * 4).eval()
        assert all(blk.attn.decay_mode == mode for s in model.stages for blk in s.blocks)
        with torch.no_grad():
            assert torch.isfinite(model(images())).all()


@pytest.mark.parametrize("modes", [DEFAULT_DECAY_MODES, ("none", "fixed", "1d", "bidirectional"),
                                   ("cdsf", "decomposed", "fixed", "none")])
def test_backends_agree_with_math_on_outputs_and_gradients_float64(modes):
    """Every backend (auto: the fused one where the decay allows) and the attention's reference path against the
    dense reference, float64."""
    model = tiny(decay_modes=modes).double().train()  # train: BatchNorm uses batch statistics (deterministic)
    results = backend_outputs_and_grads(model, images(2, 64, 96, dtype=torch.float64))
    gate_grads = [n for n in results["math"][1] if "attn.gate." in n]
    assert gate_grads and all(results["math"][1][n].abs().max() > 0 for n in gate_grads)  # gradients reach W_g
    assert_backends_agree_float64(results)


def test_auto_runs_the_fused_backend_where_the_decay_allows(monkeypatch):
    picked = spy_backend_choices(monkeypatch)
    model = tiny(decay_modes=("decomposed", "1d", "cdsf", "fixed")).eval()
    with torch.no_grad():
        model(images(1, 64, 96))
        # CDSF and the fixed decay: exact and fused, no L x L tensor kept (on CPU "dense" up to 576 tokens per
        # image, "augmented" above); decomposed: H x H and W x W biases only; 1d: no fused form on CPU.
        assert picked == {("decomposed", 384): "sdpa", ("1d", 96): "sdpa", ("cdsf", 24): "dense", ("fixed", 6): "dense"}
        monkeypatch.setattr(attention_backends, "DENSE_MAX_TOKENS_CPU", 0)
        picked.clear()
        model(images(1, 64, 96))
    assert picked[("cdsf", 24)] == "augmented" and picked[("fixed", 6)] == "augmented"


def test_grids_and_rope_follow_the_feature_map(monkeypatch):
    seen = []
    rope_2d_angles = eq.rope_2d_angles

    def spy(height, width, head_dim, base, device):
        seen.append((height, width, head_dim))
        return rope_2d_angles(height, width, head_dim, base, device)

    monkeypatch.setattr(eq, "rope_2d_angles", spy)
    model = tiny().eval()
    with torch.no_grad():
        model(images(1, 64, 96))
        model(images(1, 32, 64))
    assert seen == [(16, 24, 8), (8, 12, 8), (4, 6, 8), (2, 3, 8), (8, 16, 8), (4, 8, 8), (2, 4, 8), (1, 2, 8)]


def test_gradient_checkpointing_gives_the_same_gradients():
    x = images()
    grads = []
    for enable in (False, True):
        model = tiny().double().train()
        model.set_grad_checkpointing(enable)
        model(x.double()).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12)


def test_drop_path_and_head_api():
    model = tiny(drop_path_rate=0.5).train()
    x = images(4)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))  # stochastic depth in training
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape == (4, 32, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (4, 24)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (4, 24)
    model.reset_classifier(7)
    assert model(x).shape == (4, 7)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "max")


def test_tiny_model_learns():
    model = tiny(num_labels=3).train()
    x, y = images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]


# ---------------------------------------------------------------------------------------------- gate initialisation
def _gate_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.state_dict().items() if ".attn.gate" in n}


def _assert_unit_output_gates(model) -> None:
    """U = sigma(X W_u1) W_u2 is exactly 1 on random tokens in every block."""
    attns = [m for m in model.modules() if isinstance(m, SpatialDecayAttention)]
    assert attns and all(a.gate_down is not None for a in attns)
    for a in attns:
        x = torch.randn(2, 9, a.qkv.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(a.gate_up(torch.sigmoid(a.gate_down(x))), torch.ones(2, 9, a.qkv.in_features))


def test_output_gate_init_unit_makes_the_gate_exactly_one_in_every_face():
    timm = pytest.importorskip("timm")
    _assert_unit_output_gates(tiny(randomise_gates=False, output_gate_init="unit"))
    _assert_unit_output_gates(timm.create_model("sdt_h_tiny", num_classes=5, output_gate_init="unit", **TINY))
    _assert_unit_output_gates(SDTHForImageClassification(tiny_config(output_gate_init="unit")))
    model = tiny(randomise_gates=False)  # the default: a small random-signed factor
    attn = model.stages[0].blocks[0].attn
    u = attn.gate_up(torch.sigmoid(attn.gate_down(torch.randn(4, attn.qkv.in_features))))
    assert u.abs().max() < 0.5 and (u > 0).any() and (u < 0).any()


def test_decay_gate_init_rmt_starts_each_stage_at_rmts_gamma():
    """Each head's decay per unit of distance starts at RMT's log gamma_h with that stage's range (CDSF: alpha G)."""
    ranges, init, alpha = (3.0, 4.0, 5.0, 6.0), 1.5, 0.2
    arch = dict(decay_modes=("decomposed", "1d", "cdsf", "cdsf"), fixed_decay_ranges=ranges, fixed_decay_init=init,
                alpha=alpha, decay_gate_init="rmt")
    for model in (tiny(randomise_gates=False, **arch),
                  SDTHForImageClassification(tiny_config(**arch)).sdt_h.encoder):
        for i, stage in enumerate(model.stages):
            attn = stage.blocks[0].attn
            gamma = eq.rmt_log_gamma(attn.num_heads, init, ranges[i])
            assert len(set(gamma.tolist())) == attn.num_heads  # distinct per head
            x = torch.randn(2, 16, attn.qkv.in_features)
            with torch.no_grad():
                decay = attn.decay_inputs(x, 4, 4)
            if attn.decay_mode == "decomposed":
                for logits in (decay.gate_logits_h, decay.gate_logits_w):
                    torch.testing.assert_close(torch.nn.functional.logsigmoid(logits), gamma.expand(2, 16, -1))
                continue
            scale = alpha if attn.decay_mode == "cdsf" else 1.0
            torch.testing.assert_close(scale * decay.gates, gamma.expand(2, 16, -1))
            if attn.decay_mode == "cdsf":  # the whole bias is RMT's fixed decay on the grid
                fixed = decay_mode("fixed").dense_bias(DecayInputs("fixed", 4, 4, log_gamma=gamma))
                torch.testing.assert_close(decay_mode("cdsf").dense_bias(decay), fixed.expand(2, -1, -1, -1))


def test_gate_init_defaults_are_unchanged():
    """The defaults write nothing and draw nothing: W_g = 0 with bias 0, U's layers truncated-normal; "rmt" only
    changes the gate biases (no random draws), so the rest of the model is the same for a seed."""
    torch.manual_seed(0)
    default = SDTH(**TINY, num_labels=5)
    after_default = torch.get_rng_state()
    torch.manual_seed(0)
    explicit = SDTH(**TINY, num_labels=5, output_gate_init="xavier", decay_gate_init="zero")
    torch.manual_seed(0)
    rmt = SDTH(**TINY, num_labels=5, decay_gate_init="rmt")
    assert torch.equal(torch.get_rng_state(), after_default)
    a, b, c = default.state_dict(), explicit.state_dict(), rmt.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], c[k])}
    assert changed == {k for k in a if k.endswith("attn.gate.bias")}
    for name, p in _gate_tensors(default).items():
        if ".attn.gate." in name:
            assert not p.any()
        else:
            assert 0.01 < p.std() < 0.03
    # transformers' own init (post_init) visits the attention too: W_g = 0 there as well
    hf = SDTHForImageClassification(tiny_config())
    gates = {n: p for n, p in hf.named_parameters() if ".attn.gate." in n}
    assert gates and not any(p.any() for p in gates.values())


def test_gate_init_is_validated_saved_and_never_touches_loaded_weights(tmp_path):
    for face in (SDTH, SDTHConfig):
        with pytest.raises(ValueError, match="output_gate_init must be one of"):
            face(**TINY, output_gate_init="ones")
        with pytest.raises(ValueError, match="decay_gate_init must be one of"):
            face(**TINY, decay_gate_init="RMT")
    with pytest.raises(ValueError, match="alpha > 0"):
        SDTH(**TINY, decay_gate_init="rmt", alpha=0.0)
    model = SDTHForImageClassification(tiny_config(output_gate_init="unit", decay_gate_init="rmt")).eval()
    with torch.no_grad():  # trained gates: the loaded values must survive the gate init
        for p in _gate_tensors(model).values():
            p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["output_gate_init"] == "unit" and config["decay_gate_init"] == "rmt"
    loaded = SDTHForImageClassification.from_pretrained(tmp_path)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


# ---------------------------------------------------------------------------------------------- timm
def test_timm_models_and_features_only():
    timm = pytest.importorskip("timm")
    assert {"sdt_h_tiny", "sdt_h_small", "sdt_h_base"} <= set(timm.list_models("sdt_h*"))
    model = timm.create_model("sdt_h_tiny", num_classes=5, **TINY).eval()
    assert isinstance(model, SDTH) and model.num_classes == 5 and model.num_features == 32
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    with torch.no_grad():
        assert model(images()).shape == (2, 5)

    feats = timm.create_model("sdt_h_tiny", features_only=True, out_indices=(0, 1, 2, 3), **TINY).eval()
    assert feats.feature_info.channels() == [16, 32, 32, 32]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = feats(images(2, 64, 96))
    assert [m.shape for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]

    pruned = timm.create_model("sdt_h_tiny", features_only=True, out_indices=(1,), **TINY)
    assert len(pruned.model.stages) == 2 and pruned.model.head is None
    with pytest.raises(ValueError, match="out_indices.*4"):
        timm.create_model("sdt_h_tiny", features_only=True, out_indices=(0, 4), **TINY)
    with pytest.raises(ValueError, match="decay_modes"):
        timm.create_model("sdt_h_tiny", decay_modes=("cdsf",) * 3, **{k: v for k, v in TINY.items()})
    with pytest.raises(ValueError, match="num_classes"):
        timm.create_model("sdt_h_tiny", num_labels=3, **TINY)


def test_everything_but_the_timm_names_works_without_timm():
    code = (
        "import sys; sys.modules['timm'] = None\n"  # as if timm were not installed
        "import torch, sdt_diffusion\n"
        "from sdt_diffusion.models.sdt_h import SDTH\n"
        "assert 'sdt_diffusion.models.sdt_h_timm' not in sys.modules\n"
        f"model = SDTH(**{TINY!r}, num_labels=3).eval()\n"
        f"clf = sdt_diffusion.SDTHForImageClassification(sdt_diffusion.SDTHConfig(**{TINY!r}, num_labels=3)).eval()\n"
        "x = torch.randn(1, 3, 64, 64)\n"
        "print(tuple(model(x).shape), tuple(clf(x).logits.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "(1, 3) (1, 3)"


def test_timm_keyword_arguments_and_training_helpers():
    timm = pytest.importorskip("timm")
    model = timm.create_model("sdt_h_small", decay_modes=("decomposed",) * 3 + ("cdsf",), alpha=0.05,
                              **{**TINY, "depths": (1, 1, 2, 1)})
    assert [blk.attn.decay_mode for blk in model.stages[2].blocks] == ["decomposed", "decomposed"]
    assert model.stages[3].blocks[0].attn.alpha == 0.05
    timm_optim = pytest.importorskip("timm.optim")
    opt = timm_optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == 7  # stem, 5 blocks (downsamples join their stage's first block), head
    assert model.pretrained_cfg["classifier"] == "head.fc" and model.pretrained_cfg["first_conv"] == "stem.0"
    assert model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels == 3


# ---------------------------------------------------------------------------------------------- transformers
def tiny_config(**overrides) -> SDTHConfig:
    return SDTHConfig(**{**TINY, "num_labels": 5, **overrides})


def test_config_fields_are_sdt_h_arguments():
    arch = set(inspect.signature(SDTH).parameters) - {"num_labels"}
    cfg = SDTHConfig()
    assert arch <= set(cfg.to_dict())
    assert set(cfg.sdt_h_kwargs()) == arch
    assert cfg.num_labels == 1000 and tuple(cfg.decay_modes) == DEFAULT_DECAY_MODES  # default: SDT-H-T
    assert SDTHConfig.from_preset("SDT-H-B").layer_scale_init_values == [None, None, 1e-6, 1e-6]
    with pytest.raises(ValueError, match="decay_modes"):
        SDTHConfig(decay_modes=["decomposed", "decomposed", "cdsf", "sparse"])
    with pytest.raises(ValueError, match="out_indices"):
        SDTHConfig(out_indices=[1, 5])
    with pytest.raises(ValueError, match="SDT-H-Q"):
        SDTHConfig.from_preset("SDT-H-Q")


def test_all_classes_exported_from_the_package():
    for name in ("SDTHConfig", "SDTHModel", "SDTHForImageClassification", "SDTHBackbone"):
        assert name in sdt_diffusion.__all__ and getattr(sdt_diffusion, name) is not None


def test_save_pretrained_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    model = SDTHForImageClassification(tiny_config(decay_modes=["decomposed", "fixed", "cdsf", "none"])).eval()
    with torch.no_grad():  # non-trivial gates and BatchNorm statistics
        for name, p in model.named_parameters():
            if "attn.gate." in name:
                p.normal_(0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= files
    assert not any(f.endswith(".bin") for f in files)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SDTHConfig)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is SDTHForImageClassification
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    for a, b in zip(model.modules(), loaded.modules()):  # the non-persistent RMT gammas are rebuilt
        if getattr(a, "log_gamma", None) is not None:
            assert torch.equal(a.log_gamma, b.log_gamma)
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_classification_loss_hidden_states_and_tuple_output():
    model = SDTHForImageClassification(tiny_config()).train()
    # transformers 5 renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert model.sdt_h.encoder.gradient_checkpointing
    x, labels = images(), torch.tensor([1, 4])
    out = model(x, labels=labels, output_hidden_states=True)
    expected = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert [h.shape for h in out.hidden_states] == [(2, 16, 16, 16), (2, 16, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4),
                                                    (2, 32, 2, 2)]
    model.eval()
    with torch.no_grad():
        loss, logits = model(x, labels=labels, return_dict=False)
        base = SDTHModel(tiny_config())(x)
    assert logits.shape == (2, 5) and loss.dim() == 0
    assert base.last_hidden_state.shape == (2, 32, 2, 2) and base.pooler_output.shape == (2, 24)
    with pytest.raises(ValueError, match="channels"):
        model(images()[:, :1])


def test_backbone_feature_maps(tmp_path):
    config = tiny_config(out_features=["stage1", "stage2", "stage3", "stage4"])
    backbone = AutoBackbone.from_config(config).eval()
    assert type(backbone) is SDTHBackbone and backbone.encoder.head is None
    assert backbone.channels == [16, 32, 32, 32]
    with torch.no_grad():
        maps = backbone(images(2, 64, 96)).feature_maps
    assert [m.shape for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    # A backbone loads the encoder of a saved classifier (the head's weights are left out).
    torch.manual_seed(1)
    clf = SDTHForImageClassification(tiny_config()).eval()
    clf.save_pretrained(tmp_path)
    loaded = SDTHBackbone.from_pretrained(tmp_path, out_indices=[2, 4]).eval()
    assert loaded.out_features == ["stage2", "stage4"]
    with torch.no_grad():
        ref = clf.sdt_h.encoder.forward_stages(images())
        got = loaded(images()).feature_maps
    assert torch.equal(got[0], ref[2]) and torch.equal(got[1], ref[4])


def test_pipeline_image_classification_offline(tmp_path):
    config = tiny_config(id2label={i: f"class_{i}" for i in range(5)})
    SDTHForImageClassification(config).save_pretrained(tmp_path)
    with open(tmp_path / "preprocessor_config.json") as f:
        proc = json.load(f)
    assert proc["image_mean"] == [0.485, 0.456, 0.406] and proc["image_std"] == [0.229, 0.224, 0.225]
    assert proc["size"] == {"shortest_edge": 224} and proc["crop_pct"] == 0.875 and proc["resample"] == 3
    image = Image.fromarray((torch.rand(300, 400, 3) * 255).to(torch.uint8).numpy())
    assert sdt_h_image_processor()(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)
    classify = pipeline("image-classification", model=str(tmp_path))
    preds = classify(image, top_k=5)
    assert len(preds) == 5 and {p["label"] for p in preds} == {f"class_{i}" for i in range(5)}
    assert sum(p["score"] for p in preds) == pytest.approx(1.0, abs=1e-5)


def test_set_attention_backend_is_saved(tmp_path):
    model = SDTHForImageClassification(tiny_config())
    model.set_attention_backend("sdpa")
    assert model.sdt_h.encoder.attention_backend == "sdpa"
    model.save_pretrained(tmp_path)
    assert SDTHForImageClassification.from_pretrained(tmp_path).sdt_h.encoder.attention_backend == "sdpa"
    with pytest.raises(ValueError, match="backend"):
        model.set_attention_backend("nope")
