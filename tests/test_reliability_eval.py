"""Hostile inputs of the evaluation, data and sampling commands (issue 25, reliability round three).

Each test names the probe it covers; each fails on the code before its fix (checked by running it there), unless
its docstring says why the behaviour already held.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate.state import PartialState
from conftest import make_tiny_transformer, make_tiny_vae
from PIL import Image

import sdt_diffusion.evaluation.classification as classification
import sdt_diffusion.evaluation.evaluate as evaluate_module
from sdt_diffusion import SDTPipeline
from sdt_diffusion.data import (
    CACHE_FORMAT,
    CACHE_VERSION,
    DataInputError,
    LatentCacheDataset,
    UnreadableImageError,
    load_image_folder,
    load_image_source,
    open_image,
    open_labelled_images,
    to_rgb,
)
from sdt_diffusion.evaluation import (
    EvaluationInputError,
    FolderImages,
    compute_metrics,
    evaluate_main,
    sampling,
)
from sdt_diffusion.evaluation.classification import LoadedClassifier, classify_main
from sdt_diffusion.evaluation.sampling import SamplingSettings

# ---------------------------------------------------------------------------------------------------- helpers


def _png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit grayscale PNG (PIL mode ``I;16``) of ``values`` (uint16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def _solid(path: Path, rgb: tuple[int, int, int], size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(path)


def _dataset_with_labels(path: Path, labels: list[int], names: list[str]) -> Path:
    """A saved dataset whose ClassLabel has ``names`` while its label column holds ``labels`` (``datasets`` refuses
    to encode such rows, but a dataset written by another tool or edited by hand holds them)."""
    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(len(labels))]
    plain = datasets.Dataset.from_dict({"image": images, "label": labels},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.Value("int64")}))
    info = copy.deepcopy(plain.info)
    info.features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset(plain.data, info=info).save_to_disk(str(path))
    return path


class _MeanColour(torch.nn.Module):
    """A 'classifier' whose logit c is the mean of normalised channel c: pure red, green and blue images are
    classes 0, 1 and 2 with certainty."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))


def _colour_model(id2label: dict[int, str] | None) -> LoadedClassifier:
    return LoadedClassifier(_MeanColour(), "timm", 3, id2label, resolution=8)


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _colour_folder(root: Path, classes: list[str], per_class: int = 2) -> Path:
    for name in classes:
        for i in range(per_class):
            _solid(root / name / f"{i}.png", COLOURS[name])
    return root


def _classify(monkeypatch, capsys, model: LoadedClassifier, data: Path, *extra: str) -> tuple[int, str, str]:
    monkeypatch.setattr(classification, "load_classifier", lambda *a, **k: model)
    code = classify_main(["model", str(data), "--num-workers", "0", "--no-progress-bar", *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipe") / "pipeline"
    SDTPipeline(transformer=make_tiny_transformer(), vae=make_tiny_vae(), scheduler=None).save_pretrained(folder)
    return folder


def _sample_main(argv: list[str]) -> int:
    try:
        return sampling.main(argv)
    finally:
        PartialState._reset_state()


# ------------------------------------------------------------------------- item 4: 16-bit and other modes


def test_16_bit_images_are_scaled_not_clipped_to_white(tmp_path):
    """Probe: a 16-bit PNG (mode I;16). Before: PIL's convert("RGB") clipped it (mid-grey 32896 read as 255,
    white) in training, classifier training and classify, while the FID reader refused it."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = _png16(tmp_path / "ramp.png", ramp)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(open_image(str(path), str(path)))
    expected = np.round(ramp / 257).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])
    # the labelled-image reader (training, classifier training, classify) goes through the same function
    _png16(tmp_path / "folder" / "grey" / "a.png", np.full((8, 8), 32896))
    images = load_image_folder(tmp_path / "folder")
    assert np.asarray(images.image(0)).max() == 128


def test_fid_folder_reader_scales_16_bit_images_like_the_data_layer(tmp_path):
    """Probe: a folder of 16-bit PNGs as FID samples. Before: refused ("not 8-bit") while training read the same
    files (clipped); now both scale them with the data layer's one conversion."""
    values = np.random.default_rng(0).integers(0, 65536, (3, 16, 16))
    (tmp_path / "s8").mkdir()
    for i, v in enumerate(values):
        _png16(tmp_path / "s16" / f"{i}.png", v)
        Image.fromarray(np.round(v / 257).astype(np.uint8)).convert("RGB").save(tmp_path / "s8" / f"{i}.png")
    sixteen = np.concatenate(list(FolderImages(tmp_path / "s16").batches(8)))
    eight = np.concatenate(list(FolderImages(tmp_path / "s8").batches(8)))
    np.testing.assert_array_equal(sixteen, eight)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_and_float_images_are_refused_by_file_name(tmp_path, mode):
    """Probe: 32-bit integer (I) and float (F) images. Before: clipped (I) or turned black (F, values in [0, 1])
    by convert("RGB"); their white level is unknown, so every reader now refuses them, naming the file."""
    arr = np.full((8, 8), 0.5 if mode == "F" else 40000, np.float32 if mode == "F" else np.int32)
    path = tmp_path / "d" / "c" / "x.tiff"
    path.parent.mkdir(parents=True)
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(UnreadableImageError, match=f"x.tiff.*image mode '{mode}'"):
        load_image_folder(tmp_path / "d").image(0)
    with pytest.raises(ValueError, match="no fixed white level"):
        to_rgb(Image.open(path))


def test_8_bit_modes_with_alpha_palette_and_cmyk_keep_their_colours():
    """LA, P with transparency and CMYK are 8-bit: converted as PIL does (alpha dropped), never refused.  This held
    before (PIL's conversion is right for 8-bit modes); pinned so the one new conversion keeps it."""
    la = Image.fromarray(np.stack([np.full((4, 4), 200, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert np.asarray(to_rgb(la)).max() == 200
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.info["transparency"] = 1
    assert tuple(np.asarray(to_rgb(p))[0, 0]) == (10, 20, 30)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).mode == "RGB"


# --------------------------------------------------------------------------- item 3: labels outside classes


def test_label_equal_to_the_class_count_is_refused_by_every_reader(tmp_path, monkeypatch, capsys):
    """Probe: a saved dataset whose ClassLabel has 2 names and whose labels hold 2 (the null label of guidance)
    and 7.  Every reader path goes through ``load_saved_dataset``, which checks the range at start-up: diffusion
    training and latent extraction (``load_image_source(dataset=...)``), the classifier trainer and classify
    (``open_labelled_images``), and classify's own model check.  This held before this round (the data layer
    already checked); the test pins it for every path."""
    ds = _dataset_with_labels(tmp_path / "ds", [0, 1, 2, 7], ["cat", "dog"])
    for read in (lambda: load_image_source(dataset=ds, split=None),
                 lambda: open_labelled_images(ds)):
        with pytest.raises(DataInputError, match=r"column 'label' 2 at row 2 .* out of range for 2 classes \(2 label"):
            read()
    code, _, err = _classify(monkeypatch, capsys, _colour_model(None), ds)
    assert code == 2 and "out of range for 2 classes" in err and "Traceback" not in err


def _cache(path: Path, labels: list[int], num_classes: int | None) -> Path:
    shard = path / "shard-0"
    shard.mkdir(parents=True)
    n = len(labels)
    np.save(shard / "mean.npy", np.zeros((n, 2, 4, 2, 2), np.float16))
    np.save(shard / "std.npy", np.ones((n, 2, 4, 2, 2), np.float16))
    np.save(shard / "labels.npy", np.array(labels, np.int64))
    np.save(shard / "indices.npy", np.arange(n))
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "num_samples": n, "shards": ["shard-0"],
            "latent_shape": [4, 2, 2]}
    if num_classes is not None:
        meta["num_classes"] = num_classes
    (path / "metadata.json").write_text(json.dumps(meta))
    return path


def test_latent_cache_labels_outside_its_classes_are_refused(tmp_path):
    """Probe: a latent cache whose labels.npy holds the class count (a damaged or hand-edited cache). Before: read
    silently, so label 3 of a 3-class cache trained as the null label of guidance."""
    assert len(LatentCacheDataset(_cache(tmp_path / "ok", [0, 1, 2], 3))) == 3
    with pytest.raises(DataInputError, match=r"shard-0/labels.npy: label 3 \(entry 1\) is outside \[0, 3\)"):
        LatentCacheDataset(_cache(tmp_path / "bad", [0, 3, 1], 3))
    with pytest.raises(DataInputError, match="label -1"):
        LatentCacheDataset(_cache(tmp_path / "neg", [0, -1, 1], 3))
    assert len(LatentCacheDataset(_cache(tmp_path / "old", [0, 5], None))) == 2  # no class count: nothing to check


# ---------------------------------------------------------------------------- item 5: classify by class name


def test_classify_maps_a_partial_folder_through_the_models_names(tmp_path, monkeypatch, capsys):
    """Probe: a validation folder with only 'blue' and 'green' for a red/green/blue model. Before: ids followed the
    folder listing (blue=0, green=1), so every image was scored against the wrong class: top-1 0%, exit 0."""
    data = _colour_folder(tmp_path / "val", ["blue", "green"])
    model = _colour_model({0: "red", 1: "green", 2: "blue"})
    code, out, err = _classify(monkeypatch, capsys, model, data, "--output", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "top-1 100.00%" in out
    assert json.loads((tmp_path / "r.json").read_text())["top1"] == 100.0
    # all classes, another order in the model: matched by name as well
    full = _colour_folder(tmp_path / "full", ["red", "green", "blue"])
    code, out, _ = _classify(monkeypatch, capsys, _colour_model({0: "red", 1: "green", 2: "blue"}), full)
    assert code == 0 and "top-1 100.00%" in out


def test_classify_refuses_folder_names_the_model_does_not_know(tmp_path, monkeypatch, capsys):
    """Probe: a folder with a class the model lacks, and a partial folder for a model without class names.
    Before: scored by folder position, exit 0."""
    data = _colour_folder(tmp_path / "val", ["blue", "green"])
    (data / "purple").mkdir()
    _solid(data / "purple" / "0.png", (128, 0, 128))
    code, _, err = _classify(monkeypatch, capsys, _colour_model({0: "red", 1: "green", 2: "blue"}), data)
    assert code == 2 and "1 of its 3 class(es) are not classes of the model ('purple')" in err, err
    shutil.rmtree(data / "purple")
    code, _, err = _classify(monkeypatch, capsys, _colour_model({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}), data)
    assert code == 2 and "has 2 class folders and the model 3 classes" in err, err


# ------------------------------------------------------------------------ item 16: classify's one-line errors


@pytest.mark.parametrize("flags, message", [
    (["--crop-pct", "nan"], "--crop-pct must lie in (0, 1], got nan"),
    (["--crop-pct", "0"], "--crop-pct must lie in (0, 1], got 0.0"),
    (["--resolution", "-5"], "--resolution must lie in [1, 4096], got -5"),
    (["--resolution", "100000000"], "--resolution must lie in [1, 4096]"),
    (["--batch-size", str(10**12)], "--batch-size must lie in [1, 65536], got 1000000000000"),
    (["--num-workers", str(10**6)], "--num-workers must lie in [0, 256], got 1000000"),  # a million processes
])
def test_classify_bad_flags_are_one_line_errors(tmp_path, monkeypatch, capsys, flags, message):
    """Probe: --crop-pct nan / 0, --resolution -5 / 10^8. Before: a ValueError traceback from the transform (nan,
    -5), the default silently used (0), or a resize to 10^8 px."""
    data = _colour_folder(tmp_path / "val", ["red", "green", "blue"])
    code, _, err = _classify(monkeypatch, capsys, _colour_model(None), data, *flags)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_classify_unloadable_models_are_one_line_errors(tmp_path, capsys):
    """Probe: an unknown --arch, a weight file that is a pickle of objects, a transformers folder whose
    pytorch_model.bin is such a pickle. Before: RuntimeError / UnpicklingError tracebacks."""
    data = _colour_folder(tmp_path / "val", ["red", "green", "blue"])
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"\x80\x04\x95not a real pickle")
    torch.save({"weights": _MeanColour()}, tmp_path / "pickled.pth")  # a module object: never unpickled
    cases = [([str(weights), str(data), "--arch", "no_such_net"], "--arch 'no_such_net' is not a timm architecture"),
             ([str(tmp_path / "pickled.pth"), str(data), "--arch", "resnet18"], "cannot load the model as timm's")]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
        "intermediate_size": 8, "image_size": 8, "patch_size": 4, "num_labels": 3}))
    torch.save({"weights": _MeanColour()}, hf / "pytorch_model.bin")
    cases.append(([str(hf), str(data)], f"{hf}: cannot load the model"))
    for argv, message in cases:
        code = classify_main([*argv, "--num-workers", "0", "--no-progress-bar"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------- item 6: non-finite samples


def _nan_pipeline(pipeline_dir: Path, folder: Path) -> Path:
    pipe = SDTPipeline.from_pretrained(pipeline_dir)
    with torch.no_grad():
        next(pipe.transformer.parameters()).fill_(float("nan"))
    pipe.save_pretrained(folder)
    return folder


def test_non_finite_samples_are_never_written(pipeline_dir, tmp_path, capsys):
    """Probe: a pipeline with a NaN weight. Before: eval/sample.py wrote all-black images into the npz, exit 0.
    Now the weights are checked at start-up, and every chunk is checked before it is written (an absurd guidance
    scale can overflow with finite weights), naming the first bad sample."""
    nan_dir = _nan_pipeline(pipeline_dir, tmp_path / "nan-pipe")
    out = tmp_path / "s.npz"
    code = _sample_main(["--pipeline", str(nan_dir), "--num-samples", "2", "--steps", "1", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "holds NaN or infinite values" in err and "Traceback" not in err, err
    assert not out.exists() and not list(sampling.shard_dir(out).glob("chunk-*"))
    pipe = SDTPipeline.from_pretrained(nan_dir)  # the chunk check on its own
    pipe.set_progress_bar_config(disable=True)
    settings = SamplingSettings(pipeline=str(nan_dir), output=str(out), num_samples=4, steps=1)
    labels = np.array([3, 1, 2, 0])
    with pytest.raises(sampling.NonFiniteSampleError, match=r"sample 2 \(class 2\) holds NaN"):
        sampling.sample_chunk(pipe, settings, np.array([2, 3]), labels)


# -------------------------------------------------------------------- item 16: sampling commands' bounds


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", str(10**18)], "--num-samples must be at most 10000000"),
    (["--per-device-batch", str(10**12)], "--per-device-batch must be at most 65536"),
])
def test_fid_sample_bounds_sizes_before_allocating(pipeline_dir, tmp_path, capsys, flags, message):
    """Probe: --num-samples 10^18, --per-device-batch 10^12. Before: a MemoryError traceback allocating 10^18
    labels; and one 50,000-image pipeline call (all samples in one batch) that runs out of memory hours later."""
    with pytest.raises(SystemExit) as e:
        _sample_main(["--pipeline", str(pipeline_dir), "--output", str(tmp_path / "s.npz"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_fid_sample_refuses_a_run_that_cannot_fit_on_disk(tmp_path):
    """Probe: a pipeline whose images are 10^8 px wide (a damaged config). Before: sampling started and failed
    at the first allocation or filled the disk; now the space the npz needs is compared first."""
    with pytest.raises(OSError, match=r"10000000 images of 100000000×100000000 need about"):
        sampling.check_disk_space(tmp_path / "s.npz", 10**7, 10**8)
    sampling.check_disk_space(tmp_path / "s.npz", 2, 8)


def test_sdt_sample_errors_are_one_line(pipeline_dir, tmp_path, capsys):
    """Probe: sdt-sample with truncated weights, --guidance-scale nan, a NaN pipeline. Before: a safetensors
    traceback, a NaN grid written as black squares, exit 0."""
    from sdt_diffusion.tools import cli

    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    nan_dir = _nan_pipeline(pipeline_dir, tmp_path / "nan-pipe")
    out = tmp_path / "grid.png"
    for argv, code, message in (
            (["--pipeline", str(broken)], 2, f"--pipeline {broken}: cannot load the pipeline"),
            (["--pipeline", str(pipeline_dir), "--guidance-scale", "nan"], 2, "--guidance-scale must be finite"),
            (["--pipeline", str(nan_dir), "--steps", "1"], 1, "image 0 (class 0) holds NaN")):
        with pytest.raises(SystemExit) as e:
            cli.sample_main([*argv, "--classes", "0", "--output", str(out), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == code and message in err and "Traceback" not in err, err
        assert not out.exists()


# ------------------------------------------------------------------------- item 17: output inside pipeline


def test_fid_sample_output_inside_the_pipeline_is_refused_at_start(pipeline_dir, tmp_path, capsys):
    """Probe: eval/sample.py --output PIPELINE/samples.npz. Before: the shards changed the pipeline's sha256, so
    the documented rerun after a kill was refused as 'another pipeline'."""
    inside = pipeline_dir / "samples.npz"
    with pytest.raises(SystemExit) as e:
        _sample_main(["--pipeline", str(pipeline_dir), "--num-samples", "2", "--steps", "1", "--output", str(inside)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "lies inside the pipeline folder" in err, err
    assert not sampling.shard_dir(inside).exists()


# --------------------------------------------------------------------------------------------- sdt-fid


def _stats_npz(path: Path, with_images: bool = True, size: int = 16) -> Path:
    arrays = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
    if with_images:
        arrays["arr_0"] = np.zeros((4, size, size, 3), np.uint8)
    np.savez(path, **arrays)
    return path


def _samples_npz(path: Path, size: int = 16) -> Path:
    np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8))
    return path


def _fid(argv: list[str]) -> int:
    """sdt-fid's exit status (its input errors exit through argparse)."""
    try:
        return evaluate_main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", str(10**12)], "--batch-size must lie in [1, 65536], got 1000000000000"),
    (["--num-workers", str(10**6)], "--num-workers must lie in [0, 256], got 1000000"),
])
def test_fid_sizes_are_bounded_before_anything_is_read(flags, message, tmp_path, capsys):
    ref, samples = _stats_npz(tmp_path / "ref.npz"), _samples_npz(tmp_path / "samples.npz")
    assert _fid([str(samples), str(ref), *flags, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def _no_inception(*args, **kwargs):
    raise AssertionError("Inception was loaded although the inputs are refused")


def test_fid_detects_adm_argument_order(tmp_path, monkeypatch, capsys):
    """Probe: sdt-fid REFERENCE SAMPLES (ADM's evaluator order). Before: scored silently with plausible, wrong
    numbers. Named forms --samples / --reference are accepted too."""
    monkeypatch.setattr(evaluate_module, "load_inception", _no_inception)
    ref, samples = _stats_npz(tmp_path / "ref.npz"), _samples_npz(tmp_path / "samples.npz")
    with pytest.raises(EvaluationInputError, match="look swapped"):
        compute_metrics(ref, samples)
    assert _fid([str(ref), str(samples), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "SAMPLES REFERENCE (samples first)" in err and "REFERENCE SAMPLES" in err and "Traceback" not in err
    assert f"--samples {samples} --reference {ref}" in err

    seen = {}
    monkeypatch.setattr(evaluate_module, "compute_metrics", lambda s, r, **k: seen.update(s=s, r=r) or {"fid": 1.0})
    assert evaluate_main(["--reference", str(ref), "--samples", str(samples), "--quiet"]) == 0
    assert seen == {"s": str(samples), "r": str(ref)}
    seen.clear()
    assert evaluate_main([str(ref), "--samples", str(samples), "--quiet"]) == 0  # the positional is the other one
    assert seen == {"s": str(samples), "r": str(ref)}
    for argv, message in (([str(samples), "--samples", str(samples), str(ref)], "too many inputs"),
                          ([str(samples)], "no reference")):
        with pytest.raises(SystemExit):
            evaluate_main(argv)
        assert message in capsys.readouterr().err


def test_fid_output_never_replaces_an_input_or_a_foreign_file(tmp_path, monkeypatch, capsys):
    """Probe: sdt-fid samples.npz ref.npz --output samples.npz (a tab-completion slip). Before: the samples were
    replaced by the JSON, exit 0. Also an existing file that is not a result needs --overwrite."""
    ref, samples = _stats_npz(tmp_path / "ref.npz"), _samples_npz(tmp_path / "samples.npz")
    before = {p: p.read_bytes() for p in (ref, samples)}
    result = {"fid": 1.0, "samples": str(samples), "reference": str(ref), "settings": {}}
    monkeypatch.setattr(evaluate_module, "compute_metrics", lambda *a, **k: dict(result))
    for target in (samples, ref, tmp_path / "." / "samples.npz"):
        with pytest.raises(SystemExit) as e:
            evaluate_main([str(samples), str(ref), "--output", str(target), "--quiet"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "input; name another file" in err, err
    assert {p: p.read_bytes() for p in (ref, samples)} == before
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(SystemExit):
        evaluate_main([str(samples), str(ref), "--output", str(notes), "--quiet"])
    assert "is not an sdt-fid result" in capsys.readouterr().err and notes.read_text() == "my notes"
    out = tmp_path / "r.json"
    assert evaluate_main([str(samples), str(ref), "--output", str(out), "--quiet"]) == 0
    assert evaluate_main([str(samples), str(ref), "--output", str(out), "--quiet"]) == 0  # a result: replaced
    assert evaluate_main([str(samples), str(ref), "--output", str(notes), "--overwrite", "--quiet"]) == 0
    assert json.loads(notes.read_text())["fid"] == 1.0


def test_fid_refuses_samples_of_another_resolution(tmp_path, monkeypatch, capsys):
    """Probe: 16×16 samples against a 32×32 reference. Before: scored without a word (Inception resizes both)."""
    monkeypatch.setattr(evaluate_module, "load_inception", _no_inception)
    ref, samples = _stats_npz(tmp_path / "ref.npz", size=32), _samples_npz(tmp_path / "samples.npz", size=16)
    with pytest.raises(EvaluationInputError, match="are 16×16 and the reference images .* 32×32"):
        compute_metrics(samples, ref)
    assert _fid([str(samples), str(ref), "--quiet"]) == 2
    assert "--allow-resolution-mismatch" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="Inception was loaded"):  # allowed: gets as far as the network
        compute_metrics(samples, ref, allow_resolution_mismatch=True, metrics=("fid",))


# --------------------------------------------------------------------------------- probes of this round


def test_fid_sample_never_replaces_files_it_did_not_make(pipeline_dir, tmp_path, capsys):
    """Probe: sdt-fid-sample --output VIRTUAL_imagenet256_labeled.npz (the reference batch, by mistake), and an
    --output whose .json sidecar name holds sdt-fid's results. Before: both replaced after sampling, exit 0."""
    base = ["--pipeline", str(pipeline_dir), "--num-samples", "2", "--per-device-batch", "2", "--steps", "1"]
    ref = _stats_npz(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    before = ref.read_bytes()
    assert _sample_main([*base, "--output", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "exists and was not made by an earlier run" in err and "Traceback" not in err, err
    assert ref.read_bytes() == before and not sampling.shard_dir(ref).exists()
    results = tmp_path / "samples.json"
    results.write_text(json.dumps({"fid": 3.0}))
    assert _sample_main([*base, "--output", str(tmp_path / "samples.npz")]) == 2
    assert "is not a sidecar of this command" in capsys.readouterr().err
    assert json.loads(results.read_text()) == {"fid": 3.0}
    ok = tmp_path / "ok.npz"  # its own files: a rerun after completion rewrites them
    assert _sample_main([*base, "--output", str(ok)]) == 0
    first = ok.read_bytes()
    assert _sample_main([*base, "--output", str(ok)]) == 0 and ok.read_bytes() == first


def test_classify_output_never_lands_in_the_model_or_the_data(tmp_path, monkeypatch, capsys):
    """Probe: sdt-classify MODEL DATA --output MODEL/config.json (a tab-completion slip). Before: the model's
    config was replaced by the result, exit 0."""
    data = _colour_folder(tmp_path / "val", ["red", "green", "blue"])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setattr(classification, "load_classifier", lambda *a, **k: _colour_model(None))
    for out in (model_dir / "config.json", data / "red" / "r.json"):
        assert classify_main([str(model_dir), str(data), "--num-workers", "0", "--output", str(out)]) == 2
        assert "name another file for the result" in capsys.readouterr().err
    assert (model_dir / "config.json").read_text() == "{}" and not (data / "red" / "r.json").exists()


def test_fid_folder_reader_skips_hidden_files_and_refuses_unread_images(tmp_path):
    """Probe: a samples folder with a Jupyter checkpoint copy (.ipynb_checkpoints/0-checkpoint.png) and a .webp
    image. Before: the hidden copy was scored as a sample and the .webp silently left out (wrong counts, exit 0)."""
    folder = tmp_path / "samples"
    for i in range(3):
        _solid(folder / f"{i}.png", (10 * i, 0, 0), size=8)
    _solid(folder / ".ipynb_checkpoints" / "0-checkpoint.png", (0, 0, 0), size=8)
    assert FolderImages(folder).count == 3
    _solid(folder / "3.webp", (30, 0, 0), size=8)
    with pytest.raises(EvaluationInputError, match=r"holds 1 image file\(s\) this reader does not take .*3.webp"):
        FolderImages(folder)


def test_fid_compare_warns_when_the_sample_count_is_not_the_papers(tmp_path, monkeypatch, capsys):
    """Probe: sdt-fid on 5,000 samples with --compare XL. Before: FID-5K printed beside the paper's FID-50K rows
    without a word (FID is biased upward for fewer samples)."""
    ref, samples = _stats_npz(tmp_path / "ref.npz"), _samples_npz(tmp_path / "samples.npz")
    out = tmp_path / "r.json"
    for count, warned in ((5000, True), (50_000, False)):
        result = {"fid": 9.0, "samples": str(samples), "reference": str(ref), "settings": {}, "num_samples": count,
                  "warnings": []}
        monkeypatch.setattr(evaluate_module, "compute_metrics", lambda *a, r=result, **k: dict(r))
        assert evaluate_main([str(samples), str(ref), "--compare", "XL", "--output", str(out), "--quiet"]) == 0
        err = capsys.readouterr().err
        assert ("this row scores 5000 samples" in err) == warned, err
        assert bool(json.loads(out.read_text())["warnings"]) == warned


def test_sdt_visualize_reads_its_image_like_every_reader(pipeline_dir, tmp_path, monkeypatch, capsys):
    """Probe: sdt-visualize --image on a file that is not an image, and on a 16-bit PNG. Before: a PIL
    UnidentifiedImageError traceback, and the 16-bit image clipped to white by the decay-map code."""
    from sdt_diffusion.tools import cli

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(SystemExit) as e:
        cli.visualize_main(["--pipeline", str(pipeline_dir), "--class", "0", "--image", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--image cannot read image {bad}" in err and "Traceback" not in err, err
    seen = []

    def capture(pipe, label, image=None, **kwargs):
        seen.append(np.asarray(image))
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "pipeline_decay_maps", capture)
    grey = _png16(tmp_path / "grey.png", np.full((16, 16), 257 * 60))
    with pytest.raises(SystemExit):
        cli.visualize_main(["--pipeline", str(pipeline_dir), "--class", "0", "--image", str(grey)])
    assert seen[0].shape == (16, 16, 3) and (seen[0] == 60).all()


def test_classify_matches_wordnet_folders_to_either_kind_of_model_names():
    """A full ImageNet folder (1000 WordNet-id folders) fits a model naming its classes by WordNet id (timm's
    label_names) and one naming them as our exports do (ImageNet's names); a partial one is matched by id."""
    from sdt_diffusion.data import LabelledImages, class_names_to_id2label
    from sdt_diffusion.evaluation.classification import check_classes

    wnids = [f"n{i:08d}" for i in range(1000)]
    images = LabelledImages("val", np.array([0, 999]), wnids, 1000, None)
    by_id = LoadedClassifier(_MeanColour(), "timm", 1000, dict(enumerate(wnids)), resolution=8)
    by_name = LoadedClassifier(_MeanColour(), "timm", 1000, class_names_to_id2label(wnids, 1000), resolution=8)
    assert check_classes(by_id, images) is images and check_classes(by_name, images) is images
    partial = LabelledImages("val", np.array([0, 1]), [wnids[5], wnids[7]], 2, None)
    assert check_classes(by_id, partial).labels.tolist() == [5, 7]
    with pytest.raises(DataInputError, match="'n00000005'"):
        check_classes(by_name, partial)
