"""The CPU demo's pieces: digits data, the class-consistency judge, and the whole demo at a tiny budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdt_diffusion.tools import demo


def test_digits_split_is_fixed_and_disjoint(tmp_path):
    data = demo.prepare_digits(tmp_path, 16, seed=0)
    assert len(data.train_labels) + len(data.heldout_labels) == 1797
    assert data.train_images.shape[1:] == (16, 16) and data.train_images.dtype == np.uint8
    again = demo.prepare_digits(tmp_path, 16, seed=0)
    np.testing.assert_array_equal(data.heldout_images, again.heldout_images)
    train, held = demo.split_indices(1797, 0.2, 0)
    assert not set(train) & set(held)
    files = sorted((tmp_path / "train").rglob("*.png"))
    assert len(files) == len(data.train_labels)
    assert Image.open(files[0]).size == (16, 16)
    assert sorted(p.name for p in (tmp_path / "heldout").iterdir()) == demo.DIGIT_NAMES


def test_class_consistency_known_answers():
    images, labels = demo.load_digits_arrays(16)
    train, held = demo.split_indices(len(images), 0.2, 0)
    clf = demo.train_digit_classifier(images[train], labels[train])
    real = demo.class_consistency(clf, images[held], labels[held])
    assert real > 0.95  # real held-out digits score high
    rng = np.random.default_rng(0)
    requested = np.arange(2000) % 10
    noise = rng.uniform(0, 1, size=(2000, 16, 16, 3))
    chance = demo.class_consistency(clf, noise, requested)
    assert abs(chance - 0.1) < 0.03  # pure noise scores near chance
    assert demo.class_consistency(clf, images[held], (labels[held] + 1) % 10) < 0.05


@pytest.mark.slow
def test_demo_end_to_end_tiny_budget(tmp_path):
    report = demo.main(["--output-dir", str(tmp_path), "--steps", "4", "--batch-size", "8",
                        "--samples-per-class", "1", "--sample-steps", "2"])
    for name in ("samples.png", "loss.png", "decay_maps.png", "report.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    grid = Image.open(tmp_path / "samples.png")
    assert grid.width > 16 and grid.height > 10 * 16
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
    again = demo.main(["--output-dir", str(tmp_path), "--steps", "4", "--samples-per-class", "1",
                       "--sample-steps", "2"])
    assert again["train_seconds"] is None
