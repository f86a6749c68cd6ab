"""RMT-T/S/B, the paper's classification baseline, built by SDT-H's own code (``SDTH`` with RMT's choices).

RMT's released classification code (qhfan/RMT, ``classfication_release/RMT.py``; T = RMT_T3, S = RMT_S,
B = RMT_M2) fixes the numbers checked here: its parameter counts, the decomposed stages
(``chunkwise_recurrent``), the gamma schedule, the 1D RoPE on the raster index and the absence of an output gate.
The presets are built on the meta device (no weights); the numeric checks use tiny configs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import assert_backends_agree_float64, backend_outputs_and_grads, spy_backend_choices
from torch.utils.flop_counter import FlopCounterMode

from sdt_diffusion.attention import backends as attention_backends
from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.models import count_parameters
from sdt_diffusion.models.sdt_h import (
    PRESET_OF_TIMM_NAME,
    RMT_PRESETS,
    SDT_H_PRESETS,
    SDTH,
    TIMM_NAMES,
    sdt_h_extra_parameters,
    sdt_h_preset,
)
from sdt_diffusion.models.sdt_h_transformers import SDTHConfig, SDTHForImageClassification

# RMT's code: exact trainable parameters; fvcore GFLOPs at 224^2 (2.65 / 4.80 / 10.41, measured on RMT's code).
RMT_PARAMS = {"RMT-T": 14_334_216, "RMT-S": 26_967_240, "RMT-B": 54_154_896}
RMT_GFLOPS = {"RMT-T": 2.65, "RMT-S": 4.80, "RMT-B": 10.41}
RMT_DECOMPOSED_STAGES = {"RMT-T": 2, "RMT-S": 3, "RMT-B": 3}  # chunkwise_recurrents: True in the first 2 / 3 stages
TINY_RMT = dict(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(2, 4, 4, 4),
                mlp_ratios=(2.0, 2.0, 2.0, 2.0), head_hidden_size=24, drop_path_rate=0.0, gate_rank=0, rope_layout="1d",
                decay_modes=("fixed_decomposed", "fixed_decomposed", "fixed", "fixed"))


def meta_preset(name: str, **overrides) -> SDTH:
    with torch.device("meta"):
        return SDTH.from_preset(name, attention_backend="math", **overrides).eval()


def images(batch: int = 2, height: int = 64, width: int = 64, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", list(RMT_PARAMS))
def test_rmt_presets_have_rmts_parameter_count_and_flops(name):
    model = meta_preset(name)
    assert count_parameters(model) == RMT_PARAMS[name]
    cfg = SDT_H_PRESETS[name]
    assert sdt_h_extra_parameters(cfg["embed_dims"], cfg["depths"], cfg["num_heads"], cfg["decay_modes"],
                                  cfg["gate_rank"]) == 0  # no W_g, no output gate
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    gflops = counter.get_total_flops() / 2e9  # 1 multiply-add = 1 FLOP (fvcore's convention)
    assert abs(gflops / RMT_GFLOPS[name] - 1) <= 0.02, f"{name}: {gflops:.2f} GFLOPs vs RMT's {RMT_GFLOPS[name]}"


@pytest.mark.parametrize("name", list(RMT_PARAMS))
def test_rmt_presets_follow_rmts_code(name):
    model = meta_preset(name)
    decomposed = RMT_DECOMPOSED_STAGES[name]
    heads_ranges = (5.0, 5.0, 6.0, 6.0) if name == "RMT-B" else (4.0, 4.0, 6.0, 6.0)
    assert model.rope_layout == "1d" and model.use_rope
    for i, stage in enumerate(model.stages):
        for blk in stage.blocks:
            attn = blk.attn
            assert attn.decay_mode == ("fixed_decomposed" if i < decomposed else "fixed")
            assert attn.gate is None and attn.gate_down is None and attn.gate_up is None
            assert attn.lpe.kernel_size == (5, 5)
            assert (attn.fixed_decay_init, attn.fixed_decay_range) == (2.0, heads_ranges[i])
            assert (blk.gamma_1 is not None) == (name == "RMT-B" and i >= 2)
    # every SDT-H preset's architecture is RMT's preset of the same size
    sdt = SDT_H_PRESETS[name.replace("RMT", "SDT-H")]
    for key in ("embed_dims", "depths", "num_heads", "mlp_ratios", "drop_path_rate", "layer_scale_init_values",
                "fixed_decay_ranges"):
        assert RMT_PRESETS[name][key] == sdt[key], key


def test_fixed_decay_buffers_are_rmts_gamma_schedule():
    model = SDTH(**TINY_RMT, num_labels=3, fixed_decay_ranges=(4.0, 4.0, 6.0, 6.0))
    for i, stage in enumerate(model.stages):
        attn = stage.blocks[0].attn
        expected = torch.log(1 - 2 ** (-2.0 - (4.0 if i < 2 else 6.0) * torch.arange(attn.num_heads) / attn.num_heads))
        torch.testing.assert_close(attn.log_gamma, expected)
        assert "log_gamma" not in dict(model.named_parameters())


def tiny_rmt(seed: int = 0, **overrides) -> SDTH:
    torch.manual_seed(seed)
    return SDTH(**{**TINY_RMT, "num_labels": 5, **overrides})


def test_backends_and_reference_path_agree_float64():
    model = tiny_rmt().double().train()
    assert_backends_agree_float64(backend_outputs_and_grads(model, images(2, 64, 96, dtype=torch.float64)))


def test_auto_never_augments_the_decomposed_fixed_decay(monkeypatch):
    picked = spy_backend_choices(monkeypatch)
    monkeypatch.setattr(attention_backends, "DENSE_MAX_TOKENS_CPU", 0)
    with torch.no_grad():
        tiny_rmt().eval()(images(1, 64, 96))
    # row and column passes (W x W and H x H biases) run on SDPA; the whole-grid fixed decay takes the fused form
    assert picked == {("fixed_decomposed", 384): "sdpa", ("fixed_decomposed", 96): "sdpa", ("fixed", 24): "augmented",
                      ("fixed", 6): "augmented"}


def test_rope_layout_switch(monkeypatch):
    seen = []
    for layout in ("1d", "2d"):
        name = f"rope_{layout}_angles"
        original = getattr(eq, name)

        def spy(height, width, head_dim, base, device, layout=layout, original=original):
            seen.append((layout, height, width, head_dim))
            return original(height, width, head_dim, base, device)

        monkeypatch.setattr(eq, name, spy)
    with torch.no_grad():
        tiny_rmt().eval()(images(1, 64, 96))
        tiny_rmt(rope_layout="2d").eval()(images(1, 32, 32))
    assert seen == [("1d", 16, 24, 8), ("1d", 8, 12, 8), ("1d", 4, 6, 8), ("1d", 2, 3, 8),
                    ("2d", 8, 8, 8), ("2d", 4, 4, 8), ("2d", 2, 2, 8), ("2d", 1, 1, 8)]
    a, b = tiny_rmt(), tiny_rmt(rope_layout="2d")
    b.load_state_dict(a.state_dict())  # the layout changes the function, not the weights
    with torch.no_grad():
        assert not torch.allclose(a.eval()(images()), b.eval()(images()))


def test_bad_rmt_arguments_name_the_problem():
    with pytest.raises(ValueError, match="rope_layout must be one of"):
        SDTH(**{**TINY_RMT, "rope_layout": "raster"})
    with pytest.raises(ValueError, match="1D RoPE needs a head width divisible by 2"):
        SDTH(**{**TINY_RMT, "embed_dims": (18, 32, 32, 32), "num_heads": (6, 4, 4, 4)})
    with pytest.raises(ValueError, match="gate_rank must be an integer >= 0"):
        SDTH(**{**TINY_RMT, "gate_rank": -1})
    with pytest.raises(ValueError, match=r"decay_modes\[0\].*fixed_decomposd"):
        SDTH(**{**TINY_RMT, "decay_modes": ("fixed_decomposd",) + TINY_RMT["decay_modes"][1:]})
    with pytest.raises(ValueError, match="rope_layout"):
        SDTHConfig(**{**TINY_RMT, "rope_layout": "3d"})


def test_the_trainer_and_classifier_lookups_know_the_rmt_presets():
    assert [TIMM_NAMES[n] for n in RMT_PARAMS] == ["rmt_tiny", "rmt_small", "rmt_base"]
    assert {PRESET_OF_TIMM_NAME[TIMM_NAMES[n]] for n in RMT_PARAMS} == set(RMT_PARAMS)
    assert sdt_h_preset("RMT-T") == RMT_PRESETS["RMT-T"] and sdt_h_preset("RMT-T") is not RMT_PRESETS["RMT-T"]
    with pytest.raises(ValueError, match="RMT-X.*RMT-T"):
        sdt_h_preset("RMT-X")


def test_timm_models():
    timm = pytest.importorskip("timm")
    assert {"rmt_tiny", "rmt_small", "rmt_base"} <= set(timm.list_models("rmt_*"))
    small = {k: v for k, v in TINY_RMT.items() if k not in ("gate_rank", "rope_layout", "decay_modes")}
    model = timm.create_model("rmt_tiny", num_classes=5, **small).eval()
    assert isinstance(model, SDTH) and model.rope_layout == "1d" and model.decay_modes == TINY_RMT["decay_modes"]
    assert model.pretrained_cfg["classifier"] == "head.fc" and model.pretrained_cfg["crop_pct"] == 0.875
    with torch.no_grad():
        assert model(images()).shape == (2, 5)
    with torch.device("meta"):
        assert count_parameters(timm.create_model("rmt_small")) == RMT_PARAMS["RMT-S"]
    feats = timm.create_model("rmt_base", features_only=True, out_indices=(1, 2), **small)
    with torch.no_grad():
        assert [m.shape for m in feats(images(1, 64, 64))] == [(1, 32, 8, 8), (1, 32, 4, 4)]


def test_transformers_config_preset_and_round_trip(tmp_path):
    config = SDTHConfig.from_preset("RMT-B")
    assert (config.rope_layout, config.gate_rank, config.decay_modes[-2:]) == ("1d", 0, ["fixed_decomposed", "fixed"])
    with torch.device("meta"):
        hf = SDTHForImageClassification(config)
    assert count_parameters(hf) == RMT_PARAMS["RMT-B"]
    torch.manual_seed(0)
    clf = SDTHForImageClassification(SDTHConfig(**TINY_RMT, num_labels=3)).eval()
    clf.save_pretrained(tmp_path)
    again = SDTHForImageClassification.from_pretrained(tmp_path).eval()
    assert again.config.rope_layout == "1d" and again.config.gate_rank == 0
    with torch.no_grad():
        torch.testing.assert_close(again(images()).logits, clf(images()).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- ablation rows
def _ablation_module():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ablation_classification.py"
    spec = importlib.util.spec_from_file_location("ablation_classification_rows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_rows_are_the_papers():
    ablation = _ablation_module()
    rows = {r.name: r for r in ablation.table_rows(3, "SDT-H-T")}
    assert list(rows) == ["none", "fixed", "cdsf", "rmt"]
    assert rows["none"].decay_modes == ("none",) * 4  # no decay in any stage, 1-2 included
    assert rows["fixed"].decay_modes == ("fixed_decomposed", "fixed_decomposed", "fixed", "fixed")
    assert rows["cdsf"].decay_modes == ("decomposed", "decomposed", "cdsf", "cdsf")
    assert (rows["rmt"].model, rows["rmt"].decay_modes) == ("RMT-T", RMT_PRESETS["RMT-T"]["decay_modes"])
    assert len({r.folder for r in rows.values()}) == 4
    table4 = ablation.table_rows(4, "SDT-H-S")
    assert [r.decay_modes for r in table4] == [("decomposed", "decomposed", m, m)
                                              for m in ("1d", "bidirectional", "decomposed", "cdsf")]
    table5 = ablation.table_rows(5, "SDT-H-T")
    assert [r.alpha for r in table5] == [0.05, None, 0.15, 0.2]
    assert table5[1].folder == rows["cdsf"].folder == table4[-1].folder.replace("SDT-H-S", "SDT-H-T")  # one run
    assert ablation.describe(rows["fixed"]) == ("SDT-H-T: stage 1 fixed_decomposed, stage 2 fixed_decomposed, "
                                                "stage 3 fixed, stage 4 fixed")
    cmd = ablation.run_command(ablation.build_parser().parse_args([]), table5[0], 0, Path("out"), (Path("a"), Path("b")))
    assert cmd[cmd.index("--alpha") + 1] == "0.05" and cmd[cmd.index("--decay-mode") + 1] == "decomposed,decomposed,cdsf,cdsf"
    cmd = ablation.run_command(ablation.build_parser().parse_args([]), rows["rmt"], 0, Path("out"), (Path("a"), Path("b")))
    assert cmd[cmd.index("--model") + 1] == "RMT-T" and "--alpha" not in cmd
    assert ablation.main(["--table", "3", "--stages", "1,2"]) == 2  # --stages belongs to --modes
    with pytest.raises(SystemExit):
        ablation.build_parser().parse_args(["--table", "3", "--modes", "none"])


def test_the_evaluator_tells_rmt_from_sdt_h_of_the_same_size():
    """RMT-T and SDT-H-T share widths, depths and heads: the evaluator's row must still name the right model
    and put the right paper row (Table 1) beside it."""
    from sdt_diffusion.evaluation.classification import PAPER_TABLE1, markdown_rows, preset_of
    from sdt_diffusion.models.sdt_h_transformers import SDTHConfig

    assert preset_of(SDTHConfig.from_preset("RMT-T").to_dict()) == "RMT-T"
    assert preset_of(SDTHConfig.from_preset("SDT-H-T").to_dict()) == "SDT-H-T"
    assert preset_of({**SDTHConfig.from_preset("RMT-T").to_dict(), "gate_rank": 16}) is None  # neither model
    assert PAPER_TABLE1["RMT-T"]["top1"] == 82.4 and PAPER_TABLE1["SDT-H-T"]["top1"] == 82.7
    row = markdown_rows({"preset": "RMT-T", "top1": 50.0, "top5": 90.0, "images": 10, "resolution": 224,
                         "params": 14_334_216, "model": "x"})
    assert "RMT-T" in row and "82.4" in row
