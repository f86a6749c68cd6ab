"""``--dataset`` through ``datasets.load_dataset``: local parquet files and an image folder loaded offline by the same
call a Hub id takes; labels, class names and id2label; the fingerprint; ``--streaming`` and bad input refused
before any compute (CPU, offline, tiny files in tmp_path)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from conftest import OFFLINE, call_and_reset, make_tiny_vae
from PIL import Image

from sdt_diffusion.data import (
    DataInputError,
    load_image_folder,
    load_image_source,
    open_dataset,
    parse_data_files,
)
from sdt_diffusion.evaluation import classification
from sdt_diffusion.evaluation.classification import LoadedClassifier, classify_main
from sdt_diffusion.training import classifier_config, classifier_trainer, extract, trainer
from sdt_diffusion.training.data_stream import stream_changes
from sdt_diffusion.training.diffusion_config import parse_args, settings_from_args
from sdt_diffusion.utils.errors import ConfigError

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
NAMES = list(COLOURS)
TINY = json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "gate_rank": 4,
                   "lpe_kernel_size": 3})


@pytest.fixture(autouse=True)
def hf_offline(tmp_path, monkeypatch):
    """Offline, with the datasets cache in tmp_path (load_dataset reads ``datasets.config`` at call time; the
    offline switches were read at import, so they are set there too)."""
    import huggingface_hub.constants

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()


def _png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(path: Path, labels: list[int], features: datasets.Features | None = None) -> Path:
    """One parquet file of solid-colour PNGs (the colour of each row's label) with a ClassLabel label column."""
    features = features or datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    rows = {"image": [{"bytes": _png(COLOURS[NAMES[y % 3]]), "path": None} for y in labels], "label": labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


# ------------------------------------------------------------------------------------------- the reader
def test_parquet_and_imagefolder_load_with_labels_and_class_names(tmp_path):
    _parquet(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet", [0, 1, 2, 1])
    by_folder = open_dataset(str(tmp_path / "pq"))  # a local folder of data files, as a Hub id would load
    by_builder = load_image_source(dataset="parquet", data_files=[str(tmp_path / "pq" / "data" / "*.parquet")])
    for images in (by_folder, by_builder):
        assert (images.class_names, images.num_classes, images.labels.tolist()) == (NAMES, 3, [0, 1, 2, 1])
        assert images.image(2).getpixel((0, 0)) == (0, 0, 255) and images.origin["split"] == "train"
        assert images.fingerprint()["source"] == "load_dataset dataset"
    assert by_builder.description == "dataset parquet split 'train'"
    assert list((tmp_path / "hf-cache").iterdir())  # the cache went to tmp_path, not ~/.cache

    for i, name in enumerate(("b cat", "a dog", "b cat")):  # imagefolder: ClassLabel from the sorted folder names
        (tmp_path / "imf" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / "imf" / name / f"{i}.png")
    images = open_dataset(str(tmp_path / "imf"))
    folder = load_image_folder(tmp_path / "imf")
    assert images.class_names == folder.class_names == ["a dog", "b cat"]
    assert sorted(images.labels.tolist()) == sorted(folder.labels.tolist()) == [0, 1, 1]


def test_the_fingerprint_changes_with_the_data_and_the_arguments(tmp_path):
    path = _parquet(tmp_path / "pq" / "train.parquet", [0, 1, 2])
    files = [str(path)]
    first = load_image_source(dataset="parquet", data_files=files).fingerprint()
    assert load_image_source(dataset="parquet", data_files=files).fingerprint() == first  # stable on reload
    _parquet(path, [0, 1, 1])  # the same file name and row count, another label
    changed = load_image_source(dataset="parquet", data_files=files).fingerprint()
    assert changed["count"] == first["count"] and changed["sha256"] != first["sha256"]
    reasons, _ = stream_changes({"training data": first}, {"training data": changed})
    assert reasons == ["training data changed: the same number of samples (3), but another load_dataset dataset "
                       "content"]
    as_test = load_image_source(dataset="parquet", data_files={"test": files}, split="test").fingerprint()
    assert as_test["sha256"] != changed["sha256"]  # another split (of the same file) is another stream


def test_bad_input_is_refused_naming_the_flag_and_value(tmp_path):
    pq = tmp_path / "pq"
    _parquet(pq / "data" / "train.parquet", [0, 1])
    cases = [
        (dict(dataset="ILSVRC/imagenet-1k"), r"^--dataset ILSVRC/imagenet-1k: not a local folder, and load_dataset "
                                             r"cannot fetch it .*HF_DATASETS_OFFLINE"),
        (dict(dataset=str(pq), config="nope"), r"^--dataset-config 'nope' of --dataset .*BuilderConfig 'nope'"),
        (dict(dataset=str(pq), split="test"), r"^--dataset-split 'test' of --dataset .*Unknown split"),
        (dict(dataset=str(pq), image_column="img"), r"no column 'img' \(--image-column\)"),
        (dict(dataset=str(pq), label_column="y"), r"no column 'y' \(--label-column\)"),
        (dict(dataset="parquet"), r"^--dataset parquet: the 'parquet' builder reads the files named by --data-files"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataInputError, match=message):
            load_image_source(**kwargs)
    strings = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    bad = {"strings": (["cat", "dog"], strings, r"does not hold integer labels \(str values such as 'cat'\)"),
           "floats": ([0.0, 1.5], datasets.Features({"image": datasets.Image(), "label": datasets.Value("float32")}),
                      r"does not hold integer labels \(1\.5 at row 1\)"),
           "unlabelled": ([0, -1], None, r"column 'label' -1 at row 1 of dataset parquet split 'train' is out of "
                                         r"range for 3 classes")}
    for name, (labels, features, message) in bad.items():
        rows = {"image": [{"bytes": _png((0, 0, 0)), "path": None}] * 2, "label": labels}
        if features is None:  # ClassLabel's "no label" (-1) passes datasets' own encoding
            _parquet(tmp_path / name / "x.parquet", labels)
        else:
            datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / name / "x.parquet"))
        with pytest.raises(DataInputError, match=message):
            load_image_source(dataset="parquet", data_files=[str(tmp_path / name / "x.parquet")])

    datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "label": [0]}).save_to_disk(str(tmp_path / "s"))
    assert open_dataset(str(tmp_path / "s")).labels.tolist() == [0]  # a saved folder is detected first
    with pytest.raises(DataInputError, match=r"is a save_to_disk folder .* takes no --dataset-config; drop"):
        open_dataset(str(tmp_path / "s"), config="default")
    assert parse_data_files("a.parquet, b/*.parquet") == ["a.parquet", "b/*.parquet"]
    assert parse_data_files('{"train": "t/*", "validation": ["v1", "v2"]}') == {"train": ["t/*"],
                                                                               "validation": ["v1", "v2"]}
    for text, message in (("a,,b", "an empty path"), ("{nope", "not valid JSON"), ('{"train": 3}', "split 'train'")):
        with pytest.raises(DataInputError, match=f"^--data-files .*{message}"):
            parse_data_files(text)


# ------------------------------------------------------------------------------------------ the commands
def _train_argv(out: Path, files: str, *extra: str) -> list[str]:
    return ["--model", "SDT-P-S/2", "--model-kwargs", TINY, "--dataset", "parquet", "--data-files", files,
            "--vae", "none", "--resolution", "8", "--global-batch-size", "2", "--max-steps", "2", "--checkpoint-every",
            "2", "--num-workers", "0", "--report-to", "none", "--no-progress-bar", "--output-dir", str(out), *extra]


def test_sdt_train_exports_class_names_and_refuses_a_resume_on_changed_data(tmp_path, capsys):
    path = _parquet(tmp_path / "pq" / "train.parquet", [0, 1, 2, 0])
    out = tmp_path / "run"
    argv = _train_argv(out, str(path))
    assert call_and_reset(trainer.train, parse_args(argv)).step == 2
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["id2label"] == {"0": "red", "1": "green", "2": "blue"}
    assert "parquet (load_dataset)" in (out / "pipeline" / "README.md").read_text()  # the card names the data
    assert call_and_reset(trainer.main, [*argv, "--resume", "latest", "--max-steps", "4"]) == 0  # same data: exact
    _parquet(path, [0, 1, 2, 1])  # the data changes under the run
    assert call_and_reset(trainer.main, [*argv, "--resume", "latest", "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "training data changed" in err and "--allow-inexact-resume" in err, err
    assert not (out / "checkpoint-6").exists()

    for extra, message in ((["--streaming"], "--streaming: exact resume and the seeded per-epoch order"),
                           (["--dataset-config", "x"], "--dataset-config 'x' of --dataset parquet: the 'parquet' builder has "
                                                        "no configs"),
                           (["--dataset", str(tmp_path / "nowhere")], "nowhere: load_dataset failed")):
        assert call_and_reset(trainer.main, _train_argv(tmp_path / "bad", str(path), *extra)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoint-2").exists()
    no_dataset = [a.replace("--dataset", "--data-dir").replace("parquet", str(tmp_path / "pq"))
                  for a in _train_argv(tmp_path / "bad", str(path))]
    with pytest.raises(ConfigError, match="^--data-files .* needs --dataset"):
        settings_from_args(parse_args(no_dataset))


def test_the_classifier_reads_train_and_validation_splits_with_id2label(tmp_path):
    train = _parquet(tmp_path / "tr.parquet", [0, 1, 2, 2])
    val = _parquet(tmp_path / "va.parquet", [2, 0])
    files = json.dumps({"train": str(train), "validation": str(val)})
    args = classifier_config.parse_args(["--model", "SDT-H-T", "--resolution", "32", "--output-dir",
                                         str(tmp_path / "out"), "--dataset", "parquet", "--data-files", files,
                                         "--eval-dataset", "parquet"])
    settings = classifier_config.settings_from_args(args)
    data = classifier_trainer.open_data(settings, SimpleNamespace(local_main_process_first=contextlib.nullcontext))
    assert data.id2label == {0: "red", 1: "green", 2: "blue"} and data.eval.labels.tolist() == [2, 0]
    assert data.train.labels.tolist() == [0, 1, 2, 2]
    with pytest.raises(ConfigError, match="^--streaming: exact resume"):
        classifier_config.settings_from_args(classifier_config.parse_args(
            ["--model", "SDT-H-T", "--resolution", "32", "--output-dir", str(tmp_path / "o"), "--dataset", "x",
             "--streaming"]))


class _MeanColour(torch.nn.Module):
    """Logit c = mean of normalised channel c: red, green and blue images are classes 0, 1, 2."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))


def test_sdt_classify_and_sdt_extract_latents_read_dataset(tmp_path, monkeypatch, capsys):
    path = _parquet(tmp_path / "pq" / "validation.parquet", [2, 0, 1])
    model = LoadedClassifier(_MeanColour(), "timm", 3, {0: "red", 1: "green", 2: "blue"}, resolution=8)
    monkeypatch.setattr(classification, "load_classifier", lambda *a, **k: model)
    base = ["model", "--dataset", "parquet", "--data-files", str(path), "--num-workers", "0", "--no-progress-bar"]
    assert classify_main([*base, "--output", str(tmp_path / "r.json")]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["top1"], result["images"], result["source"]) == (100.0, 3, "dataset parquet split 'train'")
    assert classify_main([*base, "--streaming"]) == 2
    assert "--streaming: the data's classes are matched" in capsys.readouterr().err
    assert classify_main([*base, "--split", "train"]) == 0  # the old name of --dataset-split still works, warned
    assert "--split is deprecated" in capsys.readouterr().err

    make_tiny_vae().save_pretrained(tmp_path / "vae")
    argv = ["--dataset", "parquet", "--data-files", str(path), "--vae", str(tmp_path / "vae"), "--resolution", "16",
            "--batch-size", "2", "--num-workers", "0", "--cpu", "--output-dir", str(tmp_path / "cache")]
    assert call_and_reset(extract.main, argv) == 0
    meta = json.loads((tmp_path / "cache" / "metadata.json").read_text())
    assert (meta["num_samples"], meta["class_names"], meta["id2label"]) == (3, NAMES, {"0": "red", "1": "green",
                                                                                      "2": "blue"})
    assert np.load(tmp_path / "cache" / meta["shards"][0] / "labels.npy").tolist() == [2, 0, 1]
    assert call_and_reset(extract.main, [*argv, "--overwrite", "--streaming"]) == 2
    assert "--streaming: the cache's per-process blocks" in capsys.readouterr().err
