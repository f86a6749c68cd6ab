"""Offline CPU tests of the metrics from images to numbers (sdt_diffusion.evaluation: readers, Inception features,
reference cache, compute_metrics and the command line; ADM definitions). The formulas: test_metric_formulas.py.

The Inception network is torch-fidelity's inception-v3-compat architecture with random (non-degenerate)
weights written by the tests, so nothing is downloaded; sockets and torch.hub downloads are blocked.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as fe
from conftest import make_random_inception_state_dict
from PIL import Image

import sdt_diffusion.evaluation.evaluate as evaluate_module
import sdt_diffusion.evaluation.reference as reference_module
from sdt_diffusion.evaluation import (
    EvaluationInputError,
    FolderImages,
    InceptionFeatures,
    NpzImages,
    compute_metrics,
    evaluate_main,
    extract_features,
    format_markdown_table,
    load_inception,
    open_images,
)

# 299×299 Inception forwards cost ~6 GFLOP each: keep the sets tiny (a, b: N_IMAGES; c, d: N_SMALL images)
N_IMAGES = 8
N_SMALL = 5


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Fail loudly if anything in this module tries to reach the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted during an offline test")

    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse()
        return real_connect(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(torch.hub, "load_state_dict_from_url", refuse)
        mp.setattr(torch.hub, "download_url_to_file", refuse)
        mp.setattr(fe, "load_state_dict_from_url", refuse)
        yield


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(make_random_inception_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(weights_file) -> InceptionFeatures:
    return load_inception(weights_file, "cpu")


def make_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Random-ish RGB images: a colour gradient plus a bright rectangle plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        base = rng.uniform(0, 255, 3) * (1 - xx[..., None]) + rng.uniform(0, 255, 3) * yy[..., None]
        y0, x0 = rng.integers(0, size // 2, 2)
        base[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.uniform(0, 255, 3)
        out[i] = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return out


def write_folder(images: np.ndarray, folder: Path) -> Path:
    """PNG files in sorted order; the second half in a subfolder (exercises the recursive search)."""
    for i, img in enumerate(images):
        sub = folder / "sub" if i >= len(images) // 2 else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("images")
    out = SimpleNamespace(root=root)
    for name, n, seed in (("a", N_IMAGES, 1), ("b", N_IMAGES, 2), ("c", N_SMALL, 3), ("d", N_SMALL, 4)):
        images = make_images(n, seed=seed)
        save = np.savez_compressed if name == "b" else np.savez  # compressed npz streams too
        save(root / f"{name}.npz", arr_0=images)
        setattr(out, name, images)
        setattr(out, f"{name}_npz", root / f"{name}.npz")
        setattr(out, f"{name}_dir", write_folder(images, root / f"{name}_png"))
    return out


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_end_to_end_set_against_itself(sets, weights_file, tmp_path):
    cache = tmp_path / "cache"
    r = compute_metrics(sets.a_npz, sets.a_npz, inception_weights=weights_file, device="cpu", cache_dir=cache,
                          batch_size=3, is_splits=2, progress=False)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert r[key] is not None and np.isfinite(r[key]), key
    cached = list(cache.glob("ref-*.npz"))
    assert len(cached) == 1  # reference features cached on disk, plain arrays
    with np.load(cached[0], allow_pickle=False) as npz:
        assert npz["pool"].shape == (N_IMAGES, 2048)
        scale, scale_s = np.trace(npz["sigma"]), np.trace(npz["sigma_s"])
    assert scale > 1e-2 and scale_s > 1e-2  # the random network gives non-degenerate features
    assert abs(r["fid"]) < 1e-3 * scale
    assert abs(r["sfid"]) < 1e-3 * scale_s
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["inception_score"] > 1.0
    assert r["num_samples"] == r["num_reference_images"] == N_IMAGES
    assert r["sample_resolution"] == [32, 32]
    assert r["reference_statistics"] == {"fid": "computed", "sfid": "computed"}
    assert r["settings"]["inception_weights"] == str(weights_file)
    json.dumps(r)  # serialisable as is


def test_reference_features_are_cached_and_reused(sets, inception, tmp_path, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["desc"])
        return extract_features(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "extract_features", spy)  # the samples' pass
    monkeypatch.setattr(reference_module, "extract_features", spy)  # the reference's pass
    kwargs = dict(model=inception, cache_dir=tmp_path, metrics=("is", "pr"), is_splits=2, progress=False,
                  pr_batch_size=3)
    first = compute_metrics(sets.c_npz, sets.d_npz, **kwargs)
    assert calls == ["Inception features (reference)", "Inception features (samples)"]
    assert len(list(tmp_path.glob("ref-*.npz"))) == 1
    calls.clear()
    second = compute_metrics(sets.c_npz, sets.d_npz, **kwargs)
    assert calls == ["Inception features (samples)"]  # reference came from the cache
    assert (second["precision"], second["recall"]) == (first["precision"], first["recall"])
    assert first["fid"] is None and first["sfid"] is None  # not requested


def test_folder_and_npz_inputs_give_the_same_features(sets, inception):
    folder, npz = open_images(sets.c_dir), open_images(sets.c_npz)
    assert isinstance(folder, FolderImages) and isinstance(npz, NpzImages)
    np.testing.assert_array_equal(np.concatenate(list(folder.batches(3))), sets.c)
    np.testing.assert_array_equal(np.concatenate(list(folder.batches(2, num_workers=2))), sets.c)
    np.testing.assert_array_equal(np.concatenate(list(open_images(sets.b_npz).batches(3))), sets.b)
    f_folder = extract_features(folder.batches(3), inception, progress=False)
    f_npz = extract_features(npz.batches(3), inception, progress=False)
    assert f_npz["pool"].shape == (N_SMALL, 2048)
    assert f_npz["spatial"].shape == (N_SMALL, 7 * 17 * 17)
    assert f_npz["logits"].shape == (N_SMALL, 1008)
    for key in f_npz:
        np.testing.assert_allclose(f_folder[key], f_npz[key], rtol=1e-5, atol=1e-6)
    # spatial features = Mixed_6d.branch1x1 output, channels 0..6, flattened in TF's (H, W, C) order
    seen = {}
    handle = inception.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    try:
        with torch.inference_mode():
            out = inception(torch.from_numpy(sets.c[:2]).permute(0, 3, 1, 2))
    finally:
        handle.remove()
    expected = seen["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out["spatial"], expected)
    # (CPU convolutions differ in the last bits between batch shapes, hence the tolerance)
    np.testing.assert_allclose(out["pool"].numpy(), f_npz["pool"][:2], rtol=1e-3, atol=1e-4)


def test_agrees_with_torch_fidelity_calculate_metrics(sets, inception, weights_file):
    ours = compute_metrics(sets.c_dir, sets.d_dir, model=inception, metrics=("is", "pr"), use_cache=False,
                             is_splits=2, progress=False)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(sets.c_dir), input2=str(sets.d_dir), cuda=False, isc=True, prc=True, isc_splits=2,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights_file),
        samples_shuffle=False, samples_find_deep=True, cache=False, verbose=False, save_cpu_ram=True,
    )
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["precision"] == pytest.approx(theirs["precision"])
    assert ours["recall"] == pytest.approx(theirs["recall"])


def test_cli_with_statistics_only_reference(sets, inception, weights_file, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    stats = {"mu": rng.normal(size=2048), "sigma": np.eye(2048), "mu_s": rng.normal(size=2023),
             "sigma_s": np.eye(2023)}
    ref = tmp_path / "ref_stats.npz"
    np.savez(ref, **stats)
    seen = []

    def fake_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):  # the real one is tested above; avoid 2048² sqrtm here
        seen.append((mu2, sigma2))
        return 12.345

    monkeypatch.setattr(evaluate_module, "frechet_distance", fake_frechet)
    out = tmp_path / "out" / "result.json"
    with pytest.warns(UserWarning, match="precision/recall skipped"):
        code = evaluate_main([str(sets.c_npz), str(ref), "--output", str(out), "--inception-weights",
                                str(weights_file), "--device", "cpu", "--batch-size", "5", "--is-splits", "2", "--cache-dir",
                                str(tmp_path / "cache"), "--compare", "XL-G", "--name", "tiny", "--quiet"])
    assert code == 0
    np.testing.assert_array_equal(seen[0][0], stats["mu"])  # the npz's ADM statistics were used
    np.testing.assert_array_equal(seen[1][0], stats["mu_s"])
    result = json.loads(out.read_text())
    assert result["fid"] == result["sfid"] == 12.345
    assert result["precision"] is None and result["recall"] is None
    assert np.isfinite(result["inception_score"])
    assert result["reference_statistics"] == {"fid": "npz", "sfid": "npz"}
    assert result["num_samples"] == N_SMALL and result["num_reference_images"] is None
    assert not (tmp_path / "cache").exists()  # nothing to cache without reference images
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| model | FID | sFID | IS | Prec | Rec |"
    assert table[2].startswith("| tiny | 12.35 | 12.35 | ") and table[2].endswith(" | – | – |")
    assert table[3] == "| SDT-P-XL/2-G (paper) | 2.25 | 4.59 | 279.85 | 0.83 | 0.58 |"
    assert table[4] == "| DiT-XL/2-G (paper) | 2.27 | 4.60 | 278.24 | 0.83 | 0.57 |"


def test_stored_reference_statistics_take_precedence_over_its_images(sets, inception, tmp_path, monkeypatch):
    mu = np.full(2048, 0.5)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=sets.c, mu=mu, sigma=np.eye(2048))  # pool stats only: sFID falls back to the images
    seen = []
    monkeypatch.setattr(evaluate_module, "frechet_distance", lambda m1, s1, m2, s2: seen.append(m2) or 1.0)
    r = compute_metrics(sets.c_npz, ref, model=inception, metrics=("fid", "sfid", "pr"), use_cache=False,
                          progress=False)
    np.testing.assert_array_equal(seen[0], mu)
    assert seen[1].shape == (2023,)
    assert r["reference_statistics"] == {"fid": "npz", "sfid": "computed"}
    assert r["precision"] == r["recall"] == 1.0  # arr_0 still serves precision/recall


def test_markdown_table_compare_rows():
    table = format_markdown_table({"fid": 20.0}, "mine", compare="B").splitlines()
    assert table[2] == "| mine | 20.00 | – | – | – | – |"
    assert table[3] == "| SDT-P-B/2 (paper, 400K) | 37.47 | – | – | – | – |"
    assert table[4] == "| DiT-B/2 (paper, 400K) | 43.47 | – | – | – | – |"
    with pytest.raises(ValueError, match="compare"):
        format_markdown_table({}, "mine", compare="XXL")


# ------------------------------------------------------------------------------------------------ bad inputs


def _npz(tmp_path: Path, name: str, **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_bad_inputs_are_rejected_with_the_file_name(sets, tmp_path):
    imgs = make_images(6, seed=3)
    cases = [
        (_npz(tmp_path, "float.npz", arr_0=imgs.astype(np.float32) / 127.5 - 1), r"uint8.*values in \[-1, 1\]"),
        (_npz(tmp_path, "nchw.npz", arr_0=imgs.transpose(0, 3, 1, 2).copy()), "channels-first"),
        (_npz(tmp_path, "gray.npz", arr_0=imgs[..., 0]), "N×H×W×3"),
        (_npz(tmp_path, "noarr.npz", labels=np.arange(3)), "no 'arr_0'"),
        (tmp_path / "samples.txt", "unsupported"),
    ]
    (tmp_path / "samples.txt").write_text("hello")
    for path, message in cases:
        with pytest.raises(EvaluationInputError, match=message) as info:
            open_images(path, role="samples")
        assert str(path) in str(info.value)

    mixed = write_folder(imgs, tmp_path / "mixed")
    Image.fromarray(make_images(1, seed=4, size=48)[0]).save(mixed / "sub" / "zzz.png")
    with pytest.raises(EvaluationInputError, match="differs from") as info:
        open_images(mixed)
    assert "zzz.png" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationInputError, match="no .png"):
        open_images(tmp_path / "empty")
    deep = tmp_path / "sixteen"
    deep.mkdir()
    Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)).save(deep / "a.png")
    (batch,) = open_images(deep).batches(4)  # 16-bit: scaled to 8 bits by the data layer's rule, never clipped
    assert batch.shape == (1, 8, 8, 3) and (batch == 100).all()

    missing = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        compute_metrics(sets.a_npz, missing, progress=False)
    with pytest.raises(ValueError, match="does not exist"):  # also a ValueError
        compute_metrics(sets.a_npz, missing, progress=False)
    bad_stats = _npz(tmp_path, "bad_stats.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(EvaluationInputError, match="expected \\(2048,\\)"):
        compute_metrics(sets.a_npz, bad_stats, progress=False)
    three = _npz(tmp_path, "three.npz", arr_0=imgs[:3])
    with pytest.raises(EvaluationInputError, match="needs at least 4 samples") as info:
        compute_metrics(three, sets.a_npz, metrics=("pr",), progress=False)  # fails before any model is built
    assert "three.npz" in str(info.value)


def test_cli_reports_bad_input_without_traceback(sets, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate_main([str(sets.a_npz), str(tmp_path / "nope.npz"), "--quiet"])
    assert info.value.code == 2
    assert "nope.npz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main([str(sets.a_npz), str(sets.a_npz), "--metrics", "fid,kid"])


def test_weights_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Exploit()}, evil)
    with pytest.raises(EvaluationInputError, match="evil.pth"):
        load_inception(evil)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_inception(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    with pytest.raises(EvaluationInputError, match="wrong.pth"):
        load_inception(wrong)


def test_default_weights_come_from_torch_fidelity_url_without_unpickling(weights_file, inception, monkeypatch):
    seen = {}

    def fake_hub(url, **kwargs):  # stands in for the (blocked) download
        seen.update(kwargs, url=url)
        return torch.load(weights_file, weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    model = load_inception(None, "cpu")
    assert seen["url"].endswith("/weights-inception-2015-12-05-6726825d.pth")
    assert seen["weights_only"] is True and seen["check_hash"] is True
    assert model.weights_source == seen["url"]
    assert model.weights_id == inception.weights_id  # the cache key uses the weights' content, not their path


def test_damaged_files_are_named_before_any_features(sets, tmp_path, monkeypatch):
    # an image inside a folder whose header reads but whose data does not decode: named, with or without workers
    folder = write_folder(sets.c, tmp_path / "folder")
    bad = folder / "sub" / "004.png"
    bad.write_bytes(bad.read_bytes()[:-60])
    source = open_images(folder)  # the header is fine
    for workers in (0, 2):
        with pytest.raises(EvaluationInputError, match="004.png: cannot decode image"):
            list(source.batches(2, num_workers=workers))
    # one flipped bit inside an npz's images: the zip checksum fails when the file is opened
    flipped = tmp_path / "flipped.npz"
    blob = bytearray(sets.a_npz.read_bytes())
    blob[len(blob) // 2] ^= 0x08
    flipped.write_bytes(bytes(blob))
    with pytest.raises(EvaluationInputError, match="flipped.npz: 'arr_0' is damaged"):
        open_images(flipped)
    # file names that are not UTF-8: read, hashed (the reference cache key) and printable
    odd = tmp_path / os.fsdecode(b"odd\xff")
    write_folder(sets.c, odd)
    assert open_images(odd).content_hash() and open_images(odd).count == N_SMALL
    assert "\\xff" in evaluate_module._printable(str(odd))


def test_cli_checks_output_first_and_prints_the_table_before_writing(sets, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")

    def never(*args, **kwargs):
        raise AssertionError("features were computed before --output was checked")

    with monkeypatch.context() as m:
        m.setattr(evaluate_module, "compute_metrics", never)
        with pytest.raises(SystemExit) as e:
            evaluate_main([str(sets.c_npz), str(sets.d_npz), "--output", str(tmp_path / "file" / "r.json")])
        assert e.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err

    def refuse(path, text):
        raise OSError("disk full")

    numbers = dict.fromkeys(("sfid", "precision", "recall"), None) | {"fid": 12.5, "inception_score": 3.25}
    monkeypatch.setattr(evaluate_module, "compute_metrics", lambda *a, **k: dict(numbers))  # the numbers only
    monkeypatch.setattr(evaluate_module, "atomic_write_text", refuse)
    with pytest.raises(SystemExit) as e:
        evaluate_main([str(sets.c_npz), str(sets.d_npz), "--output", str(tmp_path / "r.json"), "--quiet"])
    captured = capsys.readouterr()
    assert e.value.code == 1 and "disk full" in captured.err
    assert "| c.npz | 12.50 | – | 3.25 | – | – |" in captured.out  # printed before the write failed
