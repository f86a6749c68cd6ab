"""benchmarks/conditioning.py at toy size: conditional vs. null-label predictions of saved pipelines."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdt_diffusion import SDTPipeline, SDTTransformer2DModel, default_scheduler

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "conditioning.py"


def _load():
    spec = importlib.util.spec_from_file_location("conditioning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _pipeline(folder: Path, seed: int, label_blind: bool = False, channels: int = 3) -> None:
    torch.manual_seed(seed)
    model = SDTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, in_channels=channels,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=2, gate_rank=4, lpe_kernel_size=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # away from adaLN-Zero, so the prediction depends on the label
        if label_blind:
            model.emb.class_embedder.weight.copy_(model.emb.class_embedder.weight[:1].expand(3, -1))
    SDTPipeline(transformer=model.eval(), vae=None, scheduler=default_scheduler()).save_pretrained(folder)


def _images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_label_effect_of_ablation_runs(tmp_path):
    runs = tmp_path / "runs"
    _pipeline(runs / "cdsf" / "seed-0" / "train" / "pipeline", 0)
    _pipeline(runs / "cdsf" / "seed-1" / "train" / "pipeline", 1)
    _pipeline(runs / "blind" / "seed-0" / "train" / "pipeline", 2, label_blind=True)
    _images(tmp_path / "heldout")
    result = _load().main([str(runs), "--data-dir", str(tmp_path / "heldout"), "--timesteps", "50", "950",
                           "--num-samples", "4", "--batch-size", "3", "--output-dir", str(tmp_path / "out")])
    rows = {r["label"]: r for r in result["runs"]}
    assert set(rows) == {"cdsf/seed-0/train/pipeline", "cdsf/seed-1/train/pipeline", "blind/seed-0/train/pipeline"}
    assert all(r["num_samples"] == 4 for r in rows.values())
    for t in ("50", "950"):
        assert rows["blind/seed-0/train/pipeline"]["by_timestep"][t] == {"mse": 0.0, "relative": 0.0}
        for label in ("cdsf/seed-0/train/pipeline", "cdsf/seed-1/train/pipeline"):
            effect = rows[label]["by_timestep"][t]
            assert effect["mse"] > 0 and 0 < effect["relative"] < 10
    means = {s["label"]: s for s in result["summary"]}
    expected = (rows["cdsf/seed-0/train/pipeline"]["by_timestep"]["50"]["mse"]
                + rows["cdsf/seed-1/train/pipeline"]["by_timestep"]["50"]["mse"]) / 2
    assert means["cdsf (mean of 2)"]["by_timestep"]["50"]["mse"] == pytest.approx(expected)
    saved = json.loads((tmp_path / "out" / "conditioning.json").read_text())
    assert saved["runs"] == result["runs"]
    text = (tmp_path / "out" / "conditioning.md").read_text()
    assert "| t=50 | t=950 |" in text and "| blind/seed-0/train/pipeline | 0 | 0 |" in text


def test_the_same_noise_gives_the_same_numbers(tmp_path):
    _pipeline(tmp_path / "pipe", 0)
    _images(tmp_path / "heldout")
    argv = [str(tmp_path / "pipe"), "--data-dir", str(tmp_path / "heldout"), "--timesteps", "500",
            "--num-samples", "6", "--output-dir", str(tmp_path / "out")]
    first, second = _load().main(argv), _load().main(argv)
    assert first["runs"][0]["by_timestep"] == second["runs"][0]["by_timestep"] and first["summary"] == []


@pytest.mark.parametrize("extra, message", [
    (["--timesteps", "1000"], "lie outside the scheduler's 0..999"),
    (["--num-samples", "0"], "--num-samples and --batch-size must be >= 1"),
])
def test_bad_settings_are_refused(tmp_path, capsys, extra, message):
    _pipeline(tmp_path / "pipe", 0)
    _images(tmp_path / "heldout")
    with pytest.raises(SystemExit):
        _load().main([str(tmp_path / "pipe"), "--data-dir", str(tmp_path / "heldout"), *extra,
                      "--output-dir", str(tmp_path / "out")])
    assert message in capsys.readouterr().err


def test_a_folder_without_pipelines_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _load().main([str(tmp_path), "--data-dir", str(tmp_path)])
    assert "holds no pipeline" in capsys.readouterr().err


def _latent_cache(cache: Path, n: int = 6) -> None:
    """A tiny latent cache in the extraction format (``training/extract_latents.py``)."""
    from sdt_diffusion.data import CACHE_FORMAT, CACHE_VERSION

    shard = cache / "shard-00000-of-00001"
    shard.mkdir(parents=True)
    np.save(shard / "mean.npy", np.random.default_rng(0).normal(size=(n, 2, 4, 8, 8)).astype(np.float16))
    np.save(shard / "std.npy", np.full((n, 2, 4, 8, 8), 0.01, np.float16))
    np.save(shard / "labels.npy", np.arange(n) % 2)
    np.save(shard / "indices.npy", np.arange(n))
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "num_samples": n, "num_shards": 1,
            "shards": [shard.name], "latent_shape": [4, 8, 8], "dtype": "float16", "scaling_factor": 0.5}
    (cache / "metadata.json").write_text(json.dumps(meta))


def test_held_out_latents_from_a_cache(tmp_path, capsys):
    conditioning = _load()
    _pipeline(tmp_path / "pipe", 0, channels=4)
    _latent_cache(tmp_path / "cache")
    result = conditioning.main([str(tmp_path / "pipe"), "--latents-dir", str(tmp_path / "cache"), "--timesteps", "250",
                                "--output-dir", str(tmp_path / "out")])
    assert result["runs"][0]["num_samples"] == 6 and result["runs"][0]["by_timestep"]["250"]["mse"] > 0
    _pipeline(tmp_path / "pipe3", 0)  # 3 channels: the cache's 4-channel latents do not fit
    with pytest.raises(SystemExit):
        conditioning.main([str(tmp_path / "pipe3"), "--latents-dir", str(tmp_path / "cache")])
    assert "latents of shape (4, 8, 8), the model takes (3, 8, 8)" in capsys.readouterr().err


def test_variant_folders_given_one_by_one_are_named_after_the_variant(tmp_path):
    """`conditioning.py runs/dit runs/sdt-p`: rows grouped by variant, not all under `seed-0`."""
    conditioning = _load()
    for variant in ("dit", "sdt-p"):
        for seed in (0, 1):
            folder = tmp_path / variant / f"seed-{seed}" / "train" / "pipeline"
            folder.mkdir(parents=True)
            (folder / "model_index.json").write_text("{}")
    found = conditioning.find_pipelines([str(tmp_path / "dit"), str(tmp_path / "sdt-p")])
    assert [(label, group) for label, group, _ in found] == [
        ("dit/seed-0/train/pipeline", "dit"), ("dit/seed-1/train/pipeline", "dit"),
        ("sdt-p/seed-0/train/pipeline", "sdt-p"), ("sdt-p/seed-1/train/pipeline", "sdt-p")]
    # an ablation output folder keeps its variant names as before
    assert [group for _, group, _ in conditioning.find_pipelines([str(tmp_path)])] == ["dit", "dit", "sdt-p", "sdt-p"]
