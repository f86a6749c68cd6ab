"""SDT-H classification training and evaluation: recipe, seeded augmentation, exact resume, 2 CPU processes, export
(transformers, pipeline, timm), eval/classify.py, bad input, the ablation script (tiny models, a handful of steps)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import yaml
from accelerate import Accelerator
from conftest import OFFLINE, call_and_reset, file_hashes, read_metrics, reset_accelerate
from PIL import Image
from transformers import pipeline

from sdt_diffusion import SDTHForImageClassification
from sdt_diffusion.evaluation.classification import (
    classify_main,
    count_topk,
    eval_transform,
    markdown_rows,
    open_labelled_images,
    preset_of,
)
from sdt_diffusion.models.sdt_h import SDT_H_PRESETS
from sdt_diffusion.tools.digits import per_class_subset
from sdt_diffusion.training import classifier_trainer as T
from sdt_diffusion.training import engine
from sdt_diffusion.training.checkpointing import list_checkpoints
from sdt_diffusion.training.classifier_config import (
    model_overrides,
    parse_args,
    scaled_learning_rate,
    settings_from_args,
)
from sdt_diffusion.training.classifier_data import (
    AugmentedImages,
    RepeatedAugmentSampler,
    posterize_any_bits,
    train_transform,
)

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("apple", "banana", "cherry")
TINY = json.dumps({"embed_dims": [16, 32, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 2],
                   "mlp_ratios": [2, 2, 2, 2], "head_hidden_size": 32, "gate_rank": 2})


pytestmark = pytest.mark.usefixtures("offline_env")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; several OpenMP threads on a busy CI machine mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_folder(root: Path, per_class: int, seed: int, classes=CLASSES) -> None:
    """32x32 RGB images, one colour and stripe direction per class, with noise."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((32, 32, 3))
            img[..., c % 3] = 180
            img[:: 2 + c] += 60
            img = np.clip(img + rng.normal(0, 30, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classification_data")
    _write_folder(root / "train", 8, 0)
    _write_folder(root / "val", 3, 1)
    return {"train": root / "train", "val": root / "val", "root": root}


def _argv(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--model-kwargs", TINY, "--data-dir", str(data["train"]), "--eval-data-dir", str(data["val"]),
            "--resolution", "32", "--global-batch-size", "4", "--lr-base-batch", "4", "--repeated-aug", "1",
            "--ema-decay", "0.9", "--num-workers", "0", "--log-every", "1", "--report-to", "none",
            "--no-progress-bar", "--output-dir", str(out), *extra]




def _train(argv: list[str], **kwargs) -> engine.TrainResult:
    return call_and_reset(T.train_classifier, parse_args(argv), **kwargs)


def _main(argv: list[str]) -> int:
    return call_and_reset(T.main, argv)




# ------------------------------------------------------------------------------------------------ recipe
def test_recipe_defaults_are_the_papers(data, tmp_path):
    s = settings_from_args(parse_args(["--data-dir", str(data["train"]), "--output-dir", str(tmp_path)]))
    o, r, a = s.optim, s.schedule, s.augment
    assert (s.model.model, s.data.resolution, s.run.global_batch_size) == ("SDT-H-T", 224, 1024)
    assert (o.learning_rate, r.lr_base_batch, o.weight_decay, r.epochs, r.warmup_epochs) == (1e-3, 1024, 0.05, 300, 5)
    assert (r.min_lr, r.warmup_lr, r.adam_eps, o.max_grad_norm, o.ema_decay) == (1e-5, 1e-6, 1e-8, None, 0.99996)
    assert s.run.max_steps is None and s.checkpoints.checkpoint_every is None  # epochs decide; once per epoch
    assert (a.auto_augment, a.color_jitter, a.reprob, a.remode, a.mixup, a.cutmix) == (
        "rand-m9-mstd0.5-inc1", 0.4, 0.25, "pixel", 0.8, 1.0)
    assert (a.mixup_switch_prob, a.smoothing, a.repeated_aug, a.interpolation, a.hflip) == (0.5, 0.1, 3, "bicubic", 0.5)
    assert a.scale == (0.08, 1.0) and a.ratio == pytest.approx((3 / 4, 4 / 3))
    assert scaled_learning_rate(1e-3, 256, 1024) == pytest.approx(2.5e-4)  # the linear scaling rule
    for preset, rate in (("SDT-H-T", 0.1), ("SDT-H-S", 0.15), ("SDT-H-B", 0.4)):  # stochastic depth per size
        s = settings_from_args(parse_args(["--data-dir", str(data["train"]), "--output-dir", str(tmp_path),
                                           "--model", preset]))
        assert T.resolve_model_config(s, 1000)["drop_path_rate"] == rate
    s = settings_from_args(parse_args(["--data-dir", str(data["train"]), "--output-dir", str(tmp_path),
                                       "--decay-modes", "fixed", "--alpha", "0.05"]))  # the old spelling
    assert model_overrides(s) == {"decay_modes": ("fixed",) * 4, "alpha": 0.05}
    for size in ("t", "s", "b"):  # the packaged size recipes
        s = settings_from_args(parse_args(["--config", f"sdt-h-{size}", "--data-dir", str(data["train"]),
                                           "--output-dir", str(tmp_path)]))
        assert s.model.model == f"SDT-H-{size.upper()}" and s.optim.learning_rate == 1e-3


def test_built_run_uses_the_recipe(data, tmp_path):
    """Weight decay groups, lr schedule, Mixup + soft-target loss and timm's transform, on a planned tiny run."""
    settings = settings_from_args(parse_args(_argv(data, tmp_path / "run", "--epochs", "4", "--warmup-epochs", "1",
                                                   "--learning-rate", "2e-3", "--lr-base-batch", "8")))
    accelerator = Accelerator(cpu=True)
    try:
        task = T.ClassifierTask()
        plan = engine.plan_run(task, settings, accelerator)
        core = task.build(settings, plan, accelerator)
    finally:
        reset_accelerate()
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (6, 24, 6)
    assert plan.learning_rate == pytest.approx(1e-3)  # 2e-3 x 4 / 8
    names = {id(p): n for n, p in core.unwrapped.named_parameters()}
    no_decay, decay = core.optimizer.param_groups
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"]) and len(no_decay["params"]) + len(decay["params"]) == len(names)
    lrs = []
    for step in (0, 3, 6, 15, 23):
        core.scheduler.step_update(step)
        lrs.append(core.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx((1e-6 + 1e-3) / 2, rel=1e-3)  # linear warm-up
    assert lrs[2] == pytest.approx(1e-3) and lrs[2] > lrs[3] > lrs[4] > 1e-5  # cosine from the peak towards 1e-5
    assert type(core.criterion).__name__ == "SoftTargetCrossEntropy" and core.mixup.mixup_alpha == 0.8
    assert core.mixup.cutmix_alpha == 1.0 and core.mixup.label_smoothing == 0.1
    text = repr(train_transform(32, settings.augment))
    for part in ("RandomResizedCrop", "bicubic", "PosterizeIncreasing", "m=9, mstd=0.5", "RandomErasing(p=0.25, "
                 "mode=pixel"):
        assert part in text
    assert len(core.ema.shadow) > len(names)  # parameters and BatchNorm statistics


def test_augmentation_is_a_function_of_seed_epoch_and_image(data):
    images = open_labelled_images(data["train"])
    spec = settings_from_args(parse_args(["--data-dir", str(data["train"]), "--output-dir", "x"])).augment
    ds = AugmentedImages(images, train_transform(32, spec), seed=3)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a, b = ds[(5, 0, 0)], ds[(5, 0, 0)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["labels"] == b["labels"] == images.labels[5]
    assert not torch.equal(a["pixel_values"], ds[(5, 1, 0)]["pixel_values"])  # another epoch, another draw
    assert not torch.equal(a["pixel_values"], ds[(5, 0, 1)]["pixel_values"])  # a repeated copy, another draw
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]  # the global generators are untouched
    # repeated augmentation: as long as an epoch without it; the copies of an image go to different processes
    keys = [RepeatedAugmentSampler(24, 3, rank, seed=0, repeats=3).epoch_keys(4) for rank in range(3)]
    assert [len(k) for k in keys] == [8, 8, 8] and all(e == 4 for k in keys for _, e, _ in k)
    for k in keys:
        assert len({i for i, _, _ in k}) == 8  # no image twice on one process
    assert RepeatedAugmentSampler(24, 1, 0, seed=0).epoch_keys(0) == [(i, 0, 0) for i in np.random.default_rng(
        [0, 0]).permutation(24).tolist()]
    grey = Image.new("RGB", (4, 4), (200, 100, 50))  # timm asks for 0 bits at magnitude 10: black, as old Pillow
    assert np.asarray(posterize_any_bits(grey, 0)).max() == 0
    assert np.asarray(posterize_any_bits(grey, 1)).tolist()[0][0] == [128, 0, 0]


def test_topk_and_eval_transform():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    assert count_topk(logits, torch.tensor([1, 1, 0]), (1, 2, 5)) == [1, 2, 3]
    t = eval_transform(224)
    assert t.transforms[0].size == 256 and t.transforms[1].size == (224, 224)  # resize 256 -> crop 224
    assert eval_transform(32).transforms[0].size == 36 and str(t.transforms[0].interpolation.value) == "bicubic"
    preset = {k: list(v) for k, v in SDT_H_PRESETS["SDT-H-S"].items() if isinstance(v, tuple)}
    assert preset_of(preset) == "SDT-H-S" and preset_of({**preset, "depths": [1, 1, 1, 1]}) is None
    rows = markdown_rows({"preset": "SDT-H-S", "model": "runs/s/model", "resolution": 224, "images": 50000,
                          "top1": 84.0, "top5": 96.9, "params": 27.28e6}).splitlines()
    assert rows[2] == "| SDT-H-S (runs/s/model) | 224 | 50000 | 84.00 | 96.90 | 27.28 | this evaluation |"
    assert rows[3] == "| SDT-H-S | 224 | 50000 (ImageNet-1K val) | 84.2 | – | 27 | paper, Table 1 |"


def test_a_run_records_the_precision_and_trackers_it_used(data, tmp_path, monkeypatch, caplog, capsys):
    """End to end (one step): --mixed-precision on the command line wins over accelerate launch's bf16 with a
    warning naming both; --report-to's default on a core install is no tracker, one log line; both recorded in
    train_config.yaml; --report-to tensorboard there is refused at start-up, naming the extra."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # a core install: no tensorboard extra
    out = tmp_path / "run"
    argv = [a for a in _argv(data, out, "--max-steps", "1") if a not in ("--report-to", "none")]
    assert _main([*argv, "--report-to", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "--report-to tensorboard: tensorboard is not installed" in err and "sdt-diffusion[tensorboard]" in err
    caplog.set_level("INFO", logger="sdt_diffusion.training")
    assert _train([*argv, "--mixed-precision", "no"]).step == 1
    lines = [r.getMessage() for r in caplog.records]
    assert "mixed precision: no (from --mixed-precision on the command line)" in lines
    assert sum("--mixed-precision no (command line) wins over accelerate launch's mixed precision bf16" in line
               for line in lines) == 1
    assert sum(line.startswith("--report-to auto: no tracker") for line in lines) == 1
    recorded = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (recorded["mixed_precision_resolved"], recorded["mixed_precision_source"]) == (
        "no", "--mixed-precision on the command line")
    assert (recorded["report_to"], recorded["report_to_resolved"]) == ("auto", "none")


# ------------------------------------------------------------------------------ run, resume, export, eval
def test_resume_after_sigterm_matches_an_uninterrupted_run_and_the_export_loads(data, tmp_path):
    common = ("--max-steps", "8", "--checkpoint-every", "4")  # 6 steps per epoch: evaluations at 6 and 8
    straight = tmp_path / "straight"
    result = _train(_argv(data, straight, *common))
    assert result.step == 8 and (straight / "training_done.json").is_file()

    part, sent = tmp_path / "part", []

    def sigterm_in_step_3(step, loss):
        if step == 3 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    result = _train(_argv(data, part, *common), loss_hook=sigterm_in_step_3)
    assert result.stopped_by_signal and result.step == 3 and not (part / "model").exists()
    assert [p.name for _, p in list_checkpoints(part)] == ["checkpoint-3"]
    result = _train(_argv(data, part, *common, "--resume", "latest"))
    assert result.step == 8 and not result.stopped_by_signal

    def curve(out):
        return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in read_metrics(out)]

    assert curve(part) == curve(straight)  # the same losses, lr and evaluations, step by step
    evals = [r for r in read_metrics(straight) if "eval_top1" in r]
    assert [r["step"] for r in evals] == [6, 8]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert (part / "checkpoint-8" / name).read_bytes() == (straight / "checkpoint-8" / name).read_bytes(), name
    assert file_hashes(part / "model") == file_hashes(straight / "model") and file_hashes(part / "best") == file_hashes(straight / "best")
    assert _train(_argv(data, part, *common, "--resume", "latest")).step == 8  # finished: nothing to do

    # the export: transformers folder with the class names, pipeline, timm format; all the same weights
    model_dir = straight / "model"
    hf = SDTHForImageClassification.from_pretrained(model_dir).eval()
    assert hf.config.id2label == dict(enumerate(CLASSES))
    tm = timm.create_model(f"local-dir:{model_dir / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).logits, tm(x), atol=1e-5)
    image = Image.open(next((data["val"] / "banana").iterdir()))
    predictions = pipeline("image-classification", model=str(model_dir))(image)
    assert {p["label"] for p in predictions} == set(CLASSES)
    summary = json.loads((model_dir / "training_summary.json").read_text())
    best = json.loads((straight / "best" / "best.json").read_text())
    assert summary["weights"] == best["weights"] and best["top1"] == max(
        max(r["eval_top1"], r["eval_top1_ema"]) for r in evals)

    # eval/classify.py gives the trainer's number for the exported (best) weights, from both formats
    for folder in (model_dir, model_dir / "timm"):
        out_json = tmp_path / f"{folder.name}.json"
        assert classify_main([str(folder), str(data["val"]), "--num-workers", "0", "--no-progress-bar",
                              "--output", str(out_json)]) == 0
        result = json.loads(out_json.read_text())
        assert result["top1"] == pytest.approx(best["top1"]) and result["top5"] == pytest.approx(best["top5"])
        assert result["resolution"] == 32 and result["images"] == 9 and "| custom" in result["markdown"]


def test_a_renamed_class_folder_refuses_the_resume(data, tmp_path, capsys):
    train, out = tmp_path / "train", tmp_path / "run"
    shutil.copytree(data["train"], train)
    argv = _argv({**data, "train": train}, out, "--max-steps", "2", "--checkpoint-every", "2")
    i = argv.index("--eval-data-dir")
    del argv[i:i + 2]  # validation folders would have to be renamed alike
    assert _main(argv) == 0
    (train / "banana").rename(train / "blueberry")  # the same files, ids and order: only the class name differs
    assert _main([*argv, "--resume", "latest", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "class folders renamed: 'banana' -> 'blueberry'" in err and "--allow-inexact-resume" in err, err
    assert "training data changed" not in err, err
    assert [s for s, _ in list_checkpoints(out)] == [2]


# ------------------------------------------------------------------------------------------- bad input
def _bad_case(case: str, data: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
    """Flags for a bad-input case and the text its error must contain."""
    if case == "no classes":
        (tmp / "flat").mkdir()
        Image.new("RGB", (32, 32)).save(tmp / "flat" / "a.png")
        return ["--data-dir", str(tmp / "flat")], "found none"
    if case == "empty class":
        _write_folder(tmp / "d", 2, 0)
        (tmp / "d" / "durian").mkdir()
        return ["--data-dir", str(tmp / "d")], "'durian' holds no images"
    if case == "corrupt image":
        _write_folder(tmp / "d", 2, 0)
        (tmp / "d" / "apple" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return ["--data-dir", str(tmp / "d")], str(tmp / "d" / "apple" / "broken.png")
    if case == "eval classes differ":
        _write_folder(tmp / "v", 1, 0, classes=("apple", "banana", "kiwi"))
        return ["--eval-data-dir", str(tmp / "v")], "classes in only one of them: ['cherry', 'kiwi']"
    if case == "eval label out of range":
        ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (32, 32))] * 2, "label": [0, 7]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "label": datasets.Value("int64")}))
        ds.save_to_disk(str(tmp / "ds"))
        return ["--eval-dataset", str(tmp / "ds")], "label 7 at row 1"
    if case == "odd batch with mixup":
        return ["--global-batch-size", "3"], "must be even"
    if case == "resume without checkpoints":
        return ["--resume", "latest"], "no complete checkpoint"
    if case == "unknown decay mode":
        return ["--decay-mode", "cdsf,cdfs,cdsf,cdsf"], "--decay-mode stage 2"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no classes", "empty class", "corrupt image", "eval classes differ",
                                  "eval label out of range", "odd batch with mixup", "resume without checkpoints",
                                  "unknown decay mode"])
def test_bad_input_fails_before_any_compute(case, data, tmp_path, capsys):
    extra, message = _bad_case(case, data, tmp_path)
    out = tmp_path / "out"
    argv = _argv(data, out, "--max-steps", "1")
    for flag in ("--data-dir", "--eval-data-dir"):  # a case's own data replaces the default
        if flag in extra or (flag == "--eval-data-dir" and "--eval-dataset" in extra):
            i = argv.index(flag)
            del argv[i:i + 2]
    assert _main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not list(out.glob("checkpoint-*"))


def test_classify_script_errors(data, tmp_path, capsys):
    _write_folder(tmp_path / "d", 1, 0)
    (tmp_path / "d" / "empty").mkdir()
    assert classify_main([str(tmp_path / "nothing"), str(data["val"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdt-classify: error:") and "no model here" in err, err
    assert classify_main([str(tmp_path), str(tmp_path / "d")]) == 2
    assert "'empty' holds no images" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ processes, ablation
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--main_process_port", str(_free_port()),
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_cpu_processes_train_evaluate_and_export(data, tmp_path):
    script = str(REPO / "training" / "train_classifier.py")
    bad = _launch([script, *_argv(data, tmp_path / "bad", "--global-batch-size", "5", "--max-steps", "1")])
    assert bad.returncode != 0 and "not divisible by the 2 processes" in bad.stderr, bad.stderr[-2000:]
    out = tmp_path / "ddp"
    proc = _launch([script, *_argv(data, out, "--max-steps", "3", "--checkpoint-every", "2")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoint-3" / "training_state.json").read_text())
    assert (state["num_processes"], state["per_device_batch"], state["grad_accum"]) == (2, 2, 1)
    assert sorted(p.name for p in (out / "checkpoint-3").glob("rng_state_rank*")) == [
        "rng_state_rank00000.safetensors", "rng_state_rank00001.safetensors"]
    final = [r for r in read_metrics(out) if "eval_top1" in r][-1]
    assert final["step"] == 3 and final["eval_images"] == 9  # every validation image once, split over 2 processes
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "timm" / "config.json").is_file()


def _ablation_module():
    spec = importlib.util.spec_from_file_location("ablation_classification",
                                                  REPO / "benchmarks" / "ablation_classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_script_at_a_tiny_budget(data, tmp_path):
    out = tmp_path / "ablation"
    cmd = [sys.executable, str(REPO / "benchmarks" / "ablation_classification.py"), "--data-dir", str(data["train"]),
           "--eval-data-dir", str(data["val"]), "--modes", "none", "cdsf", "--seeds", "0", "--stages", "1,2",
           "--output-dir", str(out), "--train-args",
           f"--model-kwargs '{TINY}' --resolution 32 --global-batch-size 4 --max-steps 2 --num-workers 0 "
           f"--repeated-aug 1 --report-to none --no-progress-bar"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["modes"]) == ["cdsf", "none"] and results["meta"]["stages"] == [1, 2]
    assert results["modes"]["none"]["decay_modes"] == ["none", "none", "cdsf", "cdsf"]  # stages 3-4 keep the preset's
    for mode in ("none", "cdsf"):
        (run,) = results["modes"][mode]["runs"]
        assert run["seed"] == 0 and run["steps"] == 2 and 0 <= run["final_top1"] <= 100
        config = json.loads((out / mode / "seed0" / "checkpoint-2" / "training_state.json").read_text())
        assert config["model_config"]["decay_modes"][:2] == [mode, mode]
    assert proc.stdout.count("| cdsf |") == 1 and (out / "results.md").read_text() in proc.stdout
    # the table: mean ± sample std over seeds, beside the paper's Tables 3-4
    ablation = _ablation_module()
    runs = [{"final_top1": v, "final_top1_ema": v - 1, "best_top1": v + 1} for v in (90.0, 94.0)]
    text = ablation.table({"fixed": {"runs": runs}}, [0, 1])
    assert "| fixed | 92.00 ± 2.83 | 91.00 ± 2.83 | 93.00 ± 2.83 | 82.4 |" in text


@pytest.mark.slow
def test_figure3_trains_the_rows_on_a_digits_subset_and_plots_the_loss_curves(tmp_path):
    """--figure3 end to end on the digits (2 training images per class, 2 epochs, one seed, two rows): the subset,
    the table with held-out losses, the plot, per-step training losses; a rerun reuses the runs, another budget
    in the same folder is refused."""
    out, root, figure = tmp_path / "figure3", tmp_path / "digits", tmp_path / "curves.png"
    cmd = [sys.executable, str(REPO / "benchmarks" / "ablation_classification.py"), "--figure3", "--rows", "rmt",
           "sdt-h+unit-gate", "--seeds", "0", "--epochs", "2", "--train-per-class", "2", "--head-hidden-size", "32",
           "--data-root", str(root), "--output-dir", str(out), "--figure", str(figure), "--train-args",
           "--global-batch-size 4 --lr-base-batch 4 --warmup-epochs 0 --eval-batch-size 128"]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    subset = root / "train_2_per_class"
    assert sorted(len(list(d.iterdir())) for d in subset.iterdir()) == [2] * 10
    assert sum(len(list(d.iterdir())) for d in (root / "heldout").iterdir()) == 359  # the held-out set as always
    results = json.loads((out / "results.json").read_text())
    assert list(results["modes"]) == ["rmt", "sdt-h+unit-gate"] and results["meta"]["train_per_class"] == 2
    text = (out / "results.md").read_text()
    assert text.startswith("| row | final top-1, online (%) | final top-1, EMA (%) | final held-out loss, online |")
    for name, folder in (("rmt", "RMT-T_fixed_decomposed-fixed_decomposed-fixed-fixed_tpc2_head32"),
                         ("sdt-h+unit-gate", "SDT-H-T_decomposed-decomposed-cdsf-cdsf_output_gate_init-unit_tpc2_head32")):
        (run,) = results["modes"][name]["runs"]
        assert run["steps"] == 10 and run["final_eval_loss"] > 0 and f"| {name} | " in text
        config = yaml.safe_load((out / folder / "seed0" / "train_config.yaml").read_text())
        assert config["data_dir"] == str(subset) and config["resolved_model_config"]["head_hidden_size"] == 32
        metrics = [json.loads(line) for line in (out / folder / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 11))  # every step's training loss
        assert [r["step"] for r in metrics if "eval_loss" in r] == [5, 10]  # held-out loss and top-1 per epoch
    assert results["modes"]["sdt-h+unit-gate"]["model_kwargs"] == {"output_gate_init": "unit"}
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > 1000
    # a rerun trains nothing; the same folder with another budget is refused
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0 and "train_classifier.py" not in again.stdout, again.stderr[-3000:]
    longer = [part if part != "2" or cmd[i - 1] != "--epochs" else "3" for i, part in enumerate(cmd)]
    refused = subprocess.run(longer, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert refused.returncode == 2 and "--epochs 2 (wanted 3)" in refused.stderr, refused.stderr[-3000:]


def test_per_class_subset_is_fixed_nested_and_checked():
    labels = np.repeat(np.arange(3), [5, 7, 6])
    two, four = per_class_subset(labels, 2), per_class_subset(labels, 4)
    assert np.bincount(labels[two]).tolist() == [2, 2, 2] and np.bincount(labels[four]).tolist() == [4, 4, 4]
    assert set(two) <= set(four)  # the first N of one fixed shuffle: a larger N adds images
    assert np.array_equal(per_class_subset(labels, 2), two) and not np.array_equal(per_class_subset(labels, 2, 1), two)
    for bad in (0, 6):
        with pytest.raises(ValueError, match="between 1 and 5"):
            per_class_subset(labels, bad)
