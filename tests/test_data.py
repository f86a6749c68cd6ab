"""The data layer (sdt_diffusion.data): class folders and saved datasets, bad input named, the latent cache, seeded
sampling, and its place below training and evaluation (CPU, offline, tiny files in tmp_path)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from sdt_diffusion.data import (
    CACHE_FORMAT,
    CACHE_VERSION,
    IMAGE_EXTENSIONS,
    DataInputError,
    EpochSampler,
    FolderRows,
    ImageClassDataset,
    LatentCacheDataset,
    TransformedImages,
    UnreadableImageError,
    check_labels,
    class_names_to_id2label,
    find_unreadable_images,
    is_visible,
    iterate_batches,
    load_image_folder,
    load_image_source,
    load_saved_dataset,
    open_image,
    open_labelled_images,
    read_cache_metadata,
)
from sdt_diffusion.utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _image(value: int, size: tuple[int, int] = (6, 8)) -> Image.Image:
    """A solid RGB image whose red channel is ``value`` (so a row can be told apart after decoding)."""
    arr = np.zeros((*size, 3), np.uint8)
    arr[..., 0] = value
    return Image.fromarray(arr)


def _save(path: Path, value: int) -> None:
    """An image file; PIL picks the format from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(value).save(path)


def _dataset(labels: list[int], names: list[str] | None = None) -> datasets.Dataset:
    label_feature = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    return datasets.Dataset.from_dict(
        {"image": [_image(10 * (i + 1)) for i in range(len(labels))], "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": label_feature}))


# ------------------------------------------------------------------------------------------ class folders
def test_class_folder_rows_classes_and_the_one_hidden_and_extension_rule(tmp_path):
    for i, rel in enumerate(("b/1.png", "b/10.PNG", "a/x.jpg", "a/deeper/y.png", "c c/z.webp", "a/w.GIF")):
        _save(tmp_path / rel, 10 * i)
    for hidden in (".hidden/h.png", "__pycache__/p.png", "a/.h.png", "a/__h.png", "a/.deep/d.png", "b/__x/q.png"):
        _save(tmp_path / hidden, 0)
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.png").write_bytes(b"a file at the top is no class")

    images = load_image_folder(tmp_path)
    assert images.class_names == ["a", "b", "c c"] and images.num_classes == 3
    assert images.description == f"image folder {tmp_path}"
    assert isinstance(images.dataset, FolderRows)
    rows = [Path(images.where(i)).relative_to(tmp_path).as_posix() for i in range(len(images))]
    assert rows == ["a/deeper/y.png", "a/w.GIF", "a/x.jpg", "b/1.png", "b/10.PNG", "c c/z.webp"]  # sorted paths
    assert images.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert [images.dataset[i]["image"]["path"] for i in range(len(images))] == [images.where(i) for i in
                                                                                 range(len(images))]
    assert images.image(4).mode == "RGB" and images.image(4).getpixel((0, 0))[0] == 10  # b/10.PNG
    assert not is_visible(".git") and not is_visible("__MACOSX") and is_visible("n01440764") and is_visible("_a")
    assert {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    # both entry points read a folder the same way
    for other in (open_labelled_images(tmp_path), load_image_source(data_dir=tmp_path)):
        assert other.class_names == images.class_names and other.labels.tolist() == images.labels.tolist()
        assert [other.where(i) for i in range(len(other))] == [images.where(i) for i in range(len(images))]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_class_folder_follows_links_once(tmp_path):
    _save(tmp_path / "data" / "a" / "1.png", 1)
    _save(tmp_path / "elsewhere" / "2.png", 2)
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "a" / "linked")
    os.symlink(tmp_path / "data" / "a", tmp_path / "data" / "a" / "loop")  # a cycle: walked once, no hang
    images = load_image_folder(tmp_path / "data")
    assert [Path(images.where(i)).relative_to(tmp_path / "data").as_posix() for i in range(len(images))] == [
        "a/1.png", "a/linked/2.png"]


def test_class_folder_errors_name_the_flag_and_the_folder(tmp_path):
    with pytest.raises(DataInputError, match=re.escape(f"--data-dir {tmp_path / 'missing'}: not a directory")):
        load_image_source(data_dir=tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "x.png", 0)
    with pytest.raises(DataInputError, match="image folder .*flat: expected an image folder with one sub-folder per "
                                             "class, found none"):
        load_image_folder(tmp_path / "flat")
    _save(tmp_path / "d" / "b" / "1.png", 0)
    (tmp_path / "d" / "a").mkdir()
    _save(tmp_path / "d" / "a" / ".only-hidden.png", 0)
    with pytest.raises(DataInputError, match=r"^--eval-data-dir .*d: class folder 'a' holds no images \(1 of 2"):
        load_image_source(data_dir=tmp_path / "d", folder_flag="--eval-data-dir")
    (tmp_path / "d" / "c").mkdir()
    (tmp_path / "d" / "c" / "readme.txt").write_text("no image")
    with pytest.raises(ConfigError, match="class folders 'a', 'c' hold no images"):  # every layer's error type
        open_labelled_images(tmp_path / "d")
    with pytest.raises(DataInputError, match="not a directory"):
        open_labelled_images(tmp_path / "flat" / "x.png")
    with pytest.raises(DataInputError, match="exactly one of --data-dir, --dataset"):
        load_image_source()
    with pytest.raises(DataInputError, match="exactly one of --data-dir, --dataset"):
        load_image_source(data_dir=tmp_path / "d", dataset=tmp_path / "d")


# ------------------------------------------------------------------------------------------ saved datasets
def test_saved_dataset_with_and_without_splits(tmp_path):
    _dataset([1, 0, 1], ["cat", "dog"]).save_to_disk(str(tmp_path / "plain"))
    images = open_labelled_images(tmp_path / "plain")
    assert (images.class_names, images.num_classes, images.labels.tolist()) == (["cat", "dog"], 2, [1, 0, 1])
    assert images.dataset.column_names == ["image"] and images.where(2) == f"row 2 of dataset {tmp_path / 'plain'}"
    assert [images.image(i).getpixel((0, 0))[0] for i in range(3)] == [10, 20, 30]
    assert load_image_source(dataset=tmp_path / "plain").labels.tolist() == [1, 0, 1]  # "train" split: not needed

    datasets.DatasetDict({"train": _dataset([0, 1, 2, 3]), "validation": _dataset([3, 2])}).save_to_disk(
        str(tmp_path / "dict"))
    val = open_labelled_images(tmp_path / "dict", split="validation")
    assert val.description == f"dataset {tmp_path / 'dict'} split 'validation'"
    assert (val.class_names, val.num_classes, val.labels.tolist()) == (None, 4, [3, 2])  # unnamed: max label + 1
    assert load_image_source(dataset=tmp_path / "dict").labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(DataInputError, match=r"holds the splits \['train', 'validation'\]; name one"):
        open_labelled_images(tmp_path / "dict")
    with pytest.raises(DataInputError, match=r"^--dataset .*dict: no split 'test' \(splits: \['train', 'validation'"):
        load_image_source(dataset=tmp_path / "dict", split="test")


def test_saved_dataset_errors_name_the_column_and_row(tmp_path, monkeypatch):
    _dataset([0, 1]).save_to_disk(str(tmp_path / "ok"))
    with pytest.raises(DataInputError, match=r"--dataset .*ok: no column 'img' \(--image-column\); columns: "):
        load_image_source(dataset=tmp_path / "ok", image_column="img")
    with pytest.raises(DataInputError, match=r"no column 'class' \(--label-column\)"):
        open_labelled_images(tmp_path / "ok", label_column="class")
    with pytest.raises(DataInputError, match="not a dataset saved with save_to_disk"):
        load_saved_dataset(tmp_path / "nothing-here")
    with monkeypatch.context() as m:  # datasets cannot load a saved dataset without rows; one built in memory
        m.setattr(datasets, "load_from_disk", lambda path: _dataset([]))
        with pytest.raises(DataInputError, match="ok: no rows"):
            open_labelled_images(tmp_path / "ok")
    datasets.Dataset.from_dict({"image": [_image(1)], "label": ["cat"]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "label": datasets.Value("string")})
                               ).save_to_disk(str(tmp_path / "strings"))
    with pytest.raises(DataInputError, match="column 'label' does not hold integer labels"):
        open_labelled_images(tmp_path / "strings")
    _dataset([0, -1, 1]).save_to_disk(str(tmp_path / "negative"))
    with pytest.raises(DataInputError, match=r"column 'label' -1 at row 1 of dataset .*negative is out of range for 2 "
                                             r"classes \(1 label\(s\) outside \[0, 2\)\)"):
        load_image_source(dataset=tmp_path / "negative")
    _dataset([0, -1], ["cat", "dog"]).save_to_disk(str(tmp_path / "unlabelled"))  # ClassLabel's "no label" is -1
    with pytest.raises(DataInputError, match="-1 at row 1"):
        open_labelled_images(tmp_path / "unlabelled")


# ------------------------------------------------------------------------------------ images and labels
def test_bad_images_are_named_and_scanned(tmp_path):
    _save(tmp_path / "d" / "a" / "ok.png", 5)
    (tmp_path / "d" / "b").mkdir(parents=True)
    (tmp_path / "d" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = load_image_folder(tmp_path / "d")
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*b/broken\.png: UnidentifiedImageError") as e:
        images.image(1)
    assert isinstance(e.value, OSError) and isinstance(e.value, ConfigError)  # guarded file reads still catch it
    with pytest.raises(OSError, match="broken.png"):
        ImageClassDataset(images, 4)[(1, 1)]
    assert find_unreadable_images(images) == [str(e.value)] and find_unreadable_images(images, [0]) == []

    ds = datasets.Dataset.from_dict({"image": [{"bytes": b"junk", "path": "orig.png"}, _image(3)], "label": [0, 0]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = open_labelled_images(tmp_path / "saved")
    problems = find_unreadable_images(saved)
    assert len(problems) == 1 and f"cannot read image row 0 of dataset {tmp_path / 'saved'} (orig.png)" in problems[0]
    assert saved.image(1).getpixel((0, 0)) == (3, 0, 0)
    with pytest.raises(UnreadableImageError, match="cell 7: ValueError: the image cell has neither bytes nor a path"):
        open_image({"bytes": None, "path": None}, "cell 7")
    assert open_image(np.zeros((2, 3), np.uint8), "an array").size == (3, 2)  # grey arrays become RGB
    assert open_image(str(tmp_path / "d" / "a" / "ok.png"), "a path").mode == "RGB"


def test_check_labels_names_the_first_label_out_of_range(tmp_path):
    _save(tmp_path / "d" / "a" / "1.png", 0)
    _save(tmp_path / "d" / "b" / "2.png", 0)
    _save(tmp_path / "d" / "c" / "3.png", 0)
    images = load_image_folder(tmp_path / "d")
    check_labels(images, 3)
    with pytest.raises(DataInputError, match=r"label 2 at .*c/3\.png is out of range for 2 classes \(1 label"):
        check_labels(images, 2, "label")


def test_adm_and_transformed_datasets_read_folders_and_saved_datasets_alike(tmp_path):
    ds = _dataset([0, 1, 0], ["x", "y"])
    ds.save_to_disk(str(tmp_path / "saved"))
    for i, row in enumerate(ds):  # the same images as a class folder (rows keep their order: x/0, x/2, y/1)
        _save(tmp_path / "folder" / ["x", "y"][row["label"]] / f"{i}.png", 10 * (i + 1))
    folder, saved = load_image_folder(tmp_path / "folder"), open_labelled_images(tmp_path / "saved")
    order = [0, 2, 1]  # folder row -> dataset row
    a, b = ImageClassDataset(folder, 4), ImageClassDataset(saved, 4, label_map=np.array([1, 0]))
    for fi, si in enumerate(order):
        x, y = a[(fi, 1)], b[si]
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["index"] == fi and y["index"] == si
        assert x["labels"] == 1 - y["labels"]  # label_map swapped the saved dataset's ids
    assert a[0]["pixel_values"].shape == (3, 4, 4) and float(a[0]["pixel_values"][0, 0, 0]) == pytest.approx(
        10 / 127.5 - 1)
    pairs = TransformedImages(saved, lambda im: torch.tensor(im.getpixel((0, 0))))
    assert len(pairs) == 3 and pairs[2][0].tolist() == [30, 0, 0] and pairs[1][1] == 1


def test_class_names_to_id2label():
    assert class_names_to_id2label(["cat", "dog"], 2) == {0: "cat", 1: "dog"}
    imagenet = class_names_to_id2label([f"n{i:08d}" for i in range(1000)], 1000)
    assert len(imagenet) == 1000 and imagenet[0].startswith("tench")
    assert class_names_to_id2label(None, 1000) == imagenet and class_names_to_id2label(None, 7) is None


# ------------------------------------------------------------------------------------------ latent cache
def _write_cache(cache: Path, n: int = 6, shards: int = 2) -> Path:
    """A consistent two-shard cache: ``mean[i, flip] == i + 0.5·flip``, labels ``i % 3``."""
    names = []
    rows = np.array_split(np.arange(n), shards)
    for s, part in enumerate(rows):
        shard = cache / f"shard-{s:05d}-of-{shards:05d}"
        shard.mkdir(parents=True)
        mean = (part[:, None] + 0.5 * np.arange(2)[None, :])[:, :, None, None, None] * np.ones((1, 1, 4, 2, 2))
        np.save(shard / "mean.npy", mean.astype(np.float16))
        np.save(shard / "std.npy", np.full((len(part), 2, 4, 2, 2), 0.25, np.float16))
        np.save(shard / "labels.npy", part % 3)
        np.save(shard / "indices.npy", part)
        names.append(shard.name)
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "num_samples": n, "num_shards": shards,
            "shards": names, "latent_shape": [4, 2, 2], "dtype": "float16"}
    (cache / "metadata.json").write_text(json.dumps(meta))
    return cache


def test_latent_cache_reads_every_shard_by_image_index(tmp_path):
    cache = LatentCacheDataset(_write_cache(tmp_path / "cache"))
    assert len(cache) == 6 and cache.labels.tolist() == [0, 1, 2, 0, 1, 2] and cache.latent_shape == (4, 2, 2)
    item = cache[(4, 1)]
    assert item["index"] == 4 and item["labels"] == 1 and item["latent_mean"].dtype == torch.float32
    assert torch.equal(item["latent_mean"], torch.full((4, 2, 2), 4.5)) and float(item["latent_std"][0, 0, 0]) == 0.25
    assert torch.equal(cache[2]["latent_mean"], torch.full((4, 2, 2), 2.0))  # a bare index: flip 0
    assert read_cache_metadata(tmp_path / "cache")["num_samples"] == 6
    clone = torch.utils.data.DataLoader(cache, batch_size=3, num_workers=0)
    assert next(iter(clone))["index"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("damage, message", [
    ("no metadata", "no metadata.json"),
    ("not json", "metadata.json: not a JSON file"),
    ("foreign", "not an sdt-diffusion latent cache (format 'other')"),
    ("version", "version 99, this code reads 1"),
    ("no field", "metadata.json: no latent_shape"),
    ("missing file", "missing shard-00001-of-00002/std.npy"),
    ("truncated", "mean.npy: unreadable latent cache array"),
    ("shape", "labels.npy: shape (2,), the cache's metadata.json says (3,)"),
    ("indices", "shard indices do not cover 0..5 exactly once"),
])
def test_latent_cache_damage_is_named(tmp_path, damage, message):
    cache = _write_cache(tmp_path / "cache")
    shard = cache / "shard-00001-of-00002"
    meta = json.loads((cache / "metadata.json").read_text())
    if damage == "no metadata":
        (cache / "metadata.json").unlink()
    elif damage == "not json":
        (cache / "metadata.json").write_text("{oops")
    elif damage in ("foreign", "version", "no field"):
        meta.update({"foreign": {"format": "other"}, "version": {"version": 99}}.get(damage, {}))
        if damage == "no field":
            del meta["latent_shape"]
        (cache / "metadata.json").write_text(json.dumps(meta))
    elif damage == "missing file":
        (shard / "std.npy").unlink()
    elif damage == "truncated":
        (shard / "mean.npy").write_bytes((shard / "mean.npy").read_bytes()[:100])
    elif damage == "shape":
        np.save(shard / "labels.npy", np.zeros(2, np.int64))
    else:
        np.save(shard / "indices.npy", np.array([3, 4, 4]))
    with pytest.raises(DataInputError, match=re.escape(message)):
        LatentCacheDataset(cache)


# ------------------------------------------------------------------------------------------------ sampling
def test_epoch_sampler_is_a_pure_function_of_seed_and_epoch():
    a, b = EpochSampler(10, 1, 0, seed=7), EpochSampler(10, 1, 0, seed=7)
    assert a.epoch_keys(3) == b.epoch_keys(3) and a.epoch_keys(3) != a.epoch_keys(4)
    assert a.epoch_keys(0) != EpochSampler(10, 1, 0, seed=8).epoch_keys(0)
    a.set_epoch(3)
    assert list(a) == b.epoch_keys(3) and sorted(i for i, _ in a) == list(range(10))
    assert EpochSampler(5, 1, 0, shuffle=False, random_flip=False).epoch_keys(0) == [(i, 0) for i in range(5)]
    with pytest.raises(ConfigError, match="3 samples cannot be split across 4 processes"):
        EpochSampler(3, 4, 0)


def test_iterate_batches_resumes_exactly_and_leaves_the_global_rng_alone():
    data = [{"index": i} for i in range(10)]

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, key):
            index, flip = key
            return {"index": index, "flip": flip}

    def take(start: int, count: int) -> list[tuple[int, list[int], list[int]]]:
        stream = iterate_batches(Items(), EpochSampler(10, 1, 0, seed=1), 4, start_batch=start)
        return [(e, b["index"].tolist(), b["flip"].tolist()) for e, b in (next(stream) for _ in range(count))]

    state = torch.get_rng_state()
    full = take(0, 7)  # 2 batches per epoch (the partial third is dropped): 7 batches cross 3 epochs
    assert torch.equal(torch.get_rng_state(), state)
    assert [e for e, _, _ in full] == [0, 0, 1, 1, 2, 2, 3]
    assert take(3, 4) == full[3:] and take(4, 3) == full[4:]  # a resumed stream sees what an uninterrupted one saw
    assert full[0][1] + full[1][1] == [i for i, _ in EpochSampler(10, 1, 0, seed=1).epoch_keys(0)[:8]]
    with pytest.raises(ConfigError, match="fewer than one batch of 11"):
        next(iterate_batches(Items(), EpochSampler(10, 1, 0), 11))


# ------------------------------------------------------------------------------------------------- layering
def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import statement in ``path`` (relative modules keep their dots)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def test_the_data_layer_imports_neither_training_nor_evaluation():
    code = ("import sys, sdt_diffusion.data; "
            "print(sorted(m for m in sys.modules if m.startswith(('sdt_diffusion.training', "
            "'sdt_diffusion.evaluation'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
    for path in (REPO / "sdt_diffusion" / "data").glob("*.py"):
        for module, _ in _imports(path):
            assert not any(part in module for part in ("training", "evaluation")), (path, module)
    for path in (REPO / "sdt_diffusion" / "training").glob("*.py"):  # training reads its data from the data layer
        for module, names in _imports(path):
            assert "evaluation" not in module or not {"LabelledImages", "open_labelled_images", "check_labels",
                                                      "TransformedImages", "find_unreadable_images"} & set(names), path
            assert module not in (".data", "sdt_diffusion.training.data"), path  # the old training.data is gone
