"""Crash, stop and tamper tests of training at CI size: kill -9 at a random step and during a checkpoint write, the
end-of-run window, tampered and damaged checkpoint files, inexact resumes (CPU, offline, pixel space, 1 layer)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE, call_and_reset
from PIL import Image

from sdt_diffusion.training import engine, export, trainer
from sdt_diffusion.training.checkpointing import DONE_FILE, STATE_FILE, list_checkpoints
from sdt_diffusion.training.diffusion_config import parse_args
from sdt_diffusion.utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY = json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "gate_rank": 4,
                   "lpe_kernel_size": 3})
STATE_FILES = ("model.safetensors", "optimizer.safetensors", "ema.safetensors", "rng_state_rank00000.safetensors")


pytestmark = pytest.mark.usefixtures("offline_env")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two classes of noisy 20x24 images (8 per class for training, 2 held out)."""
    root = tmp_path_factory.mktemp("reliability_data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("heldout", 2)):
        for c, name in enumerate(("red", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                base = np.zeros((20, 24, 3))
                base[..., 2 * c] = 200
                img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i:03d}.png")
    return {"train": root / "train", "heldout": root / "heldout"}


def _argv(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """6 steps of 4 images (4 steps per epoch); checkpoints every 2 steps, held-out loss every 2, sample grids and
    exports every 3, so every kind of work falls inside the windows the tests stop in."""
    return ["--model", "SDT-P-S/2", "--model-kwargs", TINY, "--data-dir", str(data["train"]), "--vae", "none",
            "--resolution", "8", "--global-batch-size", "4", "--num-workers", "0", "--log-every", "1",
            "--report-to", "none", "--no-progress-bar", "--max-steps", "6", "--checkpoint-every", "2",
            "--keep-checkpoints", "0", "--eval-data-dir", str(data["heldout"]), "--eval-every", "2",
            "--sample-every", "3", "--sample-steps", "2", "--export-every", "3", "--output-dir", str(out), *extra]




def _train(argv: list[str], **kwargs) -> trainer.TrainResult:
    return call_and_reset(trainer.train, parse_args(argv), **kwargs)


def _main(argv: list[str]) -> int:
    return call_and_reset(trainer.main, argv)


def _curve(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in lines]


def _finished_file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            # a kill -9 inside an atomic write can leave its hidden ".<name>.<pid>.tmp", which nothing reads
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))}


def _assert_same_run(out: Path, reference: Path) -> None:
    """The same metrics, final state files, sample grids and exported pipeline as the uninterrupted run."""
    assert _curve(out) == _curve(reference)
    for name in STATE_FILES:
        assert (out / "checkpoint-6" / name).read_bytes() == (reference / "checkpoint-6" / name).read_bytes(), name
    assert _finished_file_hashes(out / "pipeline") == _finished_file_hashes(reference / "pipeline")
    assert _finished_file_hashes(out / "samples") == _finished_file_hashes(reference / "samples")
    assert json.loads((out / DONE_FILE).read_text())["step"] == 6


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _train(_argv(data, out))
    assert result.step == 6 and not result.stopped_by_signal and (out / DONE_FILE).is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    return out


def _child(argv: list[str], patch: str) -> subprocess.Popen:
    """``training/train.py`` in a child process after ``patch`` (test code run in the child before training)."""
    code = ("import sys\nimport torch\nimport sdt_diffusion.training.trainer as trainer\n"
            f"torch.set_num_threads({torch.get_num_threads()})\n"  # as here: the same float reduction order
            + patch + f"\nsys.argv = ['train.py', *{argv!r}]\ntrainer.cli()\n")
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


# ------------------------------------------------------------------------------------------------- kill -9
def _last_logged_step(metrics: Path) -> int:
    steps = [0]
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                steps.append(json.loads(line).get("step", 0))
            except json.JSONDecodeError:  # the line being written
                pass
    return max(steps)


def test_kill_9_at_a_random_step_then_resume_latest_equals_the_uninterrupted_run(data, reference, tmp_path):
    out = tmp_path / "run"
    kill_after = random.Random(time.time_ns()).randint(3, 5)  # a checkpoint exists once step 3 is logged
    print(f"kill -9 once step {kill_after} is logged")  # shown if the test fails
    slow_steps = ("import time\nimport sdt_diffusion.training.engine as engine\nreal = engine.train_step\n"
                  "def slow(*a, **k):\n    time.sleep(0.15)\n    return real(*a, **k)\nengine.train_step = slow")
    child = _child(_argv(data, out), slow_steps)
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if _last_logged_step(out / "metrics.jsonl") >= kill_after:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the child was not killed (kill after step {kill_after}): {err[-3000:]}"
    assert not (out / DONE_FILE).exists()
    assert _train(_argv(data, out, "--resume", "latest")).step == 6
    _assert_same_run(out, reference)


# the child kills itself with SIGKILL inside the save of a checkpoint: half-way through a state file of
# checkpoint-4, or with checkpoint-6 (the final one) complete in its .tmp folder just before the rename
KILL_IN_SAVE = {
    "mid-file": ("import os, signal\nimport sdt_diffusion.training.checkpointing as c\nreal = c.save_optimizer_file\n"
                 "calls = []\ndef half(optimizer, path):\n    calls.append(path)\n    real(optimizer, path)\n"
                 "    if len(calls) == 2:\n        data = open(path, 'rb').read()\n"
                 "        open(path, 'wb').write(data[: len(data) // 2])\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                 "c.save_optimizer_file = half"),
    "before-rename": ("import os, signal\nimport sdt_diffusion.training.checkpointing as c\nreal = c.replace_dir\n"
                      "def die(tmp, target):\n    if str(target).endswith('checkpoint-6'):\n"
                      "        os.kill(os.getpid(), signal.SIGKILL)\n    return real(tmp, target)\n"
                      "c.replace_dir = die"),
}


@pytest.mark.parametrize("moment", sorted(KILL_IN_SAVE))
def test_kill_9_during_a_checkpoint_write_then_resume_latest_equals_the_uninterrupted_run(moment, data, reference,
                                                                                          tmp_path):
    out = tmp_path / "run"
    child = _child(_argv(data, out), KILL_IN_SAVE[moment])
    _, err = child.communicate(timeout=180)
    assert child.returncode == -signal.SIGKILL, err[-3000:]
    torn = {"mid-file": "checkpoint-4.tmp", "before-rename": "checkpoint-6.tmp"}[moment]
    assert (out / torn).is_dir()  # the torn save is left in its .tmp folder, never resumed from
    assert list_checkpoints(out)[-1][0] == {"mid-file": 2, "before-rename": 4}[moment]
    assert _train(_argv(data, out, "--resume", "latest")).step == 6
    _assert_same_run(out, reference)
    assert not list(out.glob("checkpoint-*.tmp"))


# --------------------------------------------------------------------------------------- end of the run
def test_the_end_of_run_window_finishes_on_resume(data, reference, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sdt_diffusion.training")
    # SIGTERM during the last step: checkpoint-6 is saved, the tail (final held-out loss, grid, export) is not
    out = tmp_path / "sigterm"

    def sigterm_in_step_6(step, loss):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    result = _train(_argv(data, out), loss_hook=sigterm_in_step_6)
    assert result.stopped_by_signal and result.step == 6 and (out / "checkpoint-6").is_dir()
    assert not (out / DONE_FILE).exists() and not (out / "samples" / "step-0000006.png").exists()
    assert _finished_file_hashes(out / "pipeline") != _finished_file_hashes(reference / "pipeline")  # the stale export of step 3
    result = _train(_argv(data, out, "--resume", "latest"))  # at --max-steps: runs only the missing tail
    assert result.step == 6 and not result.stopped_by_signal and result.pipeline_dir == out / "pipeline"
    _assert_same_run(out, reference)

    # a crash (kill -9) between the final checkpoint and the final export
    out = tmp_path / "crash"

    class Killed(BaseException):
        pass

    real_export = trainer.export_pipeline

    def crash_at_the_final_export(transformer, vae, id2label, target, *card):
        if (Path(target).parent / "checkpoint-6").is_dir():
            raise Killed
        return real_export(transformer, vae, id2label, target, *card)

    with monkeypatch.context() as m:
        m.setattr(trainer, "export_pipeline", crash_at_the_final_export)
        with pytest.raises(Killed):
            _train(_argv(data, out))
    assert (out / "checkpoint-6").is_dir() and not (out / DONE_FILE).exists()
    # --resume auto (job requeueing) finishes it too; a SIGTERM once the done record is written changes nothing
    real_done = engine.write_done

    def done_then_sigterm(*args, **kwargs):
        real_done(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(engine, "write_done", done_then_sigterm)
        assert _main(_argv(data, out, "--resume", "auto")) == 0
    _assert_same_run(out, reference)

    # a finished run: --resume latest / auto do nothing and succeed, however often
    before = _finished_file_hashes(out)
    caplog.clear()
    for how in ("latest", "auto", "latest"):
        assert _main(_argv(data, out, "--resume", how)) == 0
    assert "the run finished at step 6" in caplog.text and "nothing to do" in caplog.text
    assert _finished_file_hashes(out) == before


# ------------------------------------------------------------------------------------ tampered checkpoints
class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _tamper(checkpoint: Path, name: str, marker: Path) -> None:
    """Replace ``name`` with a pickle that creates ``marker`` when unpickled, and (like a careful attacker) record
    the new file's size and sha256 in the manifest, so only the file format stands in the way."""
    payload = pickle.dumps({"state": _Payload(marker)}, protocol=2)
    (checkpoint / name).write_bytes(payload)
    if name != STATE_FILE:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        state["files"][name] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        (checkpoint / STATE_FILE).write_text(json.dumps(state))


def _copy_run(reference: Path, target: Path, upto: int = 4) -> Path:
    """The reference run as it was at step ``upto``: its checkpoints, sample grids and metrics, to resume."""
    (target / "samples").mkdir(parents=True)
    for step, path in list_checkpoints(reference):
        if step <= upto:
            shutil.copytree(path, target / path.name)
    for grid in (reference / "samples").iterdir():
        if int(grid.stem.split("-")[1]) <= upto:
            shutil.copy(grid, target / "samples" / grid.name)
    shutil.copy(reference / "metrics.jsonl", target / "metrics.jsonl")  # lines after the resumed step are dropped
    return target


@pytest.mark.parametrize("name", [STATE_FILE, *STATE_FILES])
def test_a_tampered_checkpoint_file_is_refused_without_running_code(name, data, reference, tmp_path, capsys):
    out = _copy_run(reference, tmp_path / "run")
    marker = tmp_path / "pwned"
    _tamper(out / "checkpoint-4", name, marker)
    assert _main(_argv(data, out, "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert str(out / "checkpoint-4" / name) in err, err
    advice = "--allow-inexact-resume" if name.startswith("rng_state") else f"--resume {out / 'checkpoint-2'}"
    assert advice in err, err
    if name.startswith("rng_state"):  # accepted as inexact when asked: the file is still never unpickled
        assert _main(_argv(data, out, "--resume", "latest", "--allow-inexact-resume")) == 0
        assert not marker.exists()
    if name in (STATE_FILE, "ema.safetensors"):  # the checkpoint export reads these two
        assert export.main([str(out / "checkpoint-4"), "--output-dir", str(tmp_path / "pipe")]) == 2
        assert not marker.exists() and str(out / "checkpoint-4" / name) in capsys.readouterr().err


def test_pickled_state_files_are_never_read(data, reference, tmp_path, capsys):
    # accelerate's pickle files dropped into a checkpoint of this format are ignored
    out = _copy_run(reference, tmp_path / "run")
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (out / "checkpoint-4" / name).write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    assert _main(_argv(data, out, "--resume", "latest")) == 0
    assert not marker.exists()
    _assert_same_run(out, reference)

    # a checkpoint of the earlier (pickled) format: resume refused, the EMA export reads it without running code
    legacy = tmp_path / "legacy"
    (legacy / "checkpoint-2").mkdir(parents=True)
    state = json.loads((reference / "checkpoint-2" / STATE_FILE).read_text())
    for key in ("format", "format_version", "files"):
        del state[key]
    (legacy / "checkpoint-2" / STATE_FILE).write_text(json.dumps(state))
    shutil.copy(reference / "checkpoint-2" / "model.safetensors", legacy / "checkpoint-2")
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (legacy / "checkpoint-2" / name).write_bytes(pickle.dumps({"shadow": [_Payload(marker)]}, protocol=2))
    assert _main(_argv(data, legacy, "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert "earlier version" in err and "custom_checkpoint_0.pkl" in err and "sdt-export" in err, err
    assert export.main([str(legacy / "checkpoint-2"), "--output", str(tmp_path / "pipe")]) == 2  # old spelling
    assert "custom_checkpoint_0.pkl" in capsys.readouterr().err
    assert not marker.exists()


# --------------------------------------------------------------------------------- damaged and inexact
def test_a_damaged_file_is_named_with_the_previous_checkpoint(data, reference, tmp_path, capsys):
    out = _copy_run(reference, tmp_path / "run")
    model = out / "checkpoint-4" / "model.safetensors"
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])  # truncated: found before anything is built
    assert _main(_argv(data, out, "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert f"{model}: " in err and "truncated" in err and f"--resume {out / 'checkpoint-2'}" in err, err
    flipped = bytearray(good)
    flipped[-5] ^= 0x10  # one bit of a weight: the sha256 in the manifest catches it
    model.write_bytes(bytes(flipped))
    assert _main(_argv(data, out, "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert f"{model}: " in err and "sha256" in err and "checkpoint-2" in err, err
    (out / "checkpoint-4" / STATE_FILE).write_text('{"step": 4, "files": {')  # cut short
    with pytest.raises(ConfigError, match=f"{STATE_FILE}: not a JSON file.*checkpoint-2"):
        _train(_argv(data, out, "--resume", str(out / "checkpoint-4")))


def test_an_inexact_resume_is_refused_unless_asked_for_and_then_recorded(data, reference, tmp_path, capsys, caplog):
    out = _copy_run(reference, tmp_path / "run")
    rng = out / "checkpoint-4" / "rng_state_rank00000.safetensors"
    rng.unlink()
    assert _main(_argv(data, out, "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert f"{rng} is missing" in err and "--allow-inexact-resume" in err, err
    assert _main(_argv(data, out, "--resume", "latest", "--seed", "1", "--allow-inexact-resume")) == 0
    assert "INEXACT RESUME" in caplog.text and "--seed 1 differs" in caplog.text
    records = [r for r in _curve(out) if "inexact_resume" in r]
    assert len(records) == 1 and records[0]["step"] == 4 and len(records[0]["inexact_resume"]) == 2
    assert "rng_state_rank00000" in records[0]["inexact_resume"][1]
    final = json.loads((out / "checkpoint-6" / STATE_FILE).read_text())
    assert final["inexact_resumes"] == [{"step": 4, "reasons": records[0]["inexact_resume"]}]
    # another --seed alone is refused, naming the flag
    out = _copy_run(reference, tmp_path / "seed")
    assert _main(_argv(data, out, "--resume", "latest", "--seed", "3")) == 2
    assert "--seed 3 differs from the checkpoint's seed 0" in capsys.readouterr().err


def test_flags_of_a_resume_win_over_the_checkpoints_hyper_parameters(data, reference, tmp_path, caplog):
    out = _copy_run(reference, tmp_path / "run")
    _train(_argv(data, out, "--resume", "latest", "--learning-rate", "3e-4"))
    assert "--learning-rate 0.0003 differs from the checkpoint's 0.0001" in caplog.text
    assert [r["lr"] for r in _curve(out) if "lr" in r] == [1e-4] * 4 + [3e-4] * 2


def test_the_trainer_entry_point_ignores_signals_once_it_has_returned(monkeypatch):
    """After a finished (or stopped) run everything is on disk: a late SIGTERM must not fail the exit status."""
    monkeypatch.setattr(trainer, "main", functools.partial(int, 0))
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as e:
            trainer.cli()
        assert e.value.code == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_fsdp_checkpoints_keep_accelerates_shards_but_verify_them_first(tmp_path, monkeypatch):
    """The FSDP glue without GPUs: accelerate's sharded save/load replaced by stand-ins that write a
    torch.distributed.checkpoint-like folder; every file is in the manifest and checked before accelerate reads it."""
    from types import SimpleNamespace

    from sdt_diffusion.training import checkpointing
    from sdt_diffusion.training.checkpointing import CheckpointError, load_state, save_checkpoint, write_state
    from sdt_diffusion.training.ema import EMA

    loaded = []

    def fake_save_model(plugin, accelerator, model, folder):
        (Path(folder) / "pytorch_model_fsdp_0").mkdir()
        (Path(folder) / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"metadata")
        (Path(folder) / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard")

    def fake_save_optimizer(plugin, accelerator, optimizer, model, folder):
        (Path(folder) / "optimizer_0").mkdir()
        (Path(folder) / "optimizer_0" / "__0_0.distcp").write_bytes(b"optimizer shard")

    monkeypatch.setattr(checkpointing, "save_fsdp_model", fake_save_model)
    monkeypatch.setattr(checkpointing, "save_fsdp_optimizer", fake_save_optimizer)
    monkeypatch.setattr(checkpointing, "load_fsdp_model", lambda *a: loaded.append("model"))
    monkeypatch.setattr(checkpointing, "load_fsdp_optimizer", lambda *a: loaded.append("optimizer"))
    accelerator = SimpleNamespace(process_index=0, is_main_process=True, scaler=None, wait_for_everyone=lambda: None,
                                  state=SimpleNamespace(fsdp_plugin=None))
    model = torch.nn.Linear(3, 2)
    core = SimpleNamespace(accelerator=accelerator, model=model, optimizer=None, ema=EMA(model.parameters(), 0.5),
                           fsdp=True)
    path = save_checkpoint(accelerator, tmp_path, 7, {"step": 7}, functools.partial(write_state, core))
    state = json.loads((path / STATE_FILE).read_text())
    assert set(state["files"]) == {"pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
                                   "optimizer_0/__0_0.distcp", "ema_shard_rank00000.safetensors",
                                   "rng_state_rank00000.safetensors"}
    with torch.no_grad():
        model.weight.add_(1.0)
    core.ema.update(model.parameters())
    load_state(core, path, state)
    assert loaded == ["model", "optimizer"] and core.ema.num_updates == 0  # the EMA came back from its shard
    (path / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"METADATA")  # same size, other content
    loaded.clear()
    with pytest.raises(CheckpointError, match=r"\.metadata: its content differs"):
        load_state(core, path, state)
    assert loaded == []  # refused before torch.distributed.checkpoint unpickles it
