"""Tests of the metric formulas on feature arrays (sdt_diffusion.evaluation.formulas): FID, Inception Score,
precision/recall, against closed forms, hand-made sets and torch-fidelity's own routines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from sdt_diffusion.evaluation import feature_statistics, frechet_distance, inception_score, precision_recall


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(2000, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    mu, sigma = feature_statistics(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_matches_the_analytic_frechet_distance():
    rng = np.random.default_rng(0)
    d = 6
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    analytic = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    # exact statistics: closed form to rounding error
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(analytic, rel=1e-10)
    # large samples from the two Gaussians approach it
    x1 = m1 + rng.normal(size=(100_000, d)) * np.sqrt(s1)
    x2 = m2 + rng.normal(size=(100_000, d)) * np.sqrt(s2)
    assert frechet_distance(*feature_statistics(x1), *feature_statistics(x2)) == pytest.approx(analytic, rel=0.02)


def test_fid_agrees_with_torch_fidelity_on_full_covariances():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 20)), rng.normal(size=(20, 20))
    s1, s2 = a @ a.T / 20 + 0.1 * np.eye(20), b @ b.T / 20 + 0.1 * np.eye(20)
    m1, m2 = rng.normal(size=20), rng.normal(size=20)
    theirs = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, verbose=False)[KEY_METRIC_FID]
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(theirs, rel=1e-8)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(m1, s1, m2[:5], s2[:5, :5])


def test_inception_score_on_hand_made_logits():
    assert inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)
    # 10 contiguous splits of 4; each split holds 4 confident, distinct classes -> IS = 4 per split
    labels = np.tile(np.arange(4), 10) + np.repeat(np.arange(10), 4)
    logits = np.full((40, 1008), -50.0)
    logits[np.arange(40), labels] = 50.0
    assert inception_score(logits, splits=10) == pytest.approx(4.0, rel=1e-9)
    # the same rows shuffled across splits would give a different score: no shuffling is part of the definition
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 7)) * 3
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    direct = np.mean([np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), axis=1))) for q in np.split(p, 3)])
    assert inception_score(x, splits=3) == pytest.approx(direct, rel=1e-9)
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(x[:5])


def _square(corner: tuple[float, float], side: float = 1.0) -> list[tuple[float, float]]:
    x, y = corner
    return [(x, y), (x + side, y), (x, y + side), (x + side, y + side)]


@pytest.mark.parametrize("batch_size", [3, 5000])
def test_precision_recall_on_constructed_sets(batch_size):
    # Four points on a unit square: each one's 3rd nearest neighbour is the opposite corner, squared radius 2.
    real = _square((0, 0)) + _square((100, 0)) + _square((200, 0))  # 12 reference points
    fake = _square((0.25, 0)) + _square((0, 100))  # 8 samples; the first square overlaps the first real one
    pad = np.zeros((1, 14))
    real_f = np.hstack([np.array(real), np.repeat(pad, len(real), 0)])
    fake_f = np.hstack([np.array(fake), np.repeat(pad, len(fake), 0)])
    precision, recall = precision_recall(real_f, fake_f, k=3, batch_size=batch_size)
    assert precision == pytest.approx(4 / 8)  # the shifted square lies in the real balls; the far one does not
    assert recall == pytest.approx(4 / 12)  # only the first real square is covered by sample balls
    # a sample exactly on a ball's boundary counts as inside (<=, as in ADM)
    on_edge = np.vstack([fake_f[4:], [[-1.0, -1.0] + [0.0] * 14]])  # squared distance 2 to (0, 0)
    precision, _ = precision_recall(real_f, np.vstack([on_edge, fake_f[4:] + 5.0]), k=3, batch_size=batch_size)
    assert precision == pytest.approx(1 / 9)


def test_precision_recall_agrees_with_torch_fidelity_and_checks_counts():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 8)).astype(np.float32)
    fake = (rng.normal(size=(45, 8)) * 1.3 + 0.4).astype(np.float32)
    ours = precision_recall(real, fake, k=3, batch_size=7)
    theirs = calculate_precision_recall_full(torch.from_numpy(fake).double(), torch.from_numpy(real).double(), 3)
    assert ours == pytest.approx(theirs)
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1
    with pytest.raises(ValueError, match="at least 4 sample points"):
        precision_recall(real, fake[:3], k=3)
