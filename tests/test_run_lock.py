"""One run per output: the output lock (issue 25 item 1), the refusal to start over an earlier run without
``--resume`` / ``--overwrite`` (item 10) and the output checks of both trainers before any work (check 14)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import PartialState
from conftest import read_metrics, reset_accelerate

from sdt_diffusion.data import EpochSampler
from sdt_diffusion.evaluation import sampling
from sdt_diffusion.training import classifier_trainer, engine, trainer
from sdt_diffusion.training import config as C
from sdt_diffusion.training.ema import EMA
from sdt_diffusion.training.step import TrainingCore
from sdt_diffusion.utils.errors import ConfigError
from sdt_diffusion.utils.run_lock import LOCK_FILE, OutputLockedError, RunLock

REPO = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")


# ------------------------------------------------------------------------------------------- helpers
class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])

    def __len__(self) -> int:
        return 16

    def __getitem__(self, key):
        return {"x": self.x[key[0]], "y": self.y[key[0]]}


class _Core(TrainingCore):
    def loss(self, batch):
        pred = self.model(batch["x"]).squeeze(-1)
        return ((pred - batch["y"]) ** 2).mean(), {}


class _Task(engine.Task):
    """A linear regression through the engine: the same planning, locking and files as both trainers."""

    name, prog, export_name = "toy", "toy.py", "export"

    def plan(self, settings, accelerator, **layout):
        sampler = EpochSampler(16, layout["world"], layout["rank"], settings.run.seed, random_flip=False)
        return engine.RunPlan(**layout, model_config={"in": 3}, sampler=sampler, num_samples=16,
                              total_steps=settings.run.max_steps, checkpoint_every=settings.checkpoints.checkpoint_every)

    def build(self, settings, plan, accelerator):
        torch.manual_seed(settings.run.seed)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.optim.learning_rate, weight_decay=0.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        return _Core(accelerator, model, optimizer, EMA(model.parameters(), settings.optim.ema_decay), plan.accum, None)

    def dataset(self, run):
        return _Data()

    def after_checkpoint(self, run, step, final):
        if final and run.is_main:
            run.export_dir.mkdir(exist_ok=True)
            (run.export_dir / "weights.json").write_text(json.dumps([s.tolist() for s in run.core.ema.shadow]))


def _settings(out: Path, max_steps: int = 4, **checkpoints) -> C.Settings:
    return C.Settings(run=C.RunSettings(output_dir=str(out), max_steps=max_steps, global_batch_size=4),
                      model=C.ModelSettings(model="toy"), data=C.DataSettings(resolution=None, num_workers=0),
                      optim=C.OptimSettings(learning_rate=0.05, weight_decay=0.0, ema_decay=0.5, max_grad_norm=None),
                      checkpoints=C.CheckpointSettings(checkpoint_every=2, **checkpoints),
                      logging=C.LogSettings(report_to="none", progress_bar=False, log_every=1))


def _train(settings: C.Settings) -> engine.TrainResult:
    try:
        return engine.train(_Task(), settings)
    finally:
        reset_accelerate()


def _command(settings: C.Settings) -> int:
    """The toy run as a command: its exit code (2 for a refused start), errors on stderr."""
    try:
        return engine.run_command(_Task, lambda: engine.train(_Task(), settings))
    finally:
        reset_accelerate()


def _hold_lock(path: Path) -> subprocess.Popen:
    """A child process holding the lock on ``path`` until it is killed."""
    code = ("import sys\nfrom sdt_diffusion.utils.run_lock import RunLock\n"
            f"RunLock({str(path)!r}).acquire()\nprint('locked', flush=True)\nsys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "locked"
    return child


def _kill(child: subprocess.Popen) -> None:
    child.kill()
    child.wait(timeout=30)


def _trainer_argv(command: str, tmp: Path, out: Path, *extra: str) -> list[str]:
    """Flags that parse for ``command``; the data folder is empty, so a run that got past its start-up
    checks would fail on the data (with another message)."""
    (tmp / "data").mkdir(exist_ok=True)
    model = ["--model", "SDT-P-S/2", "--vae", "none"] if command == "diffusion" else []
    return [*model, "--data-dir", str(tmp / "data"), "--report-to", "none", "--no-progress-bar", "--num-workers",
            "0", "--output-dir", str(out), *extra]


def _trainer_main(command: str):
    main = trainer.main if command == "diffusion" else classifier_trainer.main

    def call(argv: list[str]) -> int:
        try:
            return main(argv)
        finally:
            reset_accelerate()

    return call


# ------------------------------------------------------------------------------------- item 1: the lock
def test_a_second_run_on_a_locked_output_dir_is_refused_then_a_stale_lock_is_taken_over(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    child = _hold_lock(out / LOCK_FILE)
    try:
        assert _command(_settings(out)) == 2
        err = capsys.readouterr().err
        assert f"PID {child.pid} on host {HOST}" in err and "in use by another run" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not (out / "metrics.jsonl").exists() and not (out / "train_config.yaml").exists()
    finally:
        _kill(child)
    caplog.set_level("INFO")
    result = _train(_settings(out))  # the holder died without releasing: its record is stale
    assert result.step == 4 and result.export_dir == out / "export"
    assert f"taking over the stale lock of PID {child.pid} on host {HOST}" in caplog.text, caplog.text
    assert (out / LOCK_FILE).read_text() == ""  # released at the end: the next run takes it silently
    caplog.clear()
    assert _train(_settings(out, resume="latest")).step == 4
    assert "stale lock" not in caplog.text


def test_the_lock_is_held_for_the_life_of_a_run(tmp_path):
    out = tmp_path / "run"
    seen = []

    class Probe(_Task):
        def before_loop(self, run, step):
            with pytest.raises(OutputLockedError, match=f"PID {os.getpid()} on host {HOST}"):
                RunLock(out / LOCK_FILE, "probe").acquire()  # another open file description: refused
            seen.append(json.loads((out / LOCK_FILE).read_text()))

    try:
        engine.train(Probe(), _settings(out))
    finally:
        reset_accelerate()
    assert seen and seen[0]["pid"] == os.getpid() and seen[0]["host"] == HOST and "started" in seen[0]


@pytest.mark.parametrize("command", ["diffusion", "classifier"])
def test_both_trainers_refuse_a_locked_output_dir_with_exit_2(command, tmp_path, capsys):
    out = tmp_path / "run"
    child = _hold_lock(out / LOCK_FILE)
    try:
        assert _trainer_main(command)(_trainer_argv(command, tmp_path, out, "--max-steps", "1")) == 2
    finally:
        _kill(child)
    err = capsys.readouterr().err
    assert f"--output-dir {out} is in use by another run: PID {child.pid} on host {HOST}" in err, err


def test_fid_sampling_refuses_a_locked_output_with_exit_2(tmp_path, capsys):
    output = tmp_path / "samples.npz"
    child = _hold_lock(sampling.lock_path(output))
    try:
        try:
            code = sampling.main(["--pipeline", str(tmp_path / "no-pipeline"), "--output", str(output)])
        finally:
            PartialState._reset_state()
    finally:
        _kill(child)
    assert code == 2
    err = capsys.readouterr().err
    assert f"--output {output} is in use by another run: PID {child.pid} on host {HOST}" in err, err
    assert not sampling.shard_dir(output).exists()


# ------------------------------------------------------------------ item 10: a finished run is not replaced
def _prune(out: Path) -> dict[str, bytes]:
    """Delete the checkpoints (kept: export, metrics.jsonl, training_done.json); the files left, by name."""
    for path in out.glob("checkpoint-*"):
        for f in sorted(path.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        path.rmdir()
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


@pytest.mark.parametrize("resume", [None, "auto"])
def test_a_finished_run_without_checkpoints_is_not_replaced(resume, tmp_path, capsys):
    out = tmp_path / "run"
    _train(_settings(out))
    kept = _prune(out)
    assert {"metrics.jsonl", "training_done.json", "train_config.yaml", "export/weights.json"} <= set(kept)
    assert _command(_settings(out, resume=resume)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err, err
    assert ("already holds a run (training_done.json, metrics.jsonl, train_config.yaml)" if resume is None
            else "holds a finished run (training_done.json) with no checkpoint") in err, err
    assert _prune(out) == kept  # nothing touched


def test_a_started_run_without_checkpoints_needs_resume_auto_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "train_config.yaml").write_text("seed: 0\n")
    assert _command(_settings(out)) == 2
    assert "already holds a run (metrics.jsonl, train_config.yaml)" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert _train(_settings(out, resume="auto")).step == 4  # a requeue before the first checkpoint starts afresh


def test_overwrite_starts_afresh_and_deletes_the_earlier_runs_checkpoints(tmp_path):
    out = tmp_path / "run"
    _train(_settings(out, max_steps=6))
    (out / "export" / "stale.txt").write_text("of the earlier run")
    result = _train(_settings(out, max_steps=4, overwrite=True))
    assert not (out / "export" / "stale.txt").exists()
    assert result.step == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "training_done.json").read_text())["step"] == 4
    fresh = tmp_path / "fresh"
    _train(_settings(fresh, max_steps=4))
    assert (out / "export" / "weights.json").read_text() == (fresh / "export" / "weights.json").read_text()


@pytest.mark.parametrize("command", ["diffusion", "classifier"])
def test_both_trainers_refuse_an_earlier_run_and_take_overwrite(command, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "training_done.json").write_text(json.dumps({"step": 1}))
    main = _trainer_main(command)
    assert main(_trainer_argv(command, tmp_path, out)) == 2
    err = capsys.readouterr().err
    assert "already holds a run (training_done.json)" in err and "--overwrite" in err, err
    assert main(_trainer_argv(command, tmp_path, out, "--overwrite", "--resume", "latest")) == 2
    assert "--overwrite contradicts --resume latest" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--overwrite contradicts --resume auto"):
        C.check_settings(_settings(out, resume="auto", overwrite=True))
    assert main(_trainer_argv(command, tmp_path, out, "--overwrite")) == 2  # past the check: the empty data folder
    err = capsys.readouterr().err
    assert "already holds" not in err and str(tmp_path / "data") in err, err
    assert (out / "training_done.json").exists()  # a run that fails its planning deletes nothing


# ------------------------------------------------------------------- check 14: outputs checked before work
@pytest.mark.parametrize("command", ["diffusion", "classifier"])
@pytest.mark.parametrize("case", ["file in the way", "output dir is a file"])
def test_both_trainers_check_the_output_dir_before_any_work(command, case, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker / "run" if case == "file in the way" else blocker

    def never(*args, **kwargs):
        raise AssertionError("the task planned (read data) before the output folder was checked")

    task = trainer.DiffusionTask if command == "diffusion" else classifier_trainer.ClassifierTask
    monkeypatch.setattr(task, "plan", never)
    assert _trainer_main(command)(_trainer_argv(command, tmp_path, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"--output-dir {out}:" in err and f"{blocker} is a file, not a folder" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert blocker.read_text() == "not a folder"
