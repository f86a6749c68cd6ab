"""The CPU demo's pieces: digits data, the judge network, and the whole demo at a tiny budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdt_diffusion.tools import demo, digits


def test_two_scripts_preparing_one_data_root_at_once_both_get_the_whole_split(tmp_path):
    """Two ablations started side by side on one --data-root: neither deletes the other's half-written folder."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: digits.prepare_digits(tmp_path, 8, seed=0), range(3)))
    for data in results:
        files = sorted((tmp_path / "train").rglob("*.png"))
        assert len(files) == len(data.train_labels)
    assert len(list((tmp_path / "heldout").rglob("*.png"))) == len(results[0].heldout_labels)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))]
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: digits.digits_train_subset(results[0], tmp_path, 5), range(2)))
    assert len(list(folders[0].rglob("*.png"))) == 50


def test_digits_split_is_fixed_and_disjoint(tmp_path):
    data = digits.prepare_digits(tmp_path, 8, seed=0)
    assert len(data.train_labels) + len(data.heldout_labels) == 1797
    assert data.train_images.shape[1:] == (8, 8) and data.train_images.dtype == np.uint8
    again = digits.prepare_digits(tmp_path, 8, seed=0)
    np.testing.assert_array_equal(data.heldout_images, again.heldout_images)
    train, held = digits.split_indices(1797, 0.2, 0)
    assert not set(train) & set(held)
    files = sorted((tmp_path / "train").rglob("*.png"))
    assert len(files) == len(data.train_labels)
    assert Image.open(files[0]).size == (8, 8)
    assert sorted(p.name for p in (tmp_path / "heldout").iterdir()) == digits.DIGIT_NAMES
    # the native 8x8 images are scikit-learn's own pixels, rescaled from 0..16 to 0..255
    native, _ = digits.load_digits_arrays(8)
    assert native.max() == 255 and native.min() == 0


def test_judge_known_answers():
    images, labels = digits.load_digits_arrays(8)
    train, held = digits.split_indices(len(images), 0.2, 0)
    judge = digits.train_judge(images[train], labels[train])
    assert judge.class_consistency(images[held], labels[held]) > 0.95  # real held-out digits score high
    assert judge.class_consistency(images[held], (labels[held] + 1) % 10) < 0.05
    rng = np.random.default_rng(0)
    requested = np.arange(2000) % 10
    noise = rng.uniform(0, 1, size=(2000, 8, 8, 3))
    assert abs(judge.class_consistency(noise, requested) - 0.1) < 0.03  # pure noise: chance
    # Frechet distance in the judge's feature space: small between two halves of the real digits,
    # large against noise
    real = images[held]
    same = judge.frechet_distance(real[: len(real) // 2], real[len(real) // 2:])
    assert same < 0.2 * judge.frechet_distance(noise[: len(real)], real)
    assert judge.features(real).shape == (len(real), 128)
    with pytest.raises(ValueError, match="64 pixels"):
        judge.predict(np.zeros((2, 16, 16)))


@pytest.mark.slow
def test_demo_end_to_end_tiny_budget(tmp_path):
    report = demo.run(demo.build_parser().parse_args([
        "--output-dir", str(tmp_path), "--steps", "4", "--batch-size", "8", "--samples-per-class", "1",
        "--eval-samples-per-class", "1", "--sample-steps", "2"]))
    for name in ("samples.png", "loss.png", "decay_maps.png", "report.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    grid = Image.open(tmp_path / "samples.png")
    assert grid.width > demo.DEMO_RESOLUTION and grid.height > 10 * demo.DEMO_RESOLUTION
    loss_png = Image.open(tmp_path / "loss.png")
    assert loss_png.size == (600, 400)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["train_steps"] == 4 and saved["train_seconds"] > 0
    for key in ("class_consistency_guided", "class_consistency_unguided", "classifier_heldout_accuracy"):
        assert 0.0 <= saved[key] <= 1.0
    assert np.isfinite(saved["final_train_loss"]) and np.isfinite(saved["final_heldout_loss_ema"])
    assert (tmp_path / "pipeline" / "model_index.json").exists()
    assert report["outputs"]["samples"].endswith("samples.png")
    # a second run reuses the trained pipeline
    assert demo.main(["--output-dir", str(tmp_path), "--steps", "4", "--samples-per-class", "1",
                      "--eval-samples-per-class", "1", "--sample-steps", "2"]) == 0
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["train_seconds"] is None
