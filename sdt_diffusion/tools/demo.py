"""The end-to-end CPU demo: train a small SDT-P on real handwritten digits, sample, look at the results.

Data: scikit-learn's handwritten digits (1,797 real 8x8 grey images, 10 classes, shipped inside the
package) at their native 8x8 resolution, split into train / held-out parts with a fixed seed.  The model
works in pixel space (no VAE) with 1x1 patches, so it sees an 8x8 token grid.  Training runs through the
same trainer as real runs (``training/train.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..pipelines import SDTPipeline
from ..training.checkpointing import latest_checkpoint, read_training_state
from ..utils.images import make_labelled_grid
from ..utils.optional import import_optional
from ..utils.seeding import index_generator
from .decay_maps import pipeline_decay_maps, plot_decay_maps
from .digits import NATIVE_RESOLUTION, DigitData, prepare_digits, train_judge


class TrainingInterrupted(RuntimeError):
    """The demo's training run stopped before its last step (SIGTERM/SIGINT); its checkpoint is kept."""

# A small SDT-P override sized for a few minutes of training on 2 CPU cores: the digits at their native
# 8x8 pixels in 1x1 patches, an 8x8 token grid (room for the spatial decay to take shape).  Upscaling to
# 16x16 with 4x4 patches (a 4x4 grid) trains more images per second but followed the class far less well
# (guided class consistency 0.71 after 3,000 steps): the grid, not the step count, was the limit.
DEMO_RESOLUTION = NATIVE_RESOLUTION
DEMO_MODEL_KWARGS = {
    "patch_size": 1,
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 3,
    "sample_size": DEMO_RESOLUTION,
    "num_embeds_ada_norm": 10,
    "gate_rank": 8,
    "lpe_kernel_size": 3,
}


# ----------------------------------------------------------------------------------------- pictures
def plot_losses(metrics_path: Path, out: Path) -> dict[str, float | None]:
    """Plot the training loss (and held-out loss) from train.py's metrics.jsonl; return the final values."""
    import_optional("matplotlib", "demo").use("Agg")  # optional dependency: imported only to draw
    plt = import_optional("matplotlib.pyplot", "demo")

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    held = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    held_ema = [(r["step"], r["eval_loss_ema"]) for r in rows if r.get("eval_loss_ema") is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=0.8, alpha=0.35, color="tab:blue")
        window = max(1, len(losses) // 30)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"training loss ({window}-step mean)")
    if held:
        steps, losses = zip(*held)
        ax.plot(steps, losses, "o-", color="tab:orange", label="held-out denoising loss")
    if held_ema:
        steps, losses = zip(*held_ema)
        ax.plot(steps, losses, "s--", color="tab:green", label="held-out loss, EMA weights (exported)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE + VLB)")
    ax.set_yscale("log")
    ax.set_title("SDT-P on handwritten digits")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return {"final_train_loss": train[-1][1] if train else None, "final_heldout_loss": held[-1][1] if held else None,
            "final_heldout_loss_ema": held_ema[-1][1] if held_ema else None}


# ----------------------------------------------------------------------------------------- stages
def train_command(data: DigitData, out: Path, args: argparse.Namespace, model: str = "SDT-P-S/2",
                  model_kwargs: dict | None = None, run_dir: Path | None = None) -> list[str]:
    """The ``accelerate launch`` training command the demo runs (printed for the user).

    It launches the installed trainer module (``-m sdt_diffusion.training.trainer``, the code behind
    ``training/train.py``), so the demo runs from an installed package as well as from a checkout.
    ``model`` / ``model_kwargs`` default to the demo's SDT-P; ``benchmarks/ablation.py`` passes its variants.
    """
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "sdt_diffusion.training.trainer",
        "--model", model,
        "--model-kwargs", json.dumps(DEMO_MODEL_KWARGS if model_kwargs is None else model_kwargs),
        "--data-dir", str(data.train_dir),
        "--eval-data-dir", str(data.heldout_dir),
        "--eval-every", str(max(1, args.steps // 10)),
        "--vae", "none",
        "--resolution", str(DEMO_RESOLUTION),
        "--no-flip",
        "--global-batch-size", str(args.batch_size),
        "--learning-rate", str(args.learning_rate),
        "--ema-decay", str(args.ema_decay),
        "--max-steps", str(args.steps),
        "--checkpoint-every", str(max(1, args.steps // 2)),
        "--keep-checkpoints", "1",
        "--resume", "auto",
        "--log-every", "5",
        "--sample-every", "0",
        "--seed", str(args.seed),
        "--num-workers", "0",
        "--output-dir", str(run_dir if run_dir is not None else out / "run"),
    ]


def train_stage(args: argparse.Namespace, data: DigitData, out: Path) -> float | None:
    """Train and export the demo's model unless a pipeline is there already; the training time (None if reused)."""
    pipeline_dir, run_dir = out / "pipeline", out / "run"
    if not args.fresh and (pipeline_dir / "model_index.json").exists():
        print(f"[demo] 2/5 reusing the trained pipeline in {pipeline_dir} (pass --fresh to train again)")
        return None
    cmd = train_command(data, out, args)
    print("[demo] 2/5 training through training/train.py:\n       " + " ".join(
        f"'{c}'" if " " in c or "{" in c else c for c in cmd))
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.time() - t0
    last = latest_checkpoint(run_dir)
    reached = read_training_state(last)["step"] if last is not None else 0
    if reached < args.steps:  # stopped by a signal: keep the checkpoint, don't export a half-trained model
        raise TrainingInterrupted(f"training stopped at step {reached} of {args.steps}; run the same command "
                                  "again to resume from the last checkpoint")
    if pipeline_dir.exists():
        shutil.rmtree(pipeline_dir)
    shutil.copytree(run_dir / "pipeline", pipeline_dir)
    return seconds


def sample_stage(pipe: SDTPipeline, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``--eval-samples-per-class`` digits of every class, with and without guidance, from the same noise."""
    labels = np.array([k for k in range(10) for _ in range(args.eval_samples_per_class)])
    images = []
    for scale in (args.guidance_scale, 1.0):
        generators = [index_generator(args.seed, i) for i in range(len(labels))]
        images.append(pipe(class_labels=labels.tolist(), guidance_scale=scale, num_inference_steps=args.sample_steps,
                           generator=generators, output_type="np").images)
    return labels, images[0], images[1]


def save_sample_grid(pipe: SDTPipeline, images: np.ndarray, labels: np.ndarray, per_class: int, path: Path) -> None:
    """The first ``per_class`` samples of every class as a labelled grid, one row per class."""
    keep = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(10)])
    tiles = [Image.fromarray((images[i] * 255).round().astype(np.uint8)) for i in keep]
    make_labelled_grid(tiles, [pipe.id2label[int(labels[i])] for i in keep], ncols=per_class).save(path)


def run(args: argparse.Namespace) -> dict:
    """Run every stage of the demo and return the report."""
    start = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    print(f"[demo] 1/5 data: scikit-learn digits -> {out / 'data'}")
    data = prepare_digits(out / "data", DEMO_RESOLUTION, args.seed)
    print(f"       {len(data.train_labels)} training and {len(data.heldout_labels)} held-out digits at "
          f"{DEMO_RESOLUTION}x{DEMO_RESOLUTION}")
    train_seconds = train_stage(args, data, out)

    print("[demo] 3/5 sampling with and without classifier-free guidance")
    pipe = SDTPipeline.from_pretrained(out / "pipeline")
    labels, guided, unguided = sample_stage(pipe, args)
    save_sample_grid(pipe, guided, labels, args.samples_per_class, out / "samples.png")

    print("[demo] 4/5 class consistency, judged by a network trained on the real training digits only")
    judge = train_judge(data.train_images, data.train_labels, args.seed)
    enough = len(guided) > judge.num_features  # the Frechet distance needs full-rank covariances
    scores = {
        "classifier_heldout_accuracy": judge.class_consistency(data.heldout_images, data.heldout_labels),
        "class_consistency_guided": judge.class_consistency(guided, labels),
        "class_consistency_unguided": judge.class_consistency(unguided, labels),
        "judge_frechet_distance_guided": judge.frechet_distance(guided, data.heldout_images) if enough else None,
    }

    print("[demo] 5/5 pictures: loss curve and learned decay maps")
    metrics = out / "run" / "metrics.jsonl"
    losses = plot_losses(metrics, out / "loss.png") if metrics.exists() else {}
    maps, shown = pipeline_decay_maps(pipe, 3, timestep=args.decay_timestep, num_inference_steps=args.sample_steps,
                                      seed=args.seed)
    plot_decay_maps(maps, out / "decay_maps.png", image=shown)

    report = {
        "train_seconds": train_seconds, "train_steps": args.steps, "batch_size": args.batch_size,
        "model_kwargs": DEMO_MODEL_KWARGS, **losses, **scores,
        "guidance_scale": args.guidance_scale, "sample_steps": args.sample_steps,
        "samples_per_class": args.eval_samples_per_class, "total_seconds": time.time() - start,
        "outputs": {k: str(out / f) for k, f in [("samples", "samples.png"), ("loss", "loss.png"),
                                                  ("decay_maps", "decay_maps.png"), ("pipeline", "pipeline"),
                                                  ("report", "report.json")]},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_summary(report)
    return report


def print_summary(report: dict) -> None:
    """The closing summary: times, losses, class consistency and where everything went."""
    def fmt(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    print("\n================ SDT demo summary ================")
    print(f"training time            {fmt(report['train_seconds'], '.1f')} s ({report['train_steps']} steps, "
          f"batch {report['batch_size']})")
    print(f"final training loss      {fmt(report.get('final_train_loss'))}")
    print(f"final held-out loss      {fmt(report.get('final_heldout_loss'))} "
          f"(EMA weights, exported: {fmt(report.get('final_heldout_loss_ema'))})")
    print(f"judge accuracy on real held-out digits  {report['classifier_heldout_accuracy']:.3f}")
    print(f"class consistency, guided (scale {report['guidance_scale']})   {report['class_consistency_guided']:.3f}")
    print(f"class consistency, unguided               {report['class_consistency_unguided']:.3f}   (chance 0.100)")
    print(f"Frechet distance to held-out digits (judge features, guided)  "
          f"{fmt(report['judge_frechet_distance_guided'], '.3f')}")
    print(f"total wall time          {report['total_seconds']:.1f} s")
    for name, path in report["outputs"].items():
        print(f"  {name:<11} {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="SDT end-to-end CPU demo on scikit-learn's handwritten digits.")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="EMA decay; 0.99 averages the last ~100 steps (DiT's 0.9999 needs a far longer run)")
    p.add_argument("--samples-per-class", type=int, default=10, help="columns of samples.png")
    p.add_argument("--eval-samples-per-class", type=int, default=30,
                   help="samples per class that the judge scores (with and without guidance)")
    p.add_argument("--sample-steps", type=int, default=100, help="DDPM steps for sampling")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--decay-timestep", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="train again even if outputs/demo/pipeline exists")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/demo.sh``; returns the exit status."""
    try:
        run(build_parser().parse_args(argv))
    except TrainingInterrupted as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"[demo] the training command failed with exit status {e.returncode}", file=sys.stderr)
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
