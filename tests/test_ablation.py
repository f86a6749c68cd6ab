"""benchmarks/ablation.py at a tiny budget: every variant trains through the same trainer, is scored, tabulated,
and a rerun trains nothing again."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ABLATION = Path(__file__).resolve().parent.parent / "benchmarks" / "ablation.py"


def _load():
    spec = importlib.util.spec_from_file_location("ablation", ABLATION)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ablation_runs_dit_and_sdt_variants_and_resumes(tmp_path, capsys):
    ablation = _load()
    argv = ["--variants", "dit", "cdsf", "--alphas", "0.2", "--seeds", "0", "--steps", "2",
            "--batch-size", "8", "--samples-per-class", "1", "--sample-steps", "2", "--output-dir", str(tmp_path)]
    table = ablation.main(argv)
    assert list(table) == ["dit", "cdsf (alpha=0.2)"]
    for stats in table.values():
        assert 0.0 <= stats["class_consistency"]["mean"] <= 1.0
        assert stats["heldout_loss_ema"]["mean"] > 0 and stats["heldout_loss_ema"]["n"] == 1
        assert "frechet_distance_judge" not in stats  # 10 samples < 128 judge features: not computed
    text = (tmp_path / "ablation.md").read_text()
    assert "| dit |" in text and "| cdsf (alpha=0.2) |" in text
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert len(saved["runs"]) == 2
    state = json.loads((tmp_path / "dit" / "seed-0" / "train" / "checkpoint-2" / "training_state.json").read_text())
    assert state["model_config"]["_class_name"] == "DiTTransformer2DModel"
    log = tmp_path / "cdsf-alpha0.2" / "seed-0" / "train.log"
    before = log.stat().st_mtime_ns
    capsys.readouterr()
    ablation.main(argv)  # everything is done: nothing is trained again
    assert log.stat().st_mtime_ns == before
    assert capsys.readouterr().out.count("done earlier") == 2


def test_unknown_variant_is_refused():
    ablation = _load()
    with pytest.raises(SystemExit, match="unknown --variants"):
        ablation.main(["--variants", "cdsf", "rmt"])


@pytest.mark.parametrize("argv, message", [
    (["--latents-dir", "cache", "--fid-reference", "ref.npz", "--fid-num-samples", "5"], "--fid-num-samples must be at least 10"),
    (["--fid-reference", "ref.npz"], "give --latents-dir too"),
])
def test_fid_settings_are_checked_before_any_training(argv, message, tmp_path, capsys):
    ablation = _load()
    with pytest.raises(SystemExit):
        ablation.main([*argv, "--output-dir", str(tmp_path / "runs")])
    assert message in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_the_fid_flags_are_named_as_in_sdt_train_and_the_old_spellings_warn(capsys):
    parser = _load().build_parser()
    old = parser.parse_args(["--fid-samples", "64", "--inception-weights", "w.pth"])
    err = capsys.readouterr().err
    assert "--fid-samples is deprecated" in err and "use --fid-num-samples" in err
    assert "--inception-weights is deprecated" in err and "use --fid-inception-weights" in err
    new = parser.parse_args(["--fid-num-samples", "64", "--fid-inception-weights", "w.pth"])
    assert (old.fid_num_samples, old.fid_inception_weights) == (new.fid_num_samples, new.fid_inception_weights) \
        == (64, "w.pth")
    assert "--fid-samples" not in parser.format_help() and "--fid-num-samples" in parser.format_help()


def test_recipe_defaults_follow_the_mode():
    ablation = _load()
    digits = ablation.fill_mode_defaults(ablation.build_parser().parse_args([]))
    imagenet = ablation.fill_mode_defaults(ablation.build_parser().parse_args(["--latents-dir", "c", "--steps", "9"]))
    assert (digits.steps, digits.batch_size, digits.learning_rate, digits.ema_decay, digits.guidance_scale) == (
        600, 64, 2e-3, 0.99, 5.0)
    assert (imagenet.steps, imagenet.batch_size, imagenet.learning_rate, imagenet.ema_decay,
            imagenet.guidance_scale) == (9, 256, 1e-4, 0.9999, 1.5)


def test_model_kwargs_must_be_a_json_object(capsys):
    ablation = _load()
    with pytest.raises(SystemExit):
        ablation.main(["--model-kwargs", "[1, 2]"])
    assert "must be a JSON object" in capsys.readouterr().err


def test_user_overrides_apply_to_every_variant_but_sdt_fields_skip_dit():
    ablation = _load()
    extra = {"num_layers": 2, "gate_rank": 2}
    _, dit = ablation.digits_model_kwargs(ablation.Variant("dit"), extra)
    _, cdsf = ablation.digits_model_kwargs(ablation.Variant("cdsf", 0.2), extra)
    assert dit["num_layers"] == cdsf["num_layers"] == 2 and "gate_rank" not in dit and "decay_mode" not in dit
    assert (cdsf["gate_rank"], cdsf["decay_mode"], cdsf["alpha"]) == (2, "cdsf", 0.2)


@pytest.mark.slow
def test_imagenet_path_trains_on_a_latent_cache_samples_and_scores_fid(tmp_path):
    """The GPU recipe's code path at toy size on the CPU: latent cache -> trainer -> eval sampler -> metrics."""
    import subprocess

    import numpy as np
    import torch
    from conftest import make_random_inception_state_dict, make_tiny_vae
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("red thing", "blue thing")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            img = np.clip(rng.normal(60, 30, (16, 16, 3)) + np.eye(3)[2 * c] * 150, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "images" / name / f"{i}.png")
    make_tiny_vae().save_pretrained(tmp_path / "vae")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    extract = subprocess.run([*launch, str(ABLATION.parents[1] / "training" / "extract_latents.py"), "--data-dir", str(tmp_path / "images"),
                              "--vae", str(tmp_path / "vae"), "--resolution", "16", "--output-dir",
                              str(tmp_path / "cache"), "--dtype", "float32", "--num-workers", "0"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert extract.returncode == 0 and (tmp_path / "cache" / "metadata.json").exists(), extract.stderr[-3000:]
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    torch.save(make_random_inception_state_dict(), tmp_path / "inception.pth")

    ablation = _load()
    tiny = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "gate_rank": 4, "lpe_kernel_size": 3}
    table = ablation.main(["--latents-dir", str(tmp_path / "cache"), "--model-size", "S", "--patch-size", "2",
                           "--model-kwargs", json.dumps(tiny), "--variants", "dit", "cdsf", "--seeds", "0",
                           "--steps", "2", "--batch-size", "4", "--launcher", " ".join(launch),
                           "--fid-reference", str(tmp_path / "ref.npz"), "--fid-num-samples", "10",
                           "--fid-inception-weights", str(tmp_path / "inception.pth"), "--output-dir",
                           str(tmp_path / "runs")])
    assert list(table) == ["dit", "cdsf"]
    for variant in ("dit", "cdsf"):
        row = json.loads((tmp_path / "runs" / variant / "seed-0" / "result.json").read_text())
        assert row["fid"] is not None and np.isfinite(row["fid"]) and row["fid"] > 0
        assert row["inception_score"] is not None and row["inception_score"] >= 1.0
        with np.load(tmp_path / "runs" / variant / "seed-0" / "samples.npz") as samples:
            assert samples["arr_0"].shape == (10, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
    config = json.loads((tmp_path / "runs" / "dit" / "seed-0" / "train" / "checkpoint-2" / "training_state.json")
                        .read_text())["model_config"]
    assert config["_class_name"] == "DiTTransformer2DModel" and config["num_layers"] == 1
    assert "FID" in (tmp_path / "runs" / "ablation.md").read_text()


def test_factorial_variants_switch_one_sda_part_at_a_time():
    from sdt_diffusion import SDTTransformer2DModel, count_parameters

    ablation = _load()
    names = ["dit-original", "+rope", "+lpe", "+gate", "+cdsf", "sdt-p"]
    assert set(names) <= set(ablation.VARIANTS) and {"dit", "none", "cdsf"} <= set(ablation.VARIANTS)
    models = {}
    for name in names:
        preset, kwargs = ablation.digits_model_kwargs(ablation.Variant(name))
        assert preset == "SDT-P-S/2"
        models[name] = SDTTransformer2DModel(**kwargs)
    base = models["dit-original"].config
    assert (base.decay_mode, base.use_rope, base.use_lpe, base.use_output_gate, base.use_abs_pos_embed) == (
        "none", False, False, False, True)
    for name, field, value in (("+rope", "use_rope", True), ("+lpe", "use_lpe", True),
                               ("+gate", "use_output_gate", True), ("+cdsf", "decay_mode", "cdsf")):
        cfg = models[name].config
        changed = [k for k in ("decay_mode", "use_rope", "use_lpe", "use_output_gate", "use_abs_pos_embed")
                   if cfg[k] != base[k]]
        assert changed == [field] and cfg[field] == value, name
    full = models["sdt-p"].config
    assert (full.decay_mode, full.use_rope, full.use_lpe, full.use_output_gate, full.use_abs_pos_embed) == (
        "cdsf", True, True, True, False)
    assert count_parameters(models["dit-original"]) < count_parameters(models["+lpe"]) < count_parameters(
        models["sdt-p"])
