"""Training: DiT's loss terms, data pipeline, config handling, accelerate launches, resume, failures (CPU, offline)."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE, call_and_reset, file_hashes, make_tiny_vae, read_metrics, reset_accelerate
from PIL import Image

from sdt_diffusion.data import (
    EpochSampler,
    ImageClassDataset,
    LatentCacheDataset,
    center_crop_arr,
    iterate_batches,
    load_image_source,
)
from sdt_diffusion.training import diffusion as D
from sdt_diffusion.training import export, plan, trainer
from sdt_diffusion.training.checkpointing import latest_checkpoint, list_checkpoints
from sdt_diffusion.training.diffusion_config import build_parser, parse_args, settings_from_args
from sdt_diffusion.training.flags import load_yaml_config
from sdt_diffusion.training.state_files import load_ema_file
from sdt_diffusion.training.step import NonFiniteLossError
from sdt_diffusion.training.trainer import encode_batch
from sdt_diffusion.utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY = json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "gate_rank": 4,
                   "lpe_kernel_size": 3})


pytestmark = pytest.mark.usefixtures("offline_env")


def _write_folder(root: Path, per_class: int, seed: int) -> None:
    """Two classes of 20x24 RGB images: a red-ish and a blue-ish noisy pattern."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("red thing", "blue thing")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((20, 24, 3))
            base[..., 2 * c] = 200
            base[:, : 12 * (1 + c) // 2] += 40
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("training_data")
    _write_folder(root / "train", 8, 0)
    _write_folder(root / "heldout", 2, 1)
    make_tiny_vae().save_pretrained(root / "vae")
    return {"train": root / "train", "heldout": root / "heldout", "vae": root / "vae", "root": root}


def _argv(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--model", "SDT-P-S/2", "--model-kwargs", TINY, "--data-dir", str(data["train"]), "--vae", str(data["vae"]),
            "--resolution", "16", "--global-batch-size", "4", "--num-workers", "0", "--log-every", "1",
            "--report-to", "none", "--no-progress-bar", "--output-dir", str(out), *extra]




def _train(argv: list[str], **kwargs) -> trainer.TrainResult:
    return call_and_reset(trainer.train, parse_args(argv), **kwargs)


def _main(argv: list[str]) -> int:
    return call_and_reset(trainer.main, argv)




def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], num_processes: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` on CPU: 1 process plainly, several through torchrun with gloo (``--multi_gpu``
    without CUDA; the scripts then ask accelerate for CPU processes)."""
    dist = ["--cpu"] if num_processes == 1 else ["--multi_gpu", "--main_process_port", str(_free_port())]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *dist, "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------- diffusion math
def test_noise_schedule_is_dits_and_matches_the_exported_scheduler():
    from sdt_diffusion.schedulers import default_scheduler

    config = default_scheduler().config
    assert (config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule) == (
        1000, 1e-4, 0.02, "linear")
    assert (config.variance_type, config.clip_sample, config.prediction_type) == ("learned_range", False, "epsilon")
    assert default_scheduler(learn_sigma=False).config.variance_type == "fixed_large"
    s = D.DiffusionSchedule.from_scheduler()
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    scheduler = default_scheduler(True)  # the exported scheduler holds the same schedule in float32
    np.testing.assert_allclose(scheduler.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), s.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-7)
    post = betas[1:] * (1 - np.cumprod(1 - betas)[:-1]) / (1 - np.cumprod(1 - betas)[1:])
    np.testing.assert_allclose(s.posterior_log_variance_clipped.numpy()[1:], np.log(post), rtol=1e-4)
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]  # iDDPM's clipping


def test_normal_kl_matches_numerical_integration():
    from scipy import integrate
    from scipy.stats import norm

    for m1, lv1, m2, lv2 in [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.5, 0.7, 0.1, -0.4), (-2.0, -3.0, -1.0, -2.0)]:
        s1, s2 = math.exp(0.5 * lv1), math.exp(0.5 * lv2)
        direct, _ = integrate.quad(lambda x, m1=m1, s1=s1, m2=m2, s2=s2: norm.pdf(x, m1, s1)
                                   * (norm.logpdf(x, m1, s1) - norm.logpdf(x, m2, s2)), -np.inf, np.inf)
        ours = float(D.normal_kl(torch.tensor(m1), torch.tensor(lv1), torch.tensor(m2), torch.tensor(lv2)))
        assert ours == pytest.approx(direct, abs=1e-6)


def test_discretized_gaussian_log_likelihood_matches_scipy():
    from scipy.stats import norm

    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0, -1.0, 1.0], dtype=torch.float64)
    means = torch.tensor([-0.9, -0.4, 0.1, 0.3, 0.8, 0.5, -0.5], dtype=torch.float64)
    log_scales = torch.tensor([-2.0, -1.0, -3.0, -4.0, -1.5, 0.0, -0.5], dtype=torch.float64)
    ours = D.discretized_gaussian_log_likelihood(x, means, log_scales, cdf=D.standard_normal_cdf).numpy()
    xs, ms, ss = x.numpy(), means.numpy(), np.exp(log_scales.numpy())
    expected = np.where(
        xs < -0.999, norm.logcdf(xs + 1 / 255, ms, ss),
        np.where(xs > 0.999, norm.logsf(xs - 1 / 255, ms, ss),
                 np.log(norm.cdf(xs + 1 / 255, ms, ss) - norm.cdf(xs - 1 / 255, ms, ss))))
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    # DiT's default tanh CDF stays within 2e-4 of the exact one
    grid = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    assert float((D.approx_standard_normal_cdf(grid) - torch.from_numpy(norm.cdf(grid.numpy()))).abs().max()) < 2e-4


def test_vlb_terms_match_a_direct_computation():
    from scipy.stats import norm

    torch.manual_seed(0)
    s = D.DiffusionSchedule.from_scheduler()
    x0 = torch.rand(4, 2, 3, 3) * 2 - 1
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # the open-ended edge bins
    t = torch.tensor([0, 1, 500, 999])
    noise, eps, v = torch.randn_like(x0), torch.randn_like(x0), torch.rand_like(x0) * 2 - 1
    x0, noise, eps, v = (a.double() for a in (x0, noise, eps, v))  # float64: no cancellation in the CDF differences
    x_t = s.q_sample(x0, t, noise)
    ours = D.vlb_terms(s, x0, x_t, t, eps, v, cdf=D.standard_normal_cdf).numpy()

    betas = np.linspace(1e-4, 0.02, 1000)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_var[0] = post_var[1]
    X0, XT, E, V = (a.double().numpy() for a in (x0, x_t, eps, v))
    for i, ti in enumerate(t.tolist()):
        c1 = betas[ti] * np.sqrt(ac_prev[ti]) / (1 - ac[ti])
        c2 = (1 - ac_prev[ti]) * np.sqrt(1 - betas[ti]) / (1 - ac[ti])
        mu_q = c1 * X0[i] + c2 * XT[i]
        x0_hat = (XT[i] - np.sqrt(1 - ac[ti]) * E[i]) / np.sqrt(ac[ti])
        mu_p = c1 * x0_hat + c2 * XT[i]
        f = (V[i] + 1) / 2
        var_p = np.exp(f * np.log(betas[ti]) + (1 - f) * np.log(post_var[ti]))
        if ti == 0:
            sd = np.sqrt(var_p)
            xs = X0[i]
            p = np.where(xs < -0.999, norm.cdf(xs + 1 / 255, mu_p, sd),
                         np.where(xs > 0.999, norm.sf(xs - 1 / 255, mu_p, sd),
                                  norm.cdf(xs + 1 / 255, mu_p, sd) - norm.cdf(xs - 1 / 255, mu_p, sd)))
            expected = -np.mean(np.log(np.maximum(p, 1e-12))) / np.log(2)
        else:  # KL(N(mu_q, var_q) || N(mu_p, var_p)) in the textbook form
            var_q = post_var[ti]
            kl = np.log(np.sqrt(var_p) / np.sqrt(var_q)) + (var_q + (mu_q - mu_p) ** 2) / (2 * var_p) - 0.5
            expected = np.mean(kl) / np.log(2)
        assert ours[i] == pytest.approx(expected, rel=1e-9, abs=1e-12), ti


def test_hybrid_loss_detaches_the_mean_and_falls_back_to_mse():
    s = D.DiffusionSchedule.from_scheduler()
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 10, 900])
    x_t = s.q_sample(x0, t, noise)
    out = torch.randn(3, 8, 4, 4, requires_grad=True)
    terms = D.training_losses(out, x0, x_t, t, noise, s, learn_sigma=True)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(terms["mse"], ((noise - out[:, :4]) ** 2).mean(dim=(1, 2, 3)))
    terms["vb"].sum().backward()
    assert float(out.grad[:, :4].abs().max()) == 0.0 and float(out.grad[:, 4:].abs().max()) > 0
    plain = D.training_losses(out[:, :4], x0, x_t, t, noise, s, learn_sigma=False)
    assert float(plain["vb"].abs().max()) == 0.0
    torch.testing.assert_close(plain["loss"], plain["mse"])


# ------------------------------------------------------------------------------------------- data
def test_adm_center_crop_and_unreadable_image(tmp_path):
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, :50, 0] = 255  # left half red, right half blue
    img[:, 50:, 2] = 255
    out = center_crop_arr(Image.fromarray(img), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 0, 0].min() > 200 and out[:, -1, 2].min() > 200  # the centre crop straddles the two halves
    # halving with BOX while the short side >= 2*size: 1000x500 -> 250x125 -> bicubic to 32x16 (short side 16)
    big = center_crop_arr(Image.fromarray(np.full((500, 1000, 3), 7, np.uint8)), 16)
    assert big.shape == (16, 16, 3) and (big == 7).all()

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(img).save(tmp_path / name / "ok.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"this is not a png")
    source = load_image_source(data_dir=str(tmp_path))
    ds = ImageClassDataset(source, 16)
    bad = [i for i in range(len(ds)) if "broken" in str(source.dataset[i]["image"]["path"])][0]
    with pytest.raises(OSError, match="broken.png"):
        ds[bad]
    assert ds[(1 - bad, 1)]["pixel_values"].shape == (3, 16, 16)


def test_epoch_sampler_is_seeded_disjoint_and_complete():
    ranks = [EpochSampler(17, 2, r, seed=3) for r in range(2)]
    keys = [s.epoch_keys(0) for s in ranks]
    idx = [i for k in keys for i, _ in k]
    assert len(idx) == 16 and len(set(idx)) == 16  # disjoint; the odd sample is dropped
    assert keys[0] == EpochSampler(17, 2, 0, seed=3).epoch_keys(0)  # a pure function of (seed, epoch)
    assert keys[0] != ranks[0].epoch_keys(1)
    assert {f for k in keys for _, f in k} == {0, 1}
    assert {f for _, f in EpochSampler(17, 1, 0, random_flip=False).epoch_keys(0)} == {0}


# ------------------------------------------------------------------------------------------ config
def test_yaml_config_defaults_cli_overrides_and_unknown_keys(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: SDT-P-B/4\nmax-steps: 7\nlearning_rate: 2.0e-4\nmodel_kwargs: {num_layers: 2}\n"
                   "global_batch_size: 64\n")
    args = parse_args(["--config", str(cfg), "--max-steps", "9"])
    assert (args.model, args.max_steps, args.learning_rate, args.global_batch_size) == ("SDT-P-B/4", 9, 2e-4, 64)
    assert json.loads(args.model_kwargs) == {"num_layers": 2}
    cfg.write_text("max_steps: 7\nlearnig_rate: 1.0\n")
    with pytest.raises(ConfigError, match="learnig_rate"):
        parse_args(["--config", str(cfg)])

    # every value goes through its flag's type: no silent rounding, no string read as true
    for text, message in (("max_steps: 2.7\n", "max_steps must be an integer, got 2.7"),
                          ("max_steps: 2.0\n", "max_steps must be an integer"),
                          ("random_flip: 'no'\n", "random_flip must be true or false, got 'no'"),
                          ("seed: true\n", "seed must be an integer, got True"),
                          ("mixed_precision: fp8\n", "mixed_precision must be one of"),
                          ("max_steps: null\n", "max_steps cannot be null"),
                          ("output_dir: 7\n", "output_dir must be a string")):
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_args(["--config", str(cfg)])
    cfg.write_text("random_flip: false\nlearning_rate: 3e-4\nmax_steps: '12'\nsample_classes: [1, 2]\n")
    args = parse_args(["--config", str(cfg)])
    assert (args.random_flip, args.learning_rate, args.max_steps, args.sample_classes) == (False, 3e-4, 12, "1,2")

    shipped = sorted((REPO / "training" / "configs").glob("sdt-p-*.yaml"))
    assert {p.name for p in shipped} >= {"sdt-p-s2.yaml", "sdt-p-b2.yaml", "sdt-p-l2.yaml", "sdt-p-xl2.yaml"}
    for path in shipped:
        a = parse_args(["--config", str(path), "--data-dir", "x", "--output-dir", "y"])
        assert (a.max_steps, a.global_batch_size, a.learning_rate, a.ema_decay, a.resolution, a.weight_decay) == (
            400_000, 256, 1e-4, 0.9999, 256, 0.0)
        assert a.vae == "stabilityai/sd-vae-ft-ema" and a.model.startswith("SDT-P-") and a.data_dir == "x"
        assert load_yaml_config(path, build_parser())  # no unknown keys
        by_name = parse_args(["--config", path.stem, "--data-dir", "x", "--output-dir", "y"])
        assert {**vars(by_name), "config": None} == {**vars(a), "config": None}  # the packaged recipe, by name
    # the recipes ship with the library: a packaged recipe by name, the same file as training/configs/
    assert (REPO / "training" / "configs" / "sdt-p-xl2.yaml").resolve() == (
        REPO / "sdt_diffusion" / "training" / "recipes" / "sdt-p-xl2.yaml")
    # an old key spelling still works for one release, with a one-line warning
    cfg.write_text("sample_guidance_scale: 2.5\n")
    assert parse_args(["--config", str(cfg)]).guidance_scale == 2.5


def test_each_flag_knows_where_its_value_came_from(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 2.0e-4\nmax_steps: 7\n")
    args = parse_args(["--config", str(cfg), "--max-steps", "9", "--no-flip"])
    assert (args.max_steps, args.learning_rate, args.random_flip) == (9, 2e-4, False)
    assert {k: args.sources[k] for k in ("max_steps", "random_flip", "learning_rate", "guidance_scale", "seed")} == {
        "max_steps": "command line", "random_flip": "command line", "learning_rate": f"--config {cfg}",
        "guidance_scale": "recipe sdt-p", "seed": "default"}
    assert "sources" not in vars(args)  # not a flag: not in train_config.yaml's flags
    (tmp_path / "d").mkdir()
    settings = settings_from_args(parse_args(["--data-dir", str(tmp_path / "d"), "--output-dir",
                                              str(tmp_path / "o"), "--mixed-precision", "bf16"]))
    assert (settings.source("mixed_precision"), settings.source("report_to")) == ("command line", "default")
    built = _toy_settings(tmp_path)  # settings built in Python, not parsed: their values count as given
    assert built.source("mixed_precision") == "caller"


def test_mixed_precision_flag_over_accelerate_launch_over_yaml_over_default(tmp_path):
    from sdt_diffusion.training.config import resolve_mixed_precision

    def resolve(argv, launched=None):
        args = parse_args(argv)
        env = {} if launched is None else {"ACCELERATE_MIXED_PRECISION": launched}
        return resolve_mixed_precision(args.mixed_precision, args.sources["mixed_precision"], env)

    cfg = tmp_path / "run.yaml"
    cfg.write_text("mixed_precision: fp16\n")
    # the paper recipes' "no" gives way to accelerate launch --mixed_precision bf16 (or its config file, FSDP's)
    p = resolve(["--config", "sdt-p-xl2"], "bf16")
    assert (p.value, p.source, p.warning) == ("bf16", "accelerate launch", "")
    assert p.note == "--config sdt-p-xl2's no gives way to it"
    assert (resolve(["--config", "sdt-p-xl2"]).value, resolve(["--config", "sdt-p-xl2"]).source) == (
        "no", "--config sdt-p-xl2")
    # accelerate launch sets "no" also when nothing was chosen: that does not override a YAML value
    assert (resolve(["--config", str(cfg)], "no").value, resolve(["--config", str(cfg)], "no").source) == (
        "fp16", f"--config {cfg}")
    # an explicit flag wins over accelerate launch, with a warning naming both
    p = resolve(["--config", str(cfg), "--mixed-precision", "no"], "bf16")
    assert (p.value, p.source) == ("no", "--mixed-precision on the command line")
    assert "--mixed-precision no" in p.warning and "ACCELERATE_MIXED_PRECISION=bf16" in p.warning
    assert resolve(["--mixed-precision", "bf16"], "bf16").warning == ""  # the same choice: no conflict
    # nothing chosen anywhere: accelerate's default
    assert (resolve([]).value, resolve([]).source) == ("no", "default")
    assert (resolve([], "no").value, resolve([], "no").source) == ("no", "accelerate launch")
    assert (resolve([], "BF16").value, resolve([], "BF16").source) == ("bf16", "accelerate launch")


def test_report_to_auto_falls_back_to_none_and_a_named_missing_tracker_is_refused(data, tmp_path, monkeypatch,
                                                                                  capsys):
    from sdt_diffusion.training.tracking import resolve_report_to

    assert parse_args([]).report_to == "auto"
    assert resolve_report_to("auto") == (["tensorboard"], "--report-to auto: tensorboard (installed)")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # a core install: no tensorboard extra
    trackers, line = resolve_report_to("auto")
    assert trackers is None and "no tracker" in line and "pip install 'sdt-diffusion[tensorboard]'" in line
    with pytest.raises(ConfigError, match=r"--report-to tensorboard \(from --config x.yaml\): .*sdt-diffusion"):
        resolve_report_to("tensorboard", "--config x.yaml")
    argv = [a for a in _argv(data, tmp_path / "run") if a not in ("--report-to", "none")]
    assert _main([*argv, "--report-to", "tensorboard"]) == 2  # refused at start-up, before any compute
    err = capsys.readouterr().err
    assert "--report-to tensorboard: tensorboard is not installed" in err and "sdt-diffusion[tensorboard]" in err
    assert not (tmp_path / "run" / "train_config.yaml").exists()


def test_a_run_records_the_precision_and_trackers_it_used(data, tmp_path, monkeypatch, caplog):
    """End to end (one step): the recipe's "no" gives way to accelerate launch's bf16; --report-to's default on
    a core install is no tracker; both logged once and recorded in train_config.yaml."""
    import yaml

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = tmp_path / "run.yaml"
    cfg.write_text('mixed_precision: "no"\n')
    out = tmp_path / "run"
    argv = [a for a in _argv(data, out, "--config", str(cfg), "--max-steps", "1") if a not in ("--report-to", "none")]
    caplog.set_level("INFO", logger="sdt_diffusion.training")
    assert _train(argv).step == 1
    lines = [r.getMessage() for r in caplog.records]
    assert f"mixed precision: bf16 (from accelerate launch; --config {cfg}'s no gives way to it)" in lines
    assert sum(line.startswith("--report-to auto: no tracker") for line in lines) == 1
    recorded = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (recorded["mixed_precision"], recorded["mixed_precision_resolved"]) == ("no", "bf16")
    assert (recorded["mixed_precision_source"], recorded["report_to_resolved"]) == ("accelerate launch", "none")
    assert not (out / "logs").exists()


@pytest.fixture(scope="module")
def fake_cache(data) -> Path:
    """A tiny consistent latent cache (random latents) in the extraction format."""
    from sdt_diffusion.data import CACHE_FORMAT, CACHE_VERSION

    cache = data["root"] / "fake_cache"
    shard = cache / "shard-00000-of-00001"
    shard.mkdir(parents=True)
    n = 8
    np.save(shard / "mean.npy", np.random.default_rng(0).normal(size=(n, 2, 4, 8, 8)).astype(np.float16))
    np.save(shard / "std.npy", np.full((n, 2, 4, 8, 8), 0.01, np.float16))
    np.save(shard / "labels.npy", np.arange(n) % 2)
    np.save(shard / "indices.npy", np.arange(n))
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "num_samples": n, "num_shards": 1,
            "shards": [shard.name], "latent_shape": [4, 8, 8], "dtype": "float16", "scaling_factor": 0.18215,
            "vae": str(data["vae"]), "vae_subfolder": None, "resolution": 16, "num_classes": 2,
            "class_names": ["a", "b"], "id2label": {"0": "a", "1": "b"}}
    (cache / "metadata.json").write_text(json.dumps(meta))
    return cache


@pytest.mark.parametrize("case", ["both_sources", "no_source", "batch_split", "resume_latest_empty",
                                  "resolution_vs_vae", "resolution_vs_patch", "cache_vs_model", "unknown_field",
                                  "existing_run", "seed_range", "nan_lr", "eval_dir_empty_class", "eval_dir_bad_image",
                                  "truncated_cache", "sample_class_name"])
def test_bad_flags_fail_before_any_compute(case, data, fake_cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(data, out)
    extra = {
        "both_sources": ["--dataset", str(data["train"])],
        "no_source": [],
        "batch_split": ["--global-batch-size", "6", "--per-device-batch", "4"],
        "resume_latest_empty": ["--resume", "latest"],
        "resolution_vs_vae": ["--resolution", "15"],
        "resolution_vs_patch": ["--resolution", "18"],
        "unknown_field": ["--model-kwargs", '{"num_layerz": 2}'],
        "cache_vs_model": [],
        "existing_run": [],
        "seed_range": ["--seed", str(2**32)],
        "nan_lr": ["--learning-rate", "nan"],
        "eval_dir_empty_class": ["--eval-data-dir", str(tmp_path / "held")],
        "eval_dir_bad_image": ["--eval-data-dir", str(tmp_path / "held")],
        "truncated_cache": [],
        "sample_class_name": ["--sample-classes", "red thing,green thing"],  # names work; unknown ones are named
    }[case]
    if case.startswith("eval_dir"):
        shutil.copytree(data["heldout"], tmp_path / "held")
        if case == "eval_dir_empty_class":
            (tmp_path / "held" / "a thing").mkdir()
        else:
            (tmp_path / "held" / "red thing" / "000.png").write_bytes(b"not an image")
    if case == "truncated_cache":
        cache = tmp_path / "cache"
        shutil.copytree(fake_cache, cache)
        mean = cache / "shard-00000-of-00001" / "mean.npy"
        mean.write_bytes(mean.read_bytes()[:1000])
        i = argv.index("--data-dir")
        argv[i:i + 2] = ["--latents-dir", str(cache)]
        i = argv.index("--resolution")
        del argv[i:i + 2]
    if case == "no_source":
        i = argv.index("--data-dir")
        del argv[i:i + 2]
    if case == "cache_vs_model":
        i = argv.index("--data-dir")
        argv[i:i + 2] = ["--latents-dir", str(fake_cache)]
        i = argv.index("--resolution")
        del argv[i:i + 2]
        extra = ["--model-kwargs", json.dumps({**json.loads(TINY), "in_channels": 3})]
    if case == "existing_run":
        (out / "checkpoint-5").mkdir(parents=True)
        (out / "checkpoint-5" / "training_state.json").write_text("{}")
    expected = {
        "both_sources": "exactly one of", "no_source": "exactly one of", "batch_split": "not divisible",
        "resume_latest_empty": "no complete checkpoint", "resolution_vs_vae": "downsampling factor",
        "resolution_vs_patch": "patch size", "cache_vs_model": "in_channels=3", "unknown_field": "num_layerz",
        "existing_run": "already holds checkpoints", "seed_range": "--seed must lie in [0, 2147483647]",
        "nan_lr": "--learning-rate must be finite", "eval_dir_empty_class": "--eval-data-dir",
        "eval_dir_bad_image": "--eval-data-dir", "truncated_cache": "mean.npy: unreadable latent cache array",
        "sample_class_name": "--sample-classes: unknown class name 'green thing'",
    }[case]
    assert _main(argv + extra) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    if case == "eval_dir_empty_class":
        assert "'a thing' holds no images" in err
    if case == "eval_dir_bad_image":
        assert "000.png" in err
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*.tmp"))


# --------------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_accelerate_launch_one_process_trains_logs_and_exports(data, tmp_path):
    out = tmp_path / "run"
    args = ["training/train.py", *_argv(data, out, "--max-steps", "4", "--checkpoint-every", "2",
                                         "--keep-checkpoints", "1", "--eval-data-dir", str(data["heldout"]),
                                         "--eval-every", "2", "--sample-every", "2", "--sample-steps", "2",
                                         "--report-to", "tensorboard", "--per-device-batch", "2")]
    proc = _launch(args, 1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-4"]  # --keep-checkpoints 1
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("loss", "mse", "vb", "grad_norm", "lr", "images_per_s", "epoch"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]
    assert list((out / "logs").rglob("events.out.tfevents*"))

    from sdt_diffusion.pipelines import SDTPipeline

    pipe = SDTPipeline.from_pretrained(str(out / "pipeline"))
    assert pipe.id2label == {0: "blue thing", 1: "red thing"}  # folder names, sorted
    assert pipe.scheduler.config.variance_type == "learned_range" and pipe.vae is not None
    images = pipe(class_labels=[0, "red thing"], num_inference_steps=2, generator=torch.manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    # the exported weights are the EMA of the last checkpoint
    shadow, _, num_updates = load_ema_file(out / "checkpoint-4" / "ema.safetensors")
    exported = [p.detach() for p in pipe.transformer.parameters()]
    assert num_updates == 4
    assert all(torch.equal(a, b) for a, b in zip(exported, shadow))
    # the checkpoint export (sdt-export) builds the same pipeline from the checkpoint and the run's VAE
    assert export.main([str(out / "checkpoint-4"), "--output-dir", str(tmp_path / "from_ckpt")]) == 0
    from_ckpt = SDTPipeline.from_pretrained(str(tmp_path / "from_ckpt"))
    assert from_ckpt.id2label == pipe.id2label and from_ckpt.vae is not None
    assert from_ckpt.scheduler.config.variance_type == "learned_range"
    assert all(torch.equal(a, b) for a, b in zip(exported, from_ckpt.transformer.parameters()))


@pytest.mark.slow
def test_extract_latents_on_two_processes_then_train_from_the_cache_on_two_processes(data, tmp_path):
    cache = tmp_path / "cache"
    proc = _launch(["training/extract_latents.py", "--data-dir", str(data["train"]), "--vae", str(data["vae"]),
                    "--resolution", "16", "--output-dir", str(cache), "--dtype", "float32", "--num-workers", "0",
                    "--batch-size", "3"], 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads((cache / "metadata.json").read_text())
    assert meta["num_shards"] == 2 and meta["num_samples"] == 16 and meta["latent_shape"] == [4, 8, 8]
    parts = [np.load(cache / s / "indices.npy") for s in meta["shards"]]
    assert all(len(p) for p in parts) and sorted(np.concatenate(parts).tolist()) == list(range(16))

    # the cache gives the same batches as encoding on the fly: same keys and flips, same posterior means,
    # and the same latents when the posterior draw uses the same RNG state
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(data["vae"]).eval()
    images = ImageClassDataset(load_image_source(data_dir=str(data["train"])), 16)
    cached = LatentCacheDataset(cache)
    np.testing.assert_array_equal(cached.labels, images.labels)
    stream_img = iterate_batches(images, EpochSampler(16, 1, 0, seed=5), 4)
    stream_lat = iterate_batches(cached, EpochSampler(16, 1, 0, seed=5), 4)
    for _ in range(5):  # crosses into the second epoch
        (_, bi), (_, bl) = next(stream_img), next(stream_lat)
        assert torch.equal(bi["index"], bl["index"]) and torch.equal(bi["labels"], bl["labels"])
        with torch.no_grad():
            dist = vae.encode(bi["pixel_values"]).latent_dist
        torch.testing.assert_close(bl["latent_mean"], dist.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(bl["latent_std"], dist.std, atol=1e-5, rtol=1e-4)
        torch.manual_seed(11)
        z_fly = encode_batch(bi, vae, 0.18215, torch.device("cpu"))
        torch.manual_seed(11)
        z_cache = encode_batch(bl, None, 0.18215, torch.device("cpu"))
        torch.testing.assert_close(z_cache, z_fly, atol=1e-5, rtol=1e-4)

    out = tmp_path / "run"
    proc = _launch(["training/train.py", "--model", "SDT-P-S/2", "--model-kwargs", TINY, "--latents-dir", str(cache),
                    "--global-batch-size", "4", "--max-steps", "3", "--checkpoint-every", "2", "--num-workers", "0",
                    "--log-every", "1", "--report-to", "none", "--no-progress-bar", "--output-dir", str(out)], 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p.name for p in (out / "checkpoint-3").iterdir()} == {
        "rng_state_rank00000.safetensors", "rng_state_rank00001.safetensors", "model.safetensors",
        "optimizer.safetensors", "ema.safetensors", "training_state.json"}  # nothing pickled
    state = json.loads((out / "checkpoint-3" / "training_state.json").read_text())
    assert (state["num_processes"], state["per_device_batch"], state["grad_accum"]) == (2, 2, 1)
    from sdt_diffusion.pipelines import SDTPipeline

    pipe = SDTPipeline.from_pretrained(str(out / "pipeline"))
    assert pipe.id2label == {0: "blue thing", 1: "red thing"} and pipe.transformer.config.in_channels == 4


def test_loss_falls_on_a_tiny_dataset(data, tmp_path):
    out = tmp_path / "run"
    argv = _argv(data, out, "--vae", "none", "--resolution", "8", "--global-batch-size", "8", "--max-steps", "40",
                 "--checkpoint-every", "1000", "--learning-rate", "1e-3", "--ema-decay", "0.9",
                 "--eval-data-dir", str(data["heldout"]), "--eval-every", "40")
    result = _train(argv)
    assert result.step == 40 and result.last_checkpoint == out / "checkpoint-40"
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r}
    assert evals[40] < 0.8 * evals[0], evals  # fixed held-out set, timesteps and noise
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_resume_after_sigterm_matches_an_uninterrupted_run(data, tmp_path):
    common = ("--per-device-batch", "2", "--max-steps", "6", "--eval-data-dir", str(data["heldout"]),
              "--eval-every", "2", "--sample-every", "2", "--sample-steps", "2")
    straight = tmp_path / "straight"
    _train(_argv(data, straight, *common, "--checkpoint-every", "6"))

    # run 2: SIGTERM during step 3 (mid-epoch: 4 steps per epoch) -> checkpoint-3, clean return
    part = tmp_path / "part"
    sent = []

    def sigterm_in_step_3(step, loss):  # called once per training micro-batch (2 per step here)
        if step == 3 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    result = _train(_argv(data, part, *common, "--checkpoint-every", "100"), loss_hook=sigterm_in_step_3)
    assert sent == [3] and result.stopped_by_signal and result.step == 3
    assert [p.name for _, p in list_checkpoints(part)] == ["checkpoint-3"] and not (part / "pipeline").exists()

    # a crashed later save leaves a .tmp folder: never resumed from
    (part / "checkpoint-5.tmp").mkdir()
    (part / "checkpoint-5.tmp" / "training_state.json").write_text('{"step": 5}')
    assert latest_checkpoint(part) == part / "checkpoint-3"
    result = _train(_argv(data, part, *common, "--checkpoint-every", "6", "--resume", "latest"))
    assert result.step == 6 and not (part / "checkpoint-5.tmp").exists()

    def curve(out):
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(out)]

    assert curve(part) == curve(straight)  # identical losses and held-out losses, step by step
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng_state_rank00000.safetensors"):
        assert (straight / "checkpoint-6" / name).read_bytes() == (part / "checkpoint-6" / name).read_bytes(), name
    assert file_hashes(straight / "pipeline") == file_hashes(part / "pipeline")


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _train(_argv(data, out, "--max-steps", "2", "--checkpoint-every", "2"))
    before = file_hashes(out / "checkpoint-2")

    def nan_at_step_3(step, loss):
        return loss * float("nan") if step == 3 else loss

    argv = _argv(data, out, "--max-steps", "6", "--checkpoint-every", "2", "--resume", "latest")
    with pytest.raises(NonFiniteLossError, match="non-finite training loss nan at step 3") as caught:
        _train(argv, loss_hook=nan_at_step_3)
    assert caught.value.step == 3 and caught.value.last_checkpoint == out / "checkpoint-2"
    # the command line turns it into exit status 1 and a message naming the step and the checkpoint
    monkeypatch.setattr(trainer, "train", functools.partial(trainer.train, loss_hook=nan_at_step_3))
    code = _main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite training loss nan at step 3" in err and "checkpoint-2" in err and "--learning-rate" in err, err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # nothing saved after the NaN
    assert file_hashes(out / "checkpoint-2") == before
    assert max(r["step"] for r in read_metrics(out)) == 2


def test_saved_dataset_with_custom_columns_trains_and_names_classes(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["cat", "dog", "owl"])})
    ds = datasets.Dataset.from_dict({"img": images, "y": [0, 1, 2, 0, 1, 2]}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "run"
    argv = ["--model", "SDT-P-S/2", "--model-kwargs", TINY, "--dataset", str(tmp_path / "ds"), "--image-column", "img",
            "--label-column", "y", "--vae", "none", "--resolution", "8", "--global-batch-size", "2", "--max-steps", "2",
            "--checkpoint-every", "2", "--num-workers", "0", "--report-to", "none", "--no-progress-bar",
            "--output-dir", str(out)]
    result = _train(argv)
    assert result.step == 2
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["id2label"] == {"0": "cat", "1": "dog", "2": "owl"} and index["vae"] == [None, None]
    assert json.loads((out / "pipeline" / "transformer" / "config.json").read_text())["in_channels"] == 3


# ---------------------------------------------------------------------- export and sampling of a run
@pytest.fixture(scope="module")
def default_vae_run(data, tmp_path_factory) -> Path:
    """A 2-step run of a learn_sigma=False model with no --vae flag: the default VAE (here the tiny one)."""
    out = tmp_path_factory.mktemp("default_vae_run") / "run"
    argv = _argv(data, out, "--max-steps", "2", "--checkpoint-every", "2", "--model-kwargs",
                 json.dumps({**json.loads(TINY), "learn_sigma": False}))
    i = argv.index("--vae")
    del argv[i:i + 2]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan, "DEFAULT_VAE", str(data["vae"]))
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        result = _train(argv)
    assert result.step == 2 and result.pipeline_dir == out / "pipeline"
    return out


def _sample_script(pipeline: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python eval/sample.py`` with its default flags but for the size of the job."""
    cmd = [sys.executable, str(REPO / "eval" / "sample.py"), "--pipeline", str(pipeline), "--num-samples", "2",
           "--per-device-batch", "2", "--steps", "3", "--output", str(output), *extra]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_a_learn_sigma_false_export_samples_with_the_default_flags(default_vae_run, tmp_path):
    """Bug: the sampler rebuilt the scheduler by name with learned-range variance, which a model without a
    learned variance cannot use; it now samples with the scheduler exported beside the model."""
    pipeline = default_vae_run / "pipeline"
    assert json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "fixed_large"
    proc = _sample_script(pipeline, tmp_path / "s.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    sidecar = json.loads((tmp_path / "s.json").read_text())
    assert sidecar["scheduler"] is None and sidecar["scheduler_class"] == "DDPMScheduler"


def test_a_checkpoint_of_a_default_vae_run_exports_an_image_pipeline(default_vae_run, data, tmp_path):
    """Bug: the checkpoint recorded the raw --vae flag (None for the default), so a pipeline made from it had
    no VAE and sampled 4-channel 'images'. The trainer now records the resolved VAE and exports it."""
    state = json.loads((default_vae_run / "checkpoint-2" / "training_state.json").read_text())
    assert state["vae"] == str(data["vae"].resolve()) and state["vae_subfolder"] is None
    target = tmp_path / "exported"
    proc = subprocess.run([sys.executable, str(REPO / "training" / "export_pipeline.py"),
                           str(default_vae_run / "checkpoint-2"), "--output-dir", str(target)],
                          env={**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from sdt_diffusion.pipelines import SDTPipeline

    pipe = SDTPipeline.from_pretrained(str(target))
    assert pipe.vae is not None and pipe.vae.config.out_channels == 3
    trained = SDTPipeline.from_pretrained(str(default_vae_run / "pipeline"))
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), trained.transformer.parameters()))
    assert pipe.scheduler.config.variance_type == "fixed_large" and pipe.id2label == trained.id2label
    images = pipe(class_labels=[0], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)

    # --vae none would give latents as 'images': refused; so is an output folder that is not a pipeline
    with pytest.raises(ValueError, match="without a VAE"):
        export.export_checkpoint(default_vae_run / "checkpoint-2", tmp_path / "pixels", vae="none")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert export.main([str(default_vae_run / "checkpoint-2"), "--output-dir", str(tmp_path / "precious")]) == 2
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    assert export.main([str(default_vae_run), "--output-dir", str(tmp_path / "x")]) == 2  # not a checkpoint


def test_image_folder_loads_silently_with_the_folder_listing_as_class_ids(tmp_path, capfd):
    img = Image.fromarray(np.zeros((6, 6, 3), np.uint8))
    for rel in ("b/1.png", "b/10.PNG", "a/x.jpg", "a/deeper/y.png", "c c/z.png", ".hidden/h.png", "a/.h.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / rel, format="JPEG" if rel.endswith("jpg") else "PNG")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    capfd.readouterr()
    source = load_image_source(data_dir=str(tmp_path))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no "Downloading data" / "Generating train split" progress
    assert source.class_names == ["a", "b", "c c"] and source.num_classes == 3
    rows = [Path(source.dataset[i]["image"]["path"]).relative_to(tmp_path).as_posix() for i in range(len(source))]
    assert rows == ["a/deeper/y.png", "a/x.jpg", "b/1.png", "b/10.PNG", "c c/z.png"]
    assert source.labels.tolist() == [0, 0, 1, 1, 2]
    assert ImageClassDataset(source, 4)[(1, 0)]["pixel_values"].shape == (3, 4, 4)

    (tmp_path / "0 empty").mkdir()  # an empty class folder would shift every class id after it: refused
    with pytest.raises(ConfigError, match="'0 empty' holds no images"):
        load_image_source(data_dir=str(tmp_path))


# ------------------------------------------------------------------------------ flags, docs and commands
def test_the_flag_tables_in_the_docs_are_the_parsers():
    """docs/training.md and docs/training_sdt_h.md hold each trainer's flag table; regenerate one with
    ``flags.flag_table(<config module>.build_parser())`` when a flag changes."""
    from sdt_diffusion.training import classifier_config, diffusion_config
    from sdt_diffusion.training.flags import flag_table

    for doc, module in (("training.md", diffusion_config), ("training_sdt_h.md", classifier_config)):
        text = (REPO / "docs" / doc).read_text()
        parser = module.build_parser()
        start = text.index(f"<!-- flags: {parser.prog} ")
        table = text[text.index("\n", start) + 1: text.index("<!-- end of flags -->", start)]
        assert table == flag_table(parser), f"docs/{doc}: the flag table differs from the parser; expected:\n" \
                                            f"{flag_table(parser)}"


def test_every_flag_with_a_default_shows_it_in_help():
    from sdt_diffusion.training import classifier_config, diffusion_config

    for module in (diffusion_config, classifier_config):
        parser = module.build_parser()
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.default is None or action.help == "==SUPPRESS==" or action.dest in ("help", "config"):
                continue
            shown = ("on" if action.default else "off") if action.nargs == 0 else str(action.default)
            assert f"(default: {shown})" in text, (parser.prog, action.option_strings)
    help_text = " ".join(diffusion_config.build_parser().format_help().split())
    for flag_name, default in (("--learning-rate", "0.0001"), ("--ema-decay", "0.9999"), ("--global-batch-size", "256"),
                               ("--checkpoint-every", "10000"), ("--report-to", "auto")):
        entry = help_text[help_text.index(f"{flag_name} ", help_text.index("options:")):]
        assert f"(default: {default})" in entry[: entry.index(" --", 3)], entry[:200]


def test_the_recipes_ship_with_the_package_and_the_commands_are_installed():
    import importlib
    from importlib import resources

    import tomllib

    recipes = {p.name for p in (resources.files("sdt_diffusion.training") / "recipes").iterdir()}
    assert {f"sdt-p{s}.yaml" for s in ("", "-s2", "-b2", "-l2", "-xl2")} <= recipes
    assert {f"sdt-h{s}.yaml" for s in ("", "-t", "-s", "-b")} <= recipes
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "*.yaml" in project["tool"]["setuptools"]["package-data"]["sdt_diffusion.training.recipes"]
    scripts = project["project"]["scripts"]
    for command, module in (("sdt-train", "trainer"), ("sdt-train-classifier", "classifier_trainer"),
                            ("sdt-extract-latents", "extract"), ("sdt-export", "export")):
        target, function = scripts[command].split(":")
        assert target == f"sdt_diffusion.training.{module}" and callable(getattr(importlib.import_module(target),
                                                                                  function))
        source = (REPO / "sdt_diffusion" / "training" / f"{module}.py").read_text()
        assert 'if __name__ == "__main__":\n    cli()' in source  # python -m sdt_diffusion.training.<module>
    for script in ("train.py", "train_classifier.py", "extract_latents.py", "export_pipeline.py"):
        code = [line for line in (REPO / "training" / script).read_text().splitlines()
                if line and not line.startswith(("#", " ", '"', "`", "A thin", "each", "installed", "--"))]
        assert len(code) <= 3, (script, code)  # the checkout scripts stay thin: an import and the call


def test_old_flag_spellings_warn_in_one_line_and_still_work(tmp_path, capsys):
    args = parse_args(["--sample-guidance-scale", "2.0", "--output-dir", str(tmp_path)])
    assert args.guidance_scale == 2.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sample-guidance-scale is deprecated" in err and "--guidance-scale" in err


# ----------------------------------------------------------------------------------------- the engine alone
class _ToyData(torch.utils.data.Dataset):
    """16 points of a noisy linear map, indexed by the sampler's ``(index, flip)`` keys."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(16, generator=g)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, key):
        return {"x": self.x[key[0]], "y": self.y[key[0]]}


def _toy_task():
    """A third task in a dozen lines: a linear regression with dropout noise, through the same engine."""
    from accelerate.utils import set_seed

    from sdt_diffusion.training import engine
    from sdt_diffusion.training.ema import EMA
    from sdt_diffusion.training.step import TrainingCore

    class ToyCore(TrainingCore):
        def loss(self, batch):
            pred = torch.nn.functional.dropout(self.model(batch["x"]).squeeze(-1), 0.2)  # draws from the RNG
            return ((pred - batch["y"]) ** 2).mean(), {"abs": (pred - batch["y"]).abs().mean().detach()}

    class ToyTask(engine.Task):
        name, prog, export_name = "toy", "toy.py", "export"

        def plan(self, settings, accelerator, **layout):
            sampler = EpochSampler(16, layout["world"], layout["rank"], settings.run.seed, random_flip=False)
            return engine.RunPlan(**layout, model_config={"in": 3}, sampler=sampler, num_samples=16,
                                  total_steps=settings.run.max_steps,
                                  checkpoint_every=settings.checkpoints.checkpoint_every)

        def build(self, settings, plan, accelerator):
            set_seed(settings.run.seed)
            model = torch.nn.Linear(3, 1)
            optimizer = torch.optim.AdamW(model.parameters(), lr=settings.optim.learning_rate, weight_decay=0.0)
            model, optimizer = accelerator.prepare(model, optimizer)
            return ToyCore(accelerator, model, optimizer, EMA(model.parameters(), settings.optim.ema_decay),
                           plan.accum, None)

        def dataset(self, run):
            return _ToyData()

        def after_checkpoint(self, run, step, final):
            if final and run.is_main:
                (run.export_dir).mkdir(exist_ok=True)
                (run.export_dir / "weights.json").write_text(json.dumps([s.tolist() for s in run.core.ema.shadow]))

    return ToyTask


def _toy_settings(out: Path, **checkpoints):
    from sdt_diffusion.training import config as C

    return C.Settings(run=C.RunSettings(output_dir=str(out), max_steps=6, global_batch_size=4, per_device_batch=2),
                      model=C.ModelSettings(model="toy"), data=C.DataSettings(resolution=None, num_workers=0),
                      optim=C.OptimSettings(learning_rate=0.05, weight_decay=0.0, ema_decay=0.5, max_grad_norm=None),
                      checkpoints=C.CheckpointSettings(checkpoint_every=2, **checkpoints),
                      logging=C.LogSettings(report_to="none", progress_bar=False, log_every=1))


def test_the_engine_runs_any_task_and_resumes_it_exactly(data, tmp_path):
    """The engine's contract without diffusion or classification: a toy task stopped by SIGTERM mid-run and
    resumed ends with the metrics, checkpoint and export of an uninterrupted run; its checkpoints name the task,
    so another trainer refuses them."""
    from sdt_diffusion.training import engine

    task = _toy_task()

    def run(out, hook=None, **checkpoints):
        try:
            return engine.train(task(), _toy_settings(out, **checkpoints), hook)
        finally:
            reset_accelerate()

    straight = run(tmp_path / "straight")
    assert straight.step == 6 and straight.export_dir == tmp_path / "straight" / "export"

    def sigterm_in_step_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    part = tmp_path / "part"
    assert run(part, sigterm_in_step_3).stopped_by_signal
    assert run(part, resume="latest").step == 6

    def curve(out):
        return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in read_metrics(out)]

    assert curve(part) == curve(tmp_path / "straight") and "abs" in curve(part)[0]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert (part / "checkpoint-6" / name).read_bytes() == (tmp_path / "straight" / "checkpoint-6" / name).read_bytes()
    assert (part / "export" / "weights.json").read_text() == (tmp_path / "straight" / "export" / "weights.json").read_text()
    assert json.loads((part / "checkpoint-6" / "training_state.json").read_text())["task"] == "toy"
    assert run(part, resume="latest").step == 6  # finished: nothing to do
    with pytest.raises(ConfigError, match="a checkpoint of the toy trainer, not of the diffusion trainer"):
        _train(_argv(data, part, "--resume", "latest"))
