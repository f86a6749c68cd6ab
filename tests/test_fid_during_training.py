"""FID while training (``sdt-train --fid-every``): the flags, the split of the samples over processes, a toy run
scored like sdt-fid-sample + sdt-fid, and resumes that never score a step twice (CPU, offline).

The Fréchet distance of 2048-d features takes ~25 s of ``sqrtm`` on 2 cores; the toy runs replace it (in the one
module both the trainer and ``sdt-fid`` call it from) with a cheap stand-in, as tests/test_metrics.py does. The
formula itself is tested in tests/test_metric_formulas.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call_and_reset, make_random_inception_state_dict, make_tiny_vae, read_metrics
from PIL import Image

from sdt_diffusion.evaluation import evaluate as evaluate_module
from sdt_diffusion.evaluation import sampling
from sdt_diffusion.training import trainer
from sdt_diffusion.training.diffusion_config import parse_args
from sdt_diffusion.training.fid import fid_due

pytestmark = pytest.mark.usefixtures("offline_env")

TINY = json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "gate_rank": 4,
                   "lpe_kernel_size": 3})


def _images(folder: Path, count: int, side: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("red", "blue")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = rng.normal(60, 30, (side, side, 3))
            img[..., 2 * c] += 120
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid_data")
    weights = root / "random-inception.pth"
    torch.save(make_random_inception_state_dict(), weights)
    make_tiny_vae().save_pretrained(root / "vae")
    return {"train": _images(root / "train", 4, 16, 0), "reference": _images(root / "reference", 3, 16, 1),
            "small_reference": _images(root / "small_reference", 2, 8, 2), "vae": root / "vae", "weights": weights}


@pytest.fixture
def cheap_frechet(monkeypatch, tmp_path):
    """The stand-in Fréchet distance (see the module doc) and a private reference feature cache."""
    def frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
        return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(sigma1 @ sigma2) ** 0.5)

    monkeypatch.setattr(evaluate_module, "frechet_distance", frechet)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _argv(data: dict[str, Path], out: Path, *extra: str, vae: str | None = None) -> list[str]:
    return ["--model", "SDT-P-S/2", "--model-kwargs", TINY, "--data-dir", str(data["train"]),
            "--vae", vae or str(data["vae"]), "--resolution", "16", "--global-batch-size", "2", "--num-workers", "0",
            "--log-every", "1", "--report-to", "none", "--no-progress-bar", "--output-dir", str(out),
            "--fid-reference", str(data["reference"]), "--fid-num-samples", "4", "--fid-steps", "2",
            "--fid-per-device-batch", "3", "--fid-is-splits", "2", "--fid-inception-weights", str(data["weights"]),
            *extra]


def _fid_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "fid" in r]


def test_each_process_samples_its_own_indices_and_all_cover_every_index_once():
    for num_samples, batch, world in ((4, 3, 1), (4, 3, 2), (50, 7, 3), (5, 8, 4), (1000, 32, 8)):
        parts = [sampling.process_indices(num_samples, batch, rank, world) for rank in range(world)]
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(num_samples)), (num_samples, batch, world)
        assert all(len(p) % batch == 0 or rank == (len(sampling.chunk_sizes(num_samples, batch)) - 1) % world
                   for rank, p in enumerate(parts))  # whole chunks, the short last one on its own process


def test_evaluations_are_due_every_n_steps_and_at_the_last_never_at_step_0():
    due = [s for s in range(0, 8) if fid_due(s, s == 7, 3)]
    assert due == [3, 6, 7]
    assert not fid_due(0, True, 1) and not fid_due(4, True, 0)


@pytest.mark.parametrize("extra, expected", [
    (("--fid-every", "1", "--fid-reference", None), "--fid-every 1 needs --fid-reference"),
    (("--fid-every", "1", "--fid-num-samples", None), "--fid-every 1 needs --fid-num-samples"),
    (("--fid-every", "1", "--fid-num-samples", "1"), "--fid-num-samples must lie in [2,"),
    (("--fid-every", "1", "--fid-guidance-scale", "0.5"), "--fid-guidance-scale must be finite and >= 1"),
    (("--fid-every", "1", "--fid-steps", "1001"), "--fid-steps must lie in [1, 1000]"),
    (("--fid-every", "1", "--fid-is-splits", "5"), "--fid-is-splits must lie in [1, --fid-num-samples 4]"),
    (("--fid-every", "-1"), "--fid-every must be >= 0"),
    ((), "--fid-reference and --fid-num-samples given without --fid-every"),
    (("--fid-every", "1", "--fid-reference", "missing.npz"), "--fid-reference missing.npz: no such file"),
    (("--fid-every", "1", "--fid-reference", "SMALL"), "holds 8×8 images and the run makes 16×16"),
    (("--fid-every", "1", "--fid-inception-weights", "BAD"), "--fid-inception-weights"),
])
def test_bad_fid_flags_fail_before_any_compute(extra, expected, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(data, out, "--max-steps", "1")
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    given = {"SMALL": str(data["small_reference"]), "BAD": str(tmp_path / "bad.pth")}
    for name, value in zip(extra[::2], extra[1::2]):
        if name in argv:
            i = argv.index(name)
            del argv[i:i + 2]
        if value is not None:
            argv += [name, given.get(value, value)]
    assert call_and_reset(trainer.main, argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # refused before anything was written: no run folder left behind


@pytest.mark.slow
def test_fid_rows_match_sdt_fid_and_a_resume_never_scores_a_step_twice(data, tmp_path, cheap_frechet, monkeypatch):
    out = tmp_path / "run"
    calls: list[str] = []
    real_run = sampling.run
    monkeypatch.setattr(sampling, "run", lambda settings, *a, **k: calls.append(settings.output) or
                        real_run(settings, *a, **k))

    # stopped by SIGTERM during step 1: checkpoint-1, no evaluation yet
    def sigterm_in_step_1(step, loss):
        if step == 1 and not calls and not (out / "checkpoint-1").exists():
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    result = call_and_reset(trainer.train, parse_args(_argv(data, out, "--max-steps", "2", "--fid-every", "1")),
                            loss_hook=sigterm_in_step_1)
    assert result.stopped_by_signal and result.step == 1 and calls == [] and _fid_rows(out) == []

    # the resume scores step 1 (due after its checkpoint), then step 2 (the last)
    resumed = _argv(data, out, "--max-steps", "2", "--fid-every", "1", "--resume", "latest")
    assert call_and_reset(trainer.train, parse_args(resumed)).step == 2
    assert [Path(c).parent.name for c in calls] == ["step-0000001", "step-0000002"]
    rows = _fid_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["fid_num_samples"] == 4
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            assert np.isfinite(row[key]), (key, row)
    step_2 = out / "fid" / "step-0000002"
    assert sorted(p.name for p in step_2.iterdir()) == ["results.json", "samples.json"]  # samples deleted
    assert json.loads((step_2 / "results.json").read_text())["fid"] == rows[1]["fid"]
    assert not (out / "fid" / "pipeline").exists()

    # sdt-fid-sample + sdt-fid on the run's final export (the same EMA as step 2's) give the same numbers
    samples = tmp_path / "samples.npz"
    assert sampling.main(["--pipeline", str(out / "pipeline"), "--num-samples", "4", "--per-device-batch", "3",
                          "--steps", "2", "--guidance-scale", "1.0", "--seed", "0", "--output", str(samples)]) == 0
    results = tmp_path / "results.json"
    assert evaluate_module.evaluate_main([str(samples), str(data["reference"]), "--inception-weights",
                                          str(data["weights"]), "--device", "cpu", "--is-splits", "2", "--quiet",
                                          "--output", str(results)]) == 0
    theirs = json.loads(results.read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert rows[1][key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key

    # a longer resume from checkpoint-2 does not score step 2 again
    calls.clear()
    more = _argv(data, out, "--max-steps", "3", "--fid-every", "1", "--resume", "latest")
    assert call_and_reset(trainer.train, parse_args(more)).step == 3
    assert [Path(c).parent.name for c in calls] == ["step-0000003"]
    assert [r["step"] for r in _fid_rows(out)] == [1, 2, 3]


def test_a_pixel_space_run_is_scored_too(data, tmp_path, cheap_frechet):
    out = tmp_path / "pixels"
    argv = _argv(data, out, "--max-steps", "2", "--fid-every", "5", vae="none")
    assert call_and_reset(trainer.train, parse_args(argv)).step == 2
    assert [(r["step"], np.isfinite(r["fid"])) for r in _fid_rows(out)] == [(2, True)]  # only the last step
