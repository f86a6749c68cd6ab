"""Matched-budget ablation of SDT-P's decay variants against DiT, over several seeds.

Every variant is trained by the same trainer (``training/train.py``: same data, loss, optimiser, EMA,
checkpoints, export) for the same number of steps, then scored; the table reports mean ± std over seeds.

On the CPU (default): scikit-learn's digits at their native 8x8 in 1x1 patches (the demo's data, model
shape and recipe).  Per run: the final held-out denoising loss of the EMA weights, the class consistency of
guided samples, and a Fréchet distance between guided samples and the held-out digits in the feature space
of the demo's judge network (a small-scale proxy, NOT ImageNet FID).

    python benchmarks/ablation.py --variants dit none fixed cdsf --seeds 0 1 2 --steps 600 \\
        --output-dir outputs/ablation
    python benchmarks/ablation.py --variants cdsf --alphas 0.05 0.1 0.2 --seeds 0 1 2 --output-dir outputs/alpha
    python benchmarks/ablation.py --variants dit-original +rope +lpe +gate +cdsf sdt-p --seeds 0 1 2 \\
        --output-dir outputs/factorial    # each SDA part on its own on top of the original DiT

On ImageNet (GPUs; the paper's Table 3-4 ablation with real FID through ``eval/``): point it at a latent
cache and a model size, give the launcher, the reference batch and the number of samples; the defaults are
then DiT's recipe (400K steps, batch 256, lr 1e-4, EMA 0.9999) and its FID guidance 1.5:

    python benchmarks/ablation.py --latents-dir data/imagenet256-latents --model-size B --patch-size 2 \\
        --variants dit none fixed cdsf --seeds 0 --launcher "accelerate launch --multi_gpu --num_processes 8" \\
        --fid-reference data/ref/VIRTUAL_imagenet256_labeled.npz --fid-num-samples 50000 --output-dir runs/ablation

A finished run (its ``result.json``) is never trained again: rerun the same command after an interruption
(an interrupted training resumes from its last checkpoint).  Results: ``<output-dir>/ablation.md`` and
``<output-dir>/ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdt_diffusion import SDTPipeline
from sdt_diffusion.attention import DECAY_MODES
from sdt_diffusion.evaluation import compute_metrics
from sdt_diffusion.tools.demo import DEMO_MODEL_KWARGS, train_command
from sdt_diffusion.tools.digits import DigitData, prepare_digits, train_judge
from sdt_diffusion.utils.cli_args import add_deprecated_alias
from sdt_diffusion.utils.seeding import index_generator

# The factorial over Spatial Decay Attention's parts: SDT-P with every part off and DiT's absolute sin-cos
# position embedding is the original DiT (one shared embedder, the model the paper compares against; see
# docs/model.md), then one part at a time on top of it, then the full SDT-P (the paper's eq. 13).
DIT_ORIGINAL = {"decay_mode": "none", "use_rope": False, "use_lpe": False, "use_output_gate": False,
                "use_abs_pos_embed": True}
SDT_P = {"decay_mode": "cdsf", "use_rope": True, "use_lpe": True, "use_output_gate": True, "use_abs_pos_embed": False}
NAMED_VARIANTS: dict[str, dict] = {
    "dit-original": DIT_ORIGINAL,
    "+rope": {**DIT_ORIGINAL, "use_rope": True},
    "+lpe": {**DIT_ORIGINAL, "use_lpe": True},
    "+gate": {**DIT_ORIGINAL, "use_output_gate": True},
    "+cdsf": {**DIT_ORIGINAL, "decay_mode": "cdsf"},
    # the full SDT-P without DiT's absolute position embedding: the class defaults until the 2026-12-05 factorial
    "sdt-p": SDT_P,
    # the full SDT-P with DiT's absolute position embedding kept (the paper replaces DiT's attention and says
    # nothing about its position embedding): the class defaults since that factorial
    "sdt-p+abs": {**SDT_P, "use_abs_pos_embed": True},
    # initialisations the paper leaves open (SDTTransformer2DModel's output_gate_init / decay_gate_init)
    "sdt-p+unit-gate": {**SDT_P, "output_gate_init": "unit"},
    "sdt-p+rmt-decay": {**SDT_P, "decay_gate_init": "rmt"},
}
VARIANTS = ("dit", *DECAY_MODES, *NAMED_VARIANTS)
# What runs without --variants: every variant except RMT's decomposed fixed decay, which is SDT-H's RMT baseline
# (docs/sdt_h.md), not one of SDT-P's decay variants; it still runs when named.
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "fixed_decomposed")
# SDT-only config fields of the demo's model, dropped for DiT (which has no gates, LPE or output gate).
SDT_ONLY_FIELDS = ("gate_rank", "lpe_kernel_size", "decay_mode", "alpha")


@dataclass(frozen=True)
class Variant:
    """One row of the table: a model family, its decay mode and alpha."""

    name: str  # "dit", a decay mode or a key of NAMED_VARIANTS
    alpha: float | None = None

    @property
    def label(self) -> str:
        return self.name if self.alpha is None else f"{self.name} (alpha={self.alpha:g})"

    @property
    def folder(self) -> str:
        return self.name if self.alpha is None else f"{self.name}-alpha{self.alpha:g}"

    def model(self, size: str, patch: int) -> tuple[str, dict]:
        """The ``--model`` preset and ``--model-kwargs`` overrides for the digits model shape."""
        if self.name == "dit":
            return f"DiT-{size}/{patch}", {}
        kwargs = dict(NAMED_VARIANTS.get(self.name, {"decay_mode": self.name}))
        if self.alpha is not None:
            kwargs["alpha"] = self.alpha
        return f"SDT-P-{size}/{patch}", kwargs


def variants_from(names: list[str], alphas: list[float] | None) -> list[Variant]:
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise SystemExit(f"ablation.py: error: unknown --variants {bad}; choose from {list(VARIANTS)}")
    out = []
    for name in names:
        if alphas and name == "cdsf":
            out += [Variant(name, a) for a in alphas]
        else:
            out.append(Variant(name))
    return out


# ------------------------------------------------------------------------------------------ digits
def merged_kwargs(variant: Variant, base: dict, extra: dict) -> dict:
    """``base`` config fields, then the user's ``extra``, then the variant's own; SDT-only fields dropped for DiT."""
    merged = {**base, **extra}
    if variant.name == "dit":
        merged = {k: v for k, v in merged.items() if k not in SDT_ONLY_FIELDS}
    return merged


def digits_model_kwargs(variant: Variant, extra: dict | None = None) -> tuple[str, dict]:
    """The demo's model shape (4 layers, 4 heads x 32, 1x1 patches on 8x8 digits) for ``variant``."""
    preset, own = variant.model("S", 2)
    return preset, {**merged_kwargs(variant, DEMO_MODEL_KWARGS, extra or {}), **own}


def score_digits(pipeline_dir: Path, data: DigitData, judge, per_class: int, steps: int, guidance: float,
                 seed: int) -> dict:
    """Class consistency of guided and unguided samples and the judge-feature Fréchet distance of the guided ones."""
    pipe = SDTPipeline.from_pretrained(pipeline_dir)
    labels = [k for k in range(10) for _ in range(per_class)]

    def draw(scale: float) -> np.ndarray:
        generators = [index_generator(seed, i) for i in range(len(labels))]
        return pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=steps, generator=generators,
                    output_type="np").images

    images = draw(guidance)
    unguided = draw(1.0)
    # The Fréchet distance needs full-rank covariances: more samples than judge features.
    enough = len(images) > judge.num_features and len(data.heldout_images) > judge.num_features
    return {
        "class_consistency": judge.class_consistency(images, np.array(labels)),
        "class_consistency_unguided": judge.class_consistency(unguided, np.array(labels)),
        "frechet_distance_judge": judge.frechet_distance(images, data.heldout_images) if enough else None,
    }


def final_heldout_loss(metrics_path: Path) -> float | None:
    """The last held-out loss of the EMA weights in a run's ``metrics.jsonl``."""
    value = None
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("eval_loss_ema") is not None:
            value = float(row["eval_loss_ema"])
    return value


# ------------------------------------------------------------------------------------------ runs
def run_training(cmd: list[str], log: Path) -> float:
    """Run one training command, its output into ``log``; return the wall time."""
    start = time.time()
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return time.time() - start


def digits_run(variant: Variant, seed: int, args: argparse.Namespace, data: DigitData, judge) -> dict:
    run_dir = Path(args.output_dir) / variant.folder / f"seed-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    preset, kwargs = digits_model_kwargs(variant, args.model_kwargs)
    recipe = argparse.Namespace(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                ema_decay=args.ema_decay, seed=seed)
    cmd = train_command(data, run_dir, recipe, model=preset, model_kwargs=kwargs, run_dir=run_dir / "train")
    seconds = run_training(cmd, run_dir / "train.log")
    scores = score_digits(run_dir / "train" / "pipeline", data, judge, args.samples_per_class, args.sample_steps,
                          args.guidance_scale, seed)
    return {"heldout_loss_ema": final_heldout_loss(run_dir / "train" / "metrics.jsonl"), **scores,
            "train_seconds": seconds}


def imagenet_run(variant: Variant, seed: int, args: argparse.Namespace) -> dict:
    run_dir = Path(args.output_dir) / variant.folder / f"seed-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    preset, own = variant.model(args.model_size, args.patch_size)
    kwargs = {**merged_kwargs(variant, {}, args.model_kwargs), **own}
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*launcher, "-m", "sdt_diffusion.training.trainer", "--model", preset, "--model-kwargs", json.dumps(kwargs),
           "--latents-dir", args.latents_dir, "--global-batch-size", str(args.batch_size),
           "--learning-rate", str(args.learning_rate), "--ema-decay", str(args.ema_decay),
           "--max-steps", str(args.steps), "--seed", str(seed), "--resume", "auto",
           "--output-dir", str(run_dir / "train")]
    if args.eval_data_dir:
        cmd += ["--eval-data-dir", args.eval_data_dir]
    seconds = run_training(cmd, run_dir / "train.log")
    result: dict = {"train_seconds": seconds, "heldout_loss_ema": final_heldout_loss(run_dir / "train" / "metrics.jsonl")}
    if args.fid_reference:
        samples = run_dir / "samples.npz"
        sample_cmd = [*launcher, "-m", "sdt_diffusion.evaluation.sampling", "--pipeline", str(run_dir / "train" / "pipeline"),
                      "--num-samples", str(args.fid_num_samples), "--guidance-scale", str(args.guidance_scale),
                      "--seed", str(seed), "--output", str(samples)]
        run_training(sample_cmd, run_dir / "sample.log")
        metrics = compute_metrics(str(samples), args.fid_reference, inception_weights=args.fid_inception_weights)
        result.update({k: metrics.get(k) for k in ("fid", "sfid", "inception_score", "precision", "recall")})
    return result


# ------------------------------------------------------------------------------------------ table
def summarise(rows: list[dict], keys: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, std (sample, n-1) and n of every metric per variant label."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for label in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == label]
        table[label] = {}
        for key in keys:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                table[label][key] = {"mean": statistics.fmean(values),
                                     "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return table


def markdown(table: dict, keys: list[str], names: dict[str, str]) -> str:
    lines = ["| variant | " + " | ".join(names[k] for k in keys) + " | seeds |",
             "|---|" + "---|" * len(keys) + "---|"]
    for label, stats in table.items():
        cells = [f"{stats[k]['mean']:.4f} ± {stats[k]['std']:.4f}" if k in stats else "–" for k in keys]
        n = max((s["n"] for s in stats.values()), default=0)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


# The defaults of each mode: the demo's recipe on the digits, DiT's recipe and FID guidance on ImageNet.
MODE_DEFAULTS = {
    "digits": {"steps": 600, "batch_size": 64, "learning_rate": 2e-3, "ema_decay": 0.99, "guidance_scale": 5.0},
    "imagenet": {"steps": 400_000, "batch_size": 256, "learning_rate": 1e-4, "ema_decay": 0.9999, "guidance_scale": 1.5},
}


def fill_mode_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the recipe flags left unset with the defaults of the mode (ImageNet with ``--latents-dir``)."""
    for field, value in MODE_DEFAULTS["imagenet" if args.latents_dir else "digits"].items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    return args


def json_object(text: str) -> dict:
    """``--model-kwargs``: a JSON object of config fields."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of config fields, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help=f"any of {list(VARIANTS)} (default: all but fixed_decomposed)")
    p.add_argument("--alphas", nargs="+", type=float, help="CDSF alpha values (rows 'cdsf (alpha=...)')")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="training steps per run (digits: 600; ImageNet: DiT's 400000)")
    p.add_argument("--batch-size", type=int, help="global batch (digits: 64; ImageNet: DiT's 256)")
    p.add_argument("--learning-rate", type=float, help="AdamW lr (digits: 2e-3; ImageNet: DiT's 1e-4)")
    p.add_argument("--ema-decay", type=float, help="EMA decay (digits: 0.99; ImageNet: DiT's 0.9999)")
    p.add_argument("--samples-per-class", type=int, default=30,
                   help="guided samples per class that the judge scores (the demo's number)")
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance of the scored samples (digits: 5, the demo's; ImageNet: 1.5, DiT's FID)")
    p.add_argument("--output-dir", default="outputs/ablation")
    p.add_argument("--model-kwargs", type=json_object, default={},
                   help="JSON config overrides for every variant, e.g. '{\"attention_backend\": \"flex\"}' "
                        "(SDT-only fields are dropped for DiT)")
    g = p.add_argument_group("ImageNet (GPUs)")
    g.add_argument("--latents-dir", help="train on this latent cache (training/extract_latents.py) instead of digits")
    g.add_argument("--eval-data-dir", help="held-out image folder for the held-out loss")
    g.add_argument("--model-size", default="B", choices=("S", "B", "L", "XL"))
    g.add_argument("--patch-size", type=int, default=2, choices=(2, 4, 8))
    g.add_argument("--launcher", help='e.g. "accelerate launch --multi_gpu --num_processes 8"')
    g.add_argument("--fid-reference", help="ADM reference batch npz: sample and score FID-N per run")
    g.add_argument("--fid-num-samples", type=int, default=50000,
                   help="images sampled and scored per run (sdt-train's --fid-num-samples; default 50000: FID-50K)")
    g.add_argument("--fid-inception-weights",
                   help="local Inception-V3 state dict (sdt-train's --fid-inception-weights; default: "
                        "torch-fidelity's download)")
    add_deprecated_alias(p, "--fid-samples", "--fid-num-samples")
    add_deprecated_alias(p, "--inception-weights", "--fid-inception-weights")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    fill_mode_defaults(args)
    if args.fid_reference and args.fid_num_samples < 10:  # checked before any training, not after it
        parser.error("--fid-num-samples must be at least 10 (the Inception Score's 10 splits), "
                     f"got {args.fid_num_samples}")
    if args.fid_reference and not args.latents_dir:
        parser.error("--fid-reference scores ImageNet runs: give --latents-dir too (the digits are scored by the judge)")
    variants = variants_from(args.variants, args.alphas)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = not args.latents_dir
    data = judge = None
    if digits:
        data = prepare_digits(out / "data")
        judge = train_judge(data.train_images, data.train_labels, seed=0)
    rows = []
    for variant in variants:
        for seed in args.seeds:
            result_file = out / variant.folder / f"seed-{seed}" / "result.json"
            if result_file.exists():
                row = json.loads(result_file.read_text())
                print(f"[ablation] {variant.label} seed {seed}: done earlier")
            else:
                print(f"[ablation] {variant.label} seed {seed}: training {args.steps} steps", flush=True)
                scores = digits_run(variant, seed, args, data, judge) if digits else imagenet_run(variant, seed, args)
                row = {"variant": variant.label, **asdict(variant), "seed": seed, "steps": args.steps, **scores}
                result_file.write_text(json.dumps(row, indent=2))
            print(f"           {json.dumps({k: v for k, v in row.items() if isinstance(v, float)})}", flush=True)
            rows.append(row)
    names = {"heldout_loss_ema": "held-out loss (EMA)", "class_consistency": "class consistency (guided)",
             "class_consistency_unguided": "class consistency (unguided)",
             "frechet_distance_judge": "Fréchet distance, judge features (proxy)", "fid": "FID", "sfid": "sFID",
             "inception_score": "IS", "precision": "precision", "recall": "recall", "train_seconds": "train s"}
    keys = [k for k in names if any(r.get(k) is not None for r in rows)]
    table = summarise(rows, keys)
    text = markdown(table, keys, names)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps({"settings": vars(args), "runs": rows, "summary": table}, indent=2))
    print(text)
    return table


if __name__ == "__main__":
    main()
