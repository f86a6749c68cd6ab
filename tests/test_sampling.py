"""sdt-fid-sample (eval/sample.py): ADM layout, independence of the number of processes, resume after a kill."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import PartialState
from conftest import make_tiny_transformer, make_tiny_vae

from sdt_diffusion import SDTPipeline
from sdt_diffusion.evaluation import sampling
from sdt_diffusion.evaluation.sampling import SamplingSettings, sample_generator, sample_labels, to_uint8

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipe") / "pipeline"
    SDTPipeline(transformer=make_tiny_transformer(), vae=make_tiny_vae(), scheduler=None).save_pretrained(folder)
    return folder


def launch(pipeline_dir: Path, output: Path, processes: int, extra_env: dict | None = None,
           extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    mode = "--cpu" if processes == 1 else "--multi_gpu"  # --multi_gpu without CUDA: CPU processes over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "eval" / "sample.py"), "--pipeline", str(pipeline_dir), "--num-samples", "10",
           "--per-device-batch", "3", "--steps", "2", "--guidance-scale", "2.0", "--seed", "7",
           "--output", str(output), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _in_process(settings: SamplingSettings, **kwargs):
    """``sampling.run`` in this process (one process), leaving no accelerate state behind."""
    try:
        return sampling.run(settings, **kwargs)
    finally:
        PartialState._reset_state()


def _main(argv: list[str]) -> int:
    try:
        return sampling.main(argv)
    finally:
        PartialState._reset_state()


def test_labels_random_and_balanced():
    random = sample_labels(1000, 10, "random", 0)
    assert random.min() >= 0 and random.max() < 10
    np.testing.assert_array_equal(random, sample_labels(1000, 10, "random", 0))
    balanced = sample_labels(50, 10, "balanced", 3)
    assert np.all(np.bincount(balanced, minlength=10) == 5)
    with pytest.raises(ValueError, match="divisible by 10"):
        sample_labels(55, 10, "balanced", 0)


def test_uint8_conversion_is_adm():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    expected = np.clip(127.5 * np.array([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]) + 128, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(x)[0, 0, :, 0], expected)


def test_one_and_two_processes_give_identical_npz_and_resume_after_kill(pipeline_dir, tmp_path):
    one = launch(pipeline_dir, tmp_path / "one.npz", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(pipeline_dir, tmp_path / "two.npz", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # only the main process assembles
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (10, 16, 16, 3)  # ADM's layout
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert len(np.unique(a["arr_0"].reshape(10, -1), axis=0)) == 10  # every index has its own noise
    sidecar = json.loads((tmp_path / "one.json").read_text())
    assert sidecar["seed"] == 7 and sidecar["guidance_scale"] == 2.0 and sidecar["steps"] == 2
    assert sidecar["labels"] == "random" and sidecar["scheduler"] is None  # the pipeline's own scheduler
    assert json.loads((tmp_path / "two.json").read_text())["num_processes"] == 2

    # a run that dies after its first chunk, then the same command again: every index exactly once
    settings = SamplingSettings(pipeline=str(pipeline_dir), output=str(tmp_path / "k.npz"), num_samples=10,
                                per_device_batch=3, guidance_scale=2.0, steps=2, seed=7)

    class Crash(Exception):
        pass

    def crash(chunk):
        raise Crash(f"simulated crash after chunk {chunk}")

    with pytest.raises(Crash):
        _in_process(settings, on_chunk=crash)
    assert not (tmp_path / "k.npz").exists()
    assert len(list((tmp_path / "k.npz.shards").glob("chunk-*.npz"))) == 1
    resumed = launch(pipeline_dir, tmp_path / "k.npz", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    k = np.load(tmp_path / "k.npz")
    np.testing.assert_array_equal(k["arr_0"], a["arr_0"])

    # other settings on the same shards are refused
    clash = launch(pipeline_dir, tmp_path / "k.npz", 1, extra=("--labels", "balanced"))
    assert clash.returncode != 0 and "other settings" in clash.stderr


def test_default_flags_sample_with_the_pipelines_own_scheduler(tmp_path):
    """The saved scheduler is used as it is (here DDPM with fixed variance and trailing spacing, for a model
    without a learned variance); --scheduler switches only when asked."""
    from diffusers import DDPMScheduler

    transformer = make_tiny_transformer(learn_sigma=False)
    scheduler = DDPMScheduler(beta_schedule="linear", variance_type="fixed_small", timestep_spacing="trailing")
    pipe = SDTPipeline(transformer=transformer, vae=make_tiny_vae(), scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    argv = ["--pipeline", str(tmp_path / "pipe"), "--num-samples", "3", "--per-device-batch", "2", "--steps", "3",
            "--seed", "5"]
    assert _main([*argv, "--output", str(tmp_path / "a.npz")]) == 0
    got = np.load(tmp_path / "a.npz")
    expected = pipe(class_labels=got["arr_1"].tolist(), guidance_scale=1.5, num_inference_steps=3,
                    generator=[sample_generator(5, i) for i in range(3)], output_type="pt").images
    np.testing.assert_array_equal(got["arr_0"], to_uint8(expected * 2 - 1))
    assert json.loads((tmp_path / "a.json").read_text())["scheduler_class"] == "DDPMScheduler"

    assert _main([*argv, "--scheduler", "ddim", "--output", str(tmp_path / "b.npz")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["scheduler_class"] == "DDIMScheduler"
    assert not np.array_equal(np.load(tmp_path / "b.npz")["arr_0"], got["arr_0"])


def test_only_pipeline_folders_that_make_images_are_sampled(tmp_path, capsys):
    out = str(tmp_path / "s.npz")
    # a training checkpoint: pointed at the export command
    checkpoint = tmp_path / "run" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text("{}")
    assert _main(["--pipeline", str(checkpoint), "--output", out]) == 2
    assert "sdt-export" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --checkpoint is gone: evaluation reads only pipeline folders
        _main(["--checkpoint", str(checkpoint), "--output", out])
    assert e.value.code == 2
    # a latent-space transformer without a VAE would write 4-channel 'images': refused before any sampling
    SDTPipeline(transformer=make_tiny_transformer(), vae=None, scheduler=None).save_pretrained(tmp_path / "latents")
    capsys.readouterr()
    assert _main(["--pipeline", str(tmp_path / "latents"), "--num-samples", "50000", "--output", out]) == 2
    assert "does not produce RGB images" in capsys.readouterr().err
    assert not (tmp_path / "s.npz.shards").exists()
    # a bad flag is a one-line usage error naming it
    with pytest.raises(SystemExit) as e:
        _main(["--pipeline", str(tmp_path / "latents"), "--num-samples", "0", "--output", out])
    assert e.value.code == 2 and "--num-samples must be positive" in capsys.readouterr().err


def test_evaluation_never_imports_training():
    code = ("import sys, sdt_diffusion.evaluation.sampling, sdt_diffusion.evaluation; "
            "print([m for m in sys.modules if m.startswith('sdt_diffusion.training')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------- crash and resume
def _settings(pipeline: Path, output: Path) -> SamplingSettings:
    return SamplingSettings(pipeline=str(pipeline), output=str(output), num_samples=7, per_device_batch=2,
                            guidance_scale=2.0, steps=2, seed=3)


def test_killed_sampling_resumes_to_the_same_bytes_and_never_mixes_pipelines(pipeline_dir, tmp_path, capsys):
    reference = _in_process(_settings(pipeline_dir, tmp_path / "ref.npz"))
    # kill -9 right after the second chunk is on disk (in a child process, as a crash would)
    out = tmp_path / "s.npz"
    s = _settings(pipeline_dir, out)
    code = (f"import os, signal, torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
            "from sdt_diffusion.evaluation import sampling\nreal = sampling._atomic_savez\ncalls = []\n"
            "def save_then_die(path, **arrays):\n    real(path, **arrays)\n    calls.append(path)\n"
            "    if len(calls) == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            "sampling._atomic_savez = save_then_die\n"
            f"sampling.main(['--pipeline', {s.pipeline!r}, '--output', {s.output!r}, '--num-samples', '7', "
            "'--per-device-batch', '2', '--guidance-scale', '2.0', '--steps', '2', '--seed', '3'])\n")
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1",
                           "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-3000:]
    assert len(list(sampling.shard_dir(out).glob("chunk-*.npz"))) == 2 and not out.exists()

    # the pipeline re-exported (other weights) between the crash and the rerun: refused, not mixed
    moved = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, moved)
    s_moved = _settings(moved, out)
    weights = next((moved / "transformer").glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(sampling.SettingsMismatchError, match="another pipeline"):
        _in_process(s_moved)

    # the same command again: the npz is byte-identical to the uninterrupted run's (a moved but unchanged copy
    # of the pipeline counts as the same pipeline)
    shutil.rmtree(moved)
    shutil.copytree(pipeline_dir, moved)
    assert _in_process(s_moved) == out
    assert out.read_bytes() == reference.read_bytes()

    # a damaged chunk is named and deleted at assembly; the same command then redoes it
    chunk = sampling.chunk_path(out, 1)
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 3] ^= 0x40  # inside the images: the indices still read, the zip checksum does not
    chunk.write_bytes(bytes(blob))
    out.unlink()
    with pytest.raises(sampling.DamagedChunkError, match=f"chunk 1 \\({chunk}\\) is damaged"):
        _in_process(s)
    assert not chunk.exists()
    assert _in_process(s) == out and out.read_bytes() == reference.read_bytes()

    # shards without their settings.json cannot be matched to anything: refused
    (sampling.shard_dir(out) / "settings.json").unlink()
    with pytest.raises(sampling.SettingsMismatchError, match="no settings.json"):
        _in_process(s)


def test_bad_sampling_flags_and_outputs_fail_before_sampling(pipeline_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    base = ["--pipeline", str(pipeline_dir), "--num-samples", "2", "--steps", "1"]
    for extra, message in ((["--seed", "-1", "--output", str(tmp_path / "a.npz")], "--seed must lie in"),
                           (["--guidance-scale", "nan", "--output", str(tmp_path / "a.npz")], "--guidance-scale must"),
                           (["--output", str(tmp_path / "file" / "a.npz")], "is a file, not a folder")):
        with pytest.raises(SystemExit) as e:
            _main([*base, *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("*.shards"))
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert _main([*base, "--pipeline", str(broken), "--output", str(tmp_path / "b.npz")]) == 2
    assert f"cannot load the pipeline in {broken}" in capsys.readouterr().err


def test_dtype_flag_speaks_the_shared_vocabulary(capsys):
    """--dtype takes float32 / float16 / bfloat16; the last release's fp32 / fp16 / bf16 still work, with one
    deprecation line, and are recorded under the new name (so shards keep matching)."""
    base = ["--pipeline", "p", "--output", "s.npz"]
    assert sampling.build_parser().parse_args(base).dtype == "float32"
    assert sampling.build_parser().parse_args([*base, "--dtype", "bfloat16"]).dtype == "bfloat16"
    assert "deprecated" not in capsys.readouterr().err
    args = sampling.build_parser().parse_args([*base, "--dtype", "fp16"])
    assert args.dtype == "float16"
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--dtype fp16 is deprecated" in line and "--dtype float16" in line
    assert SamplingSettings(**vars(args)).dtype == "float16"
    assert SamplingSettings(pipeline="p", output="s.npz", dtype="bf16").dtype == "bfloat16"
    with pytest.raises(sampling.SettingError, match="dtype must be one of"):
        SamplingSettings(pipeline="p", output="s.npz", dtype="float8").check()
    with pytest.raises(SystemExit):
        sampling.build_parser().parse_args([*base, "--dtype", "float8"])
    assert "float8" in capsys.readouterr().err


def test_shards_of_the_last_release_resume_under_the_new_dtype_name(pipeline_dir, tmp_path):
    """Shards whose settings.json names the dtype fp32 (the last release) match a run with --dtype float32."""
    out = tmp_path / "s.npz"
    settings = SamplingSettings(pipeline=str(pipeline_dir), output=str(out), num_samples=2, per_device_batch=2,
                                steps=1)
    assert _in_process(settings) == out
    first = out.read_bytes()
    settings_file = sampling.shard_dir(out) / "settings.json"
    recorded = json.loads(settings_file.read_text())
    assert recorded["dtype"] == "float32"
    settings_file.write_text(json.dumps({**recorded, "dtype": "fp32"}))
    out.unlink()
    assert _in_process(settings) == out and out.read_bytes() == first
    settings_file.write_text(json.dumps({**recorded, "dtype": "bf16"}))  # another dtype is still refused
    with pytest.raises(sampling.SettingsMismatchError, match="dtype"):
        _in_process(settings)


def test_sdt_sample_checks_its_output_before_sampling(pipeline_dir, tmp_path, monkeypatch, capsys):
    from sdt_diffusion.tools import cli

    def never(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before --output was checked")

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(cli.SDTPipeline, "from_pretrained", never)
    for out, message in ((tmp_path / "file" / "grid.png", "is a file, not a folder"),
                         (tmp_path / "grid.xyz", "not an image file name")):
        with pytest.raises(SystemExit) as e:
            cli.sample_main(["--pipeline", str(pipeline_dir), "--classes", "0", "--output", str(out)])
        assert e.value.code == 2 and message in capsys.readouterr().err
