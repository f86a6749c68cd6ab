"""Training-side fault tests (issue 25): exports that leave siblings alone, YAML alias bombs, a full disk during a
checkpoint write, a checkpoint config that does not fit its weights, unreadable training images, absurd sizes and
hostile folder/flag combinations (CPU, offline, pixel space, 1 layer)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE, call_and_reset
from PIL import Image
from safetensors import SafetensorError

from sdt_diffusion.training import (
    classifier_config,
    classifier_trainer,
    export,
    extract,
    state_files,
    trainer,
)
from sdt_diffusion.training.checkpointing import STATE_FILE, list_checkpoints
from sdt_diffusion.training.diffusion_config import parse_args, settings_from_args
from sdt_diffusion.utils.errors import ConfigError
from sdt_diffusion.utils.files import replace_dir
from sdt_diffusion.utils.safe_yaml import YamlAliasError, load_yaml

TINY = json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "gate_rank": 4,
                   "lpe_kernel_size": 3})
STATE_FILES = ("model.safetensors", "optimizer.safetensors", "ema.safetensors", "rng_state_rank00000.safetensors")


pytestmark = pytest.mark.usefixtures("offline_env")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two classes of noisy 8x8 images, 4 each."""
    root = tmp_path_factory.mktemp("reliability_train_data")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            base = np.zeros((8, 8, 3))
            base[..., 2 * c] = 200
            Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)).save(
                root / name / f"{i:03d}.png")
    return root


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    """4 steps of 4 images, a checkpoint every 2 steps, no sample grids or intermediate exports."""
    return ["--model", "SDT-P-S/2", "--model-kwargs", TINY, "--data-dir", str(data), "--vae", "none",
            "--resolution", "8", "--global-batch-size", "4", "--num-workers", "0", "--log-every", "1",
            "--report-to", "none", "--no-progress-bar", "--max-steps", "4", "--checkpoint-every", "2",
            "--keep-checkpoints", "0", "--output-dir", str(out), *extra]


def _main(argv: list[str]) -> int:
    return call_and_reset(trainer.main, argv)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run: checkpoint-2, checkpoint-4 and its exported pipeline."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _main(_argv(data, out)) == 0
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    return out


# ------------------------------------------------------------------- item 8: exports own only their own names
def test_an_export_leaves_the_users_old_and_tmp_folders_alone(reference, tmp_path, capsys):
    target = tmp_path / "pipeline"
    kept = {}
    for suffix in (".old", ".tmp"):  # e.g. `mv pipeline pipeline.old` to keep the last export
        folder = tmp_path / f"pipeline{suffix}"
        folder.mkdir()
        (folder / "model_index.json").write_text(suffix)
        kept[folder] = suffix
    for _ in range(2):  # a new folder, then replacing an existing export
        assert export.main([str(reference / "checkpoint-4"), "--output-dir", str(target)]) == 0, capsys.readouterr()
        assert (target / "model_index.json").is_file()
        for folder, suffix in kept.items():
            assert (folder / "model_index.json").read_text() == suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline", "pipeline.old", "pipeline.tmp"]


def test_replace_dir_removes_only_the_folder_it_moved_aside(tmp_path):
    old_user = tmp_path / "out.old"
    old_user.mkdir()
    (old_user / "keep").write_text("mine")
    for content in ("first", "second"):
        new = tmp_path / f"new-{content}"
        new.mkdir()
        (new / "f").write_text(content)
        replace_dir(new, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "second"
    assert (old_user / "keep").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.old"]


def test_a_failed_export_removes_its_own_temporary_folder_only(reference, tmp_path, monkeypatch):
    (tmp_path / "pipeline.tmp").mkdir()  # a user's folder of that name
    (tmp_path / "pipeline.tmp" / "keep").write_text("mine")

    def broken(self, path, **kwargs):
        Path(path).mkdir()
        (Path(path) / "partial").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "partial"))

    monkeypatch.setattr(export.SDTPipeline, "save_pretrained", broken)
    with pytest.raises(OSError):
        export.export_checkpoint(reference / "checkpoint-4", tmp_path / "pipeline")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.tmp"]
    assert [p.name for p in (tmp_path / "pipeline.tmp").iterdir()] == ["keep"]


# --------------------------------------------------------------------------- item 12: YAML alias bombs
def _bomb(levels: int, width: int = 10) -> str:
    """A "billion laughs" document: ``width ** levels`` strings from a few hundred bytes, as model_kwargs."""
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    # the anchors live under model_kwargs, the one key whose value the trainer takes whole
    return "model_kwargs:\n" + "\n".join("  " + line for line in lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(data, tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(_bomb(5))  # 10^5 strings: big enough to show, small enough to fail fast before the fix
    assert config.stat().st_size < 1024
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(config), "--data-dir", str(data)])
    message = str(info.value)
    assert "alias" in message and str(config) in message and len(message) < 500, message[:500]
    assert time.perf_counter() - start < 5


def test_the_safe_loader_refuses_aliases_at_any_depth_and_oversized_files(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb(9))  # a billion strings if expanded
    start = time.perf_counter()
    with pytest.raises(YamlAliasError, match=r"alias \*a0"):
        load_yaml(bomb)
    assert time.perf_counter() - start < 1
    plain = tmp_path / "plain.yaml"
    plain.write_text("model_kwargs: {num_layers: 2}\nanchored: &x 3\n")  # an anchor without an alias is harmless
    assert load_yaml(plain) == {"model_kwargs": {"num_layers": 2}, "anchored": 3}
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * 2000 + "\n")
    with pytest.raises(ValueError, match="more than the 1000"):
        load_yaml(big, max_bytes=1000)


def test_every_yaml_read_of_the_project_goes_through_the_safe_loader():
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for folder in ("sdt_diffusion", "benchmarks", "training", "eval", "scripts"):
        for f in (root / folder).rglob("*.py") if (root / folder).is_dir() else ():
            text = f.read_text()
            if any(call in text for call in ("yaml.safe_load", "yaml.load(", "yaml.full_load", "yaml.unsafe_load")):
                if f.name != "safe_yaml.py":
                    offenders.append(str(f.relative_to(root)))
    assert offenders == []


# ------------------------------------------------------------------ item 13: a full disk during a checkpoint
def _full_disk_at(monkeypatch, n: int, error: Exception) -> None:
    """Make the ``n``-th safetensors write of state_files (RNG, optimizer, EMA per checkpoint) fail with ``error``."""
    real = state_files.save_file
    calls = {"n": 0}

    def writer(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == n:
            Path(filename).write_bytes(b"\0" * 16)  # what a full disk leaves: a truncated file
            raise error
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(state_files, "save_file", writer)


@pytest.mark.parametrize("error", [
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                    'on device" })'),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["SafetensorError", "OSError"])
def test_a_full_disk_during_a_checkpoint_names_the_file_and_the_resume_is_exact(error, data, reference, tmp_path,
                                                                                 monkeypatch, capsys):
    out = tmp_path / "run"
    _full_disk_at(monkeypatch, 6, error)  # RNG, optimizer, EMA per checkpoint: the second one's EMA file
    assert _main(_argv(data, out)) == 1  # a fault found during training, not bad input (2)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SafetensorError" not in err, err
    assert str(out / "checkpoint-4.tmp" / "ema.safetensors") in err, err
    assert "disk is full" in err and f"previous checkpoint {out / 'checkpoint-2'} is intact" in err, err
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert not (out / "checkpoint-4.tmp").exists()  # the half-written folder is removed, giving the space back
    monkeypatch.undo()  # space freed
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    assert _main(_argv(data, out, "--resume", "latest")) == 0
    for name in STATE_FILES:
        assert (out / "checkpoint-4" / name).read_bytes() == (reference / "checkpoint-4" / name).read_bytes(), name


# ----------------------------------------------- item 15: a checkpoint config is checked against the weights first
def _forged(reference: Path, target: Path, **changes) -> Path:
    shutil.copytree(reference / "checkpoint-4", target)
    state = json.loads((target / STATE_FILE).read_text())
    state["model_config"].update(changes)
    (target / STATE_FILE).write_text(json.dumps(state))
    return target


@pytest.mark.parametrize("changes, named", [
    ({"num_layers": 150}, "parameters"),
    ({"attention_head_dim": 16}, "parameter "),
], ids=["150-layers", "wider-heads"])
def test_a_config_that_does_not_fit_the_weights_is_refused_before_the_model_is_allocated(
        changes, named, reference, tmp_path, monkeypatch, capsys):
    checkpoint = _forged(reference, tmp_path / "checkpoint-4", **changes)
    built = []
    real = export.build_transformer

    def spy(config):
        model = real(config)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(export, "build_transformer", spy)
    assert export.main([str(checkpoint), "--output-dir", str(tmp_path / "pipe")]) == 2
    err = capsys.readouterr().err
    assert built == ["meta"], built  # only the allocation-free skeleton was built
    assert str(checkpoint / STATE_FILE) in err and named in err and "does not belong to these weights" in err, err
    assert not (tmp_path / "pipe").exists()


def test_a_fitting_checkpoint_still_exports_the_ema_weights(reference, tmp_path):
    path = export.export_checkpoint(reference / "checkpoint-4", tmp_path / "pipe")
    ema = state_files.load_ema_file(reference / "checkpoint-4" / "ema.safetensors")[0]
    weights = export.SDTPipeline.from_pretrained(str(path)).transformer.parameters()
    assert all(torch.equal(w, e) for w, e in zip(weights, ema, strict=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_no_temporary_name_is_shared_between_two_exports(tmp_path):
    names = {export.private_sibling(tmp_path / "pipeline", "tmp") for _ in range(50)}
    assert len(names) == 50 and all(n.name.startswith(f".pipeline.{os.getpid()}.") for n in names)


def test_state_file_writes_name_the_file_on_io_errors_only(tmp_path, monkeypatch):
    target = tmp_path / "ema.safetensors"
    ema = type("E", (), {"shadow": [torch.zeros(2)], "decay": 0.9, "num_updates": 1})()
    for raised, expected in [
        (SafetensorError('Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem, message: '
                         '"Read-only file system" })'), OSError),
        (SafetensorError("tensors share memory"), SafetensorError),  # not an I/O failure: unchanged
    ]:
        def failing(*args, error=raised, **kwargs):
            raise error

        monkeypatch.setattr(state_files, "save_file", failing)
        with pytest.raises(expected) as info:
            state_files.save_ema_file(ema, target)
        assert type(info.value) is expected
        if expected is OSError:
            assert info.value.filename == str(target) and info.value.errno == errno.EIO


# ----------------------------------------------------------------------- item 2: resume after the data changed
def _copy_run_and_data(reference: Path, data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the reference run (finished at step 4) and of the folder it was trained on."""
    out, folder = tmp_path / "run", tmp_path / "data"
    shutil.copytree(reference, out)
    shutil.copytree(data, folder)
    return out, folder


def test_images_added_to_the_folder_refuse_the_resume_unless_inexact_is_allowed(data, reference, tmp_path, capsys,
                                                                                caplog):
    out, folder = _copy_run_and_data(reference, data, tmp_path)
    shutil.copy(folder / "red" / "000.png", folder / "red" / "extra.png")
    argv = _argv(folder, out, "--resume", "latest", "--max-steps", "6")
    assert _main(argv) == 2
    err = capsys.readouterr().err
    reason = "training data changed: 1 file added (8 -> 9)"
    assert reason in err and "--allow-inexact-resume" in err, err
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]  # nothing was trained
    assert _main([*argv, "--allow-inexact-resume"]) == 0
    assert f"INEXACT RESUME (--allow-inexact-resume): {reason}" in caplog.text
    state = json.loads((out / "checkpoint-6" / STATE_FILE).read_text())
    assert state["inexact_resumes"] == [{"step": 4, "reasons": [reason]}]
    assert state["data_stream"]["training data"]["count"] == 9  # the new data is the run's from here on
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "inexact_resume": [reason]} in records


def test_a_changed_flip_setting_or_a_replaced_image_refuses_the_resume(data, reference, tmp_path, capsys):
    out, folder = _copy_run_and_data(reference, data, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text("random_flip: false\n")  # a changed --config: the same files, another stream
    assert _main(_argv(folder, out, "--config", str(config), "--resume", "latest", "--max-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "random_flip changed: True -> False" in err and "--allow-inexact-resume" in err, err
    image = folder / "blue" / "001.png"  # replaced by another image: same name and count, another size
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(image)
    assert _main(_argv(folder, out, "--resume", "latest", "--max-steps", "6")) == 2
    assert "the same number of files (8), but files were renamed, replaced" in capsys.readouterr().err
    shutil.copy(data / "blue" / "001.png", image)  # the data as it was, in another folder: exact again
    assert _main(_argv(folder, out, "--resume", "latest", "--max-steps", "6")) == 0, capsys.readouterr().err
    state = json.loads((out / "checkpoint-6" / STATE_FILE).read_text())
    assert state["inexact_resumes"] == []


def test_a_checkpoint_without_a_data_record_resumes_with_a_log_line(data, reference, tmp_path, caplog):
    out, _ = _copy_run_and_data(reference, data, tmp_path)
    state_file = out / "checkpoint-4" / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["data_stream"], state["lineage"]  # as an earlier version wrote it
    state_file.write_text(json.dumps(state))
    caplog.set_level(logging.INFO, logger="sdt_diffusion.training")
    assert _main(_argv(data, out, "--resume", "latest", "--max-steps", "6")) == 0
    assert "holds no record of its data stream" in caplog.text and "INEXACT" not in caplog.text


# ------------------------------------------------------------------ item 11: rolling back and then resuming
def _lineage(out: Path, step: int) -> dict:
    return json.loads((out / f"checkpoint-{step}" / STATE_FILE).read_text())["lineage"]


def test_a_rollback_moves_the_newer_checkpoints_aside_and_latest_follows_the_new_trajectory(data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdt_diffusion.training")
    out = tmp_path / "run"
    assert _main(_argv(data, out, "--max-steps", "10")) == 0
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6, 8, 10]
    first = {s: (out / f"checkpoint-{s}" / "model.safetensors").read_bytes() for s in (8, 10)}
    old = _lineage(out, 10)
    assert _lineage(out, 2)["parent"] is None and old["parent"] == {"step": 8, "trajectory": old["trajectory"]}
    # the old trajectory's sample grids and FID results (what --sample-every and --fid-every write)
    for name in ("samples/step-0000004.png", "samples/step-0000008.png", "fid/step-0000006/results.json",
                 "fid/step-0000010/results.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)

    # back to step 6 with a lower learning rate, up to step 8
    assert _main(_argv(data, out, "--resume", str(out / "checkpoint-6"), "--learning-rate", "1e-5",
                       "--max-steps", "8")) == 0
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6, 8]
    (aside,) = (out / "abandoned").iterdir()
    assert aside.name.endswith("-from-6")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-10", "checkpoint-8", "fid", "metrics.jsonl",
                                                       "samples"]
    for s, weights in first.items():  # nothing finished is lost
        assert (aside / f"checkpoint-{s}" / "model.safetensors").read_bytes() == weights
    # the outputs newer than step 6 went with them; older ones stay
    assert (aside / "samples" / "step-0000008.png").read_text() == "samples/step-0000008.png"
    assert (aside / "fid" / "step-0000010" / "results.json").read_text() == "fid/step-0000010/results.json"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000004.png"]
    assert sorted(p.name for p in (out / "fid").iterdir()) == ["step-0000006"]
    assert f"moved to {aside}" in caplog.text and "checkpoint-8, checkpoint-10" in caplog.text
    assert "2 newer step outputs (fid, samples)" in caplog.text
    new = _lineage(out, 8)
    assert new["parent"] == {"step": 6, "trajectory": old["trajectory"]} and new["trajectory"] != old["trajectory"]

    # a requeue with --resume latest continues the new trajectory from its step 8, not the abandoned step 10
    caplog.clear()
    assert _main(_argv(data, out, "--resume", "latest", "--learning-rate", "1e-5", "--max-steps", "10")) == 0
    assert f"resumed from {out / 'checkpoint-8'} at step 8" in caplog.text and "abandons" not in caplog.text
    assert _lineage(out, 10) == {"trajectory": new["trajectory"], "parent": {"step": 8, "trajectory": new["trajectory"]}}
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert (out / "checkpoint-10" / "model.safetensors").read_bytes() != first[10]


def test_a_refused_start_removes_only_a_folder_it_created_and_left_empty(tmp_path):
    from sdt_diffusion.training.engine import no_trace_if_refused
    from sdt_diffusion.utils.run_lock import LOCK_FILE

    def refuse(out: Path, created_here: bool, *files: str) -> None:
        with pytest.raises(ConfigError), no_trace_if_refused(out, created_here):
            out.mkdir(exist_ok=True)
            for name in (LOCK_FILE, *files):
                (out / name).write_text("")
            raise ConfigError("refused")

    refuse(tmp_path / "new", True)
    assert not (tmp_path / "new").exists()
    refuse(tmp_path / "given", False)  # the user's folder, empty or not, stays
    assert (tmp_path / "given").is_dir()
    refuse(tmp_path / "written", True, "train_config.yaml")  # something was written: nothing is deleted
    assert sorted(p.name for p in (tmp_path / "written").iterdir()) == sorted([LOCK_FILE, "train_config.yaml"])
    with no_trace_if_refused(tmp_path / "ok", True):  # no exception: untouched
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()


def test_pruning_after_a_rollback_keeps_the_new_trajectorys_newest_checkpoint(data, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)  # checkpoint-2 and checkpoint-4
    assert _main(_argv(data, out, "--resume", str(out / "checkpoint-2"), "--max-steps", "3",
                       "--keep-checkpoints", "1")) == 0
    assert [s for s, _ in list_checkpoints(out)] == [3]
    assert [p.name for p in next((out / "abandoned").iterdir()).iterdir() if p.is_dir()] == ["checkpoint-4"]
    assert _main(_argv(data, out, "--resume", "latest", "--max-steps", "3")) == 0  # finished at 3: nothing to do
    assert _main(_argv(data, out, "--overwrite", "--max-steps", "1")) == 0  # replaces the whole earlier run
    assert [s for s, _ in list_checkpoints(out)] == [1] and not (out / "abandoned").exists()

# ------------------------------------------------- item 16: unreadable images are found before training starts
def _broken_copy(data: Path, target: Path) -> Path:
    """``data`` plus a zero-byte .png and a text file named .jpg (what an interrupted copy or a stray file leaves)."""
    shutil.copytree(data, target)
    (target / "blue" / "zero.png").write_bytes(b"")
    (target / "red" / "notes.jpg").write_text("not an image")
    return target


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _tiny_vae(folder: Path) -> Path:
    from conftest import make_tiny_vae

    make_tiny_vae().save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("command", ["sdt-train", "sdt-extract-latents"])
def test_unreadable_training_images_are_refused_at_start_up_naming_them(command, data, tmp_path, capsys):
    """Both the diffusion trainer and latent extraction decode every image first (``--verify-images auto``, the
    classification trainer's check, one function in the data layer) and refuse the data naming each bad file."""
    broken = _broken_copy(data, tmp_path / "data")
    out = tmp_path / "out"
    if command == "sdt-train":
        code = _main(_argv(broken, out))
    else:
        code = call_and_reset(extract.main, ["--data-dir", str(broken), "--vae", str(_tiny_vae(tmp_path / "vae")),
                                             "--resolution", "8", "--num-workers", "0", "--cpu", "--output-dir",
                                             str(out)])
    assert code == 2
    err = _one_line(capsys)
    assert "2 unreadable image(s)" in err and "zero.png" in err and "notes.jpg" in err and "--verify-images" in err
    assert not list(out.glob("checkpoint-*")) and not (out / "train_config.yaml").exists()  # nothing trained
    assert not list(out.glob("shard-*"))  # nothing encoded


def test_an_image_that_breaks_during_training_stops_it_with_one_line_and_status_1(data, tmp_path, capsys):
    """With the check off (``none``, or ``auto`` on more than 20,000 images) the data-loader worker that meets the
    file stops the run: status 1 (found during training, as in the classification trainer), the file named in one
    line instead of the worker's traceback."""
    broken = _broken_copy(data, tmp_path / "data")
    assert _main(_argv(broken, tmp_path / "out", "--verify-images", "none", "--num-workers", "1")) == 1
    err = _one_line(capsys)
    assert "cannot read image" in err and ("zero.png" in err or "notes.jpg" in err), err


# ------------------------------------------------ item 16: sizes are bounded before anything is allocated
DIFFUSION_SIZES = {
    "resolution": (["--resolution", str(10**8)], "--resolution must lie in [1, 4096], got 100000000"),
    "global batch": (["--global-batch-size", str(10**12), "--per-device-batch", "2"],  # a step that never ends
                     "--global-batch-size must lie in [1, 1048576]"),
    "workers": (["--num-workers", str(10**6)], "--num-workers must lie in [0, 256], got 1000000"),  # a fork bomb
}


@pytest.mark.parametrize("case", sorted(DIFFUSION_SIZES))
def test_absurd_diffusion_sizes_are_refused_with_the_flag_and_its_bound(case, data, tmp_path):
    extra, expected = DIFFUSION_SIZES[case]
    with pytest.raises(ConfigError) as info:
        settings_from_args(parse_args(_argv(data, tmp_path / "out", *extra)))
    assert expected in str(info.value)


CLASSIFIER_TINY = json.dumps({"embed_dims": [16, 32, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 2],
                              "mlp_ratios": [2, 2, 2, 2], "head_hidden_size": 32, "gate_rank": 2})


def _classifier_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model-kwargs", CLASSIFIER_TINY, "--data-dir", str(data), "--resolution", "32", "--global-batch-size",
            "4", "--lr-base-batch", "4", "--repeated-aug", "1", "--num-workers", "0", "--report-to", "none",
            "--no-progress-bar", "--max-steps", "2", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("extra, expected", [
    (["--resolution", str(10**8)], "--resolution must lie in [1, 4096], got 100000000"),  # MemoryError at the resize
    (["--repeated-aug", str(10**9)], "--repeated-aug must lie in [1, 16]"),  # 60 GB of sampler keys per epoch
    (["--recount", str(10**9)], "--recount must lie in [1, 100]"),  # 10^9 erasing boxes per image: a hang
    (["--eval-batch-size", str(10**12)], "--eval-batch-size must lie in [1, 65536]"),  # the whole held-out set
    (["--num-workers", str(10**6)], "--num-workers must lie in [0, 256]"),  # a million worker processes
], ids=["resolution", "repeated-aug", "recount", "eval-batch-size", "num-workers"])
def test_absurd_classifier_sizes_are_refused_with_the_flag_and_its_bound(extra, expected, data, tmp_path):
    with pytest.raises(ConfigError) as info:
        classifier_config.settings_from_args(classifier_config.parse_args(_classifier_argv(data, tmp_path / "o",
                                                                                           *extra)))
    assert expected in str(info.value)


@pytest.mark.parametrize("extra, expected", [
    (["--resolution", str(10**8)], "--resolution must lie in [1, 4096], got 100000000"),
    (["--batch-size", str(10**12)], "--batch-size must lie in [1, 65536]"),  # the whole dataset in one batch
    (["--num-workers", str(10**6)], "--num-workers must lie in [0, 256]"),
], ids=["resolution", "batch-size", "num-workers"])
def test_absurd_extraction_sizes_are_refused_with_the_flag_and_its_bound(extra, expected, data, tmp_path):
    argv = ["--data-dir", str(data), "--vae", str(tmp_path / "no-vae-needed"), "--output-dir", str(tmp_path / "c"),
            "--resolution", "8", *extra]
    with pytest.raises(ConfigError) as info:
        extract._check_args(extract.build_extract_parser().parse_args(argv))
    assert expected in str(info.value)


def test_a_refused_size_reaches_the_user_as_one_line_with_status_2(data, tmp_path, capsys):
    assert _main(_argv(data, tmp_path / "out", "--resolution", str(10**8))) == 2
    assert "--resolution must lie in [1, 4096]" in _one_line(capsys)
    assert call_and_reset(classifier_trainer.main, _classifier_argv(data, tmp_path / "o", "--resolution",
                                                                    str(10**8))) == 2
    assert "--resolution must lie in [1, 4096]" in _one_line(capsys)


# ---------------------------------------------------------------- new hostile probes of the training commands
def test_sample_steps_beyond_the_training_timesteps_are_refused_before_training(data, tmp_path):
    """Probe: ``--sample-steps 2000`` trained to the end, then the tail's sample grid raised diffusers' ValueError
    (a traceback, status 1, no export; every resume failed the same way)."""
    with pytest.raises(ConfigError, match=r"--sample-steps must lie in \[1, 1000\].*got 2000"):
        settings_from_args(parse_args(_argv(data, tmp_path / "out", "--sample-steps", "2000", "--sample-every", "2")))
    settings_from_args(parse_args(_argv(data, tmp_path / "out", "--sample-steps", "1000")))  # the bound itself is fine


@pytest.mark.parametrize("model, kwargs", [
    ("SDT-P-S/2", {**json.loads(TINY), "patch_size": 0}),
    ("DiT-S/2", {"num_layers": 1, "patch_size": 0}),
    ("DiT-S/2", {"num_layers": 1, "attention_head_dim": "8"}),
], ids=["sdt-p-patch-0", "dit-patch-0", "dit-string-width"])
def test_a_model_config_the_model_cannot_take_is_refused_naming_the_field(model, kwargs, data, tmp_path, capsys):
    """Probe: ``--model-kwargs '{"patch_size": 0}'`` raised ZeroDivisionError (a traceback) while planning; DiT's
    constructor checks nothing, so a string width failed later still."""
    argv = _argv(data, tmp_path / "out", "--model", model, "--model-kwargs", json.dumps(kwargs))
    assert _main(argv) == 2
    err = _one_line(capsys)
    field = "attention_head_dim" if "attention_head_dim" in kwargs and kwargs["attention_head_dim"] == "8" \
        else "patch_size"
    assert f"bad model configuration (--model {model}" in err and field in err, err


@pytest.mark.parametrize("where", ["data", "class folder", "symlink"])
def test_an_output_folder_inside_the_training_data_is_refused(where, data, tmp_path, capsys):
    """Probe: ``--output-dir <data>/red/run`` trained (exit 0) and left its sample grid under the class folder: the
    next run (``--overwrite``) trained on it as an image of class ``red``; ``--output-dir <data>/run`` was refused
    with "class folder 'run' holds no images" after creating that folder in the user's data."""
    own = tmp_path / "data"
    shutil.copytree(data, own)
    before = sorted(p.relative_to(own) for p in own.rglob("*"))
    if where == "symlink":
        (tmp_path / "link").symlink_to(own / "red")
        out = tmp_path / "link" / "run"
    else:
        out = own / "run" if where == "data" else own / "red" / "run"
    assert _main(_argv(own, out, "--sample-every", "2")) == 2
    assert "lies inside --data-dir" in _one_line(capsys)
    assert sorted(p.relative_to(own) for p in own.rglob("*")) == before  # nothing written into the data
    assert call_and_reset(classifier_trainer.main, _classifier_argv(own, out)) == 2
    assert "lies inside --data-dir" in _one_line(capsys)
    with pytest.raises(ConfigError, match="lies inside --data-dir"):
        extract._check_args(extract.build_extract_parser().parse_args(
            ["--data-dir", str(own), "--vae", "unused", "--output-dir", str(out)]))
    assert sorted(p.relative_to(own) for p in own.rglob("*")) == before
    settings_from_args(parse_args(_argv(own, own / ".runs" / "a")))  # a hidden folder is no class: accepted


@pytest.mark.parametrize("how", ["same", "symlink", "class folder"])
def test_held_out_data_that_is_training_data_is_refused(how, data, tmp_path):
    """Probe: ``--eval-data-dir`` equal to ``--data-dir`` trained with exit 0 and wrote a "held-out" loss measured
    on the training images (the classification trainer likewise chose its best weights by training accuracy)."""
    if how == "symlink":
        (tmp_path / "alias").symlink_to(data)
        held = tmp_path / "alias"
    else:
        held = data if how == "same" else data / "red"
    with pytest.raises(ConfigError, match="--eval-data-dir .* holds training images"):
        settings_from_args(parse_args(_argv(data, tmp_path / "out", "--eval-data-dir", str(held))))
    with pytest.raises(ConfigError, match="--eval-data-dir .* holds training images"):
        classifier_config.settings_from_args(classifier_config.parse_args(
            _classifier_argv(data, tmp_path / "o", "--eval-data-dir", str(held))))
