"""Matched-budget ablation of SDT-H's decay modes (the paper's Tables 3-4) over several seeds.

Every mode is trained by the same trainer (``training/train_classifier.py``: same data, recipe, budget, EMA,
evaluation) and scored by its held-out top-1; the table gives mean ± std over seeds (sample standard deviation).

On the CPU (default): scikit-learn's digits, upscaled to 32x32 (``sdt_diffusion.tools.digits``, fixed split:
1,438 training / 359 held-out images), a small SDT-H (widths 32-64-128-256, depths 1-1-2-1, 1.6M parameters) with
the paper's recipe at a small scale (batch 64, lr 2e-3, no horizontal flips for digits, EMA 0.99) for
``--epochs`` epochs (default 30, the CPU example's budget); the mode under test replaces the decay in the stages ``--stages`` (default all: at 32x32 the
stages see 8x8, 4x4, 2x2 and 1x1 tokens, so the first two are where decay can matter).

    python benchmarks/ablation_classification.py --seeds 0 1 2 --output-dir outputs/ablation_classification

On ImageNet (GPUs), the same script with the data and a launcher: the paper's recipe at its defaults (SDT-H-T, 300
epochs, batch 1024), the modes in stages 3-4 (stages 1-2 keep the decomposed decay, as the paper's SDT-H-T does):

    python benchmarks/ablation_classification.py --data-dir /data/imagenet/train --eval-data-dir /data/imagenet/val \\
        --launcher "accelerate launch --multi_gpu --num_processes 8" --seeds 0 --output-dir runs/ablation_cls

A finished run (``training_done.json``) is not trained again and an interrupted one resumes from its last
checkpoint: rerun the same command.  Results: ``<output-dir>/results.md`` and ``<output-dir>/results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sdt_diffusion.attention import DECAY_MODES
from sdt_diffusion.models.sdt_h import DEFAULT_DECAY_MODES
from sdt_diffusion.tools.digits import prepare_digits

REPO = Path(__file__).resolve().parent.parent
# The paper's Tables 3-4 (SDT-H-T, ImageNet-1K top-1 %), for the reader's comparison.
PAPER_TOP1 = {"none": 81.9, "fixed": 82.4, "1d": 82.2, "bidirectional": 82.3, "decomposed": 82.5, "cdsf": 82.7}
DIGITS_MODEL = {"embed_dims": [32, 64, 128, 256], "depths": [1, 1, 2, 1], "num_heads": [2, 2, 4, 8],
                "head_hidden_size": 256}
DIGITS_ARGS = ["--resolution", "32", "--global-batch-size", "64", "--learning-rate", "2e-3", "--lr-base-batch", "64",
               "--warmup-epochs", "2", "--hflip", "0", "--repeated-aug", "1", "--ema-decay", "0.99",
               "--num-workers", "0", "--report-to", "none", "--no-progress-bar"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=list(DECAY_MODES), choices=DECAY_MODES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--stages", type=str, default=None,
                   help="1-based stages that take the mode under test, e.g. 3,4 (default: all on digits, 3,4 with "
                        "--data-dir); the other stages keep the preset's decay (decomposed 1-2, cdsf 3-4)")
    p.add_argument("--epochs", type=int, default=30,
                   help="digits: training epochs per run (the CPU example's budget; after 10 epochs the attention "
                        "branch is still too small for the decay to change the predictions)")
    p.add_argument("--data-root", type=str, default="outputs/digits32", help="digits: where the image folders go")
    p.add_argument("--data-dir", type=str, default=None, help="training image folder (ImageNet mode)")
    p.add_argument("--eval-data-dir", type=str, default=None, help="validation image folder (ImageNet mode)")
    p.add_argument("--model", type=str, default="SDT-H-T")
    p.add_argument("--launcher", type=str, default=None,
                   help="command prefix that runs the training script (default: this Python)")
    p.add_argument("--train-args", type=str, default="",
                   help="more flags for train_classifier.py (appended last, so they override the defaults here)")
    p.add_argument("--output-dir", type=str, default="outputs/ablation_classification")
    return p


def stage_modes(mode: str, stages: list[int], num_stages: int = 4) -> list[str]:
    """The per-stage decay of a run: ``mode`` in ``stages`` (1-based), the preset's decay elsewhere."""
    return [mode if i + 1 in stages else DEFAULT_DECAY_MODES[i] for i in range(num_stages)]


def run_command(args: argparse.Namespace, mode: str, seed: int, stages: list[int], out: Path,
                data: tuple[Path, Path]) -> list[str]:
    """The training command of one (mode, seed) run."""
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    cmd = [*launcher, str(REPO / "training" / "train_classifier.py"), "--model", args.model,
           "--data-dir", str(data[0]), "--eval-data-dir", str(data[1]), "--seed", str(seed),
           "--decay-mode", ",".join(stage_modes(mode, stages)), "--output-dir", str(out), "--resume", "auto"]
    if args.data_dir is None:
        cmd += ["--model-kwargs", json.dumps(DIGITS_MODEL), "--epochs", str(args.epochs), *DIGITS_ARGS]
    return cmd + shlex.split(args.train_args)


def read_run(out: Path) -> dict:
    """Final and best held-out top-1 of a finished run, from its ``metrics.jsonl`` and ``best/best.json``."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval_top1" in r]
    train = [r for r in records if "loss" in r]
    if not evals:
        raise RuntimeError(f"{out}: no evaluation in metrics.jsonl (pass --eval-data-dir)")
    final = max(evals, key=lambda r: r["step"])
    best = json.loads((out / "best" / "best.json").read_text())
    return {"final_top1": final["eval_top1"], "final_top1_ema": final["eval_top1_ema"], "best_top1": best["top1"],
            "best_weights": best["weights"], "steps": final["step"],
            "train_seconds": max((r["time"] for r in train), default=None)}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: dict, seeds: list[int]) -> str:
    head = ("| decay mode | final top-1, online (%) | final top-1, EMA (%) | best epoch, max(online, EMA) (%) | "
            "paper, ImageNet (Tables 3-4) |\n|---|---|---|---|---|\n")
    rows = ""
    for mode, entry in results.items():
        runs = entry["runs"]
        rows += (f"| {mode} | {mean_std([r['final_top1'] for r in runs])} | "
                 f"{mean_std([r['final_top1_ema'] for r in runs])} | {mean_std([r['best_top1'] for r in runs])} | "
                 f"{PAPER_TOP1[mode]} |\n")
    return head + rows + f"\nMean ± sample std over seeds {', '.join(map(str, seeds))}.\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.data_dir is None) != (args.eval_data_dir is None):
        print("ablation_classification.py: error: pass both --data-dir and --eval-data-dir (or neither: digits)",
              file=sys.stderr)
        return 2
    default_stages = "1,2,3,4" if args.data_dir is None else "3,4"
    stages = [int(s) for s in (args.stages or default_stages).split(",")]
    if args.data_dir is None:
        digits = prepare_digits(Path(args.data_root), resolution=32)
        data = (digits.train_dir, digits.heldout_dir)
    else:
        data = (Path(args.data_dir), Path(args.eval_data_dir))
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for mode in args.modes:
        results[mode] = {"decay_modes": stage_modes(mode, stages), "runs": []}
        for seed in args.seeds:
            out = root / mode / f"seed{seed}"
            if not (out / "training_done.json").is_file():
                cmd = run_command(args, mode, seed, stages, out, data)
                print(f"[ablation] {mode} seed {seed}: {shlex.join(cmd)}", flush=True)
                start = time.time()
                proc = subprocess.run(cmd, cwd=REPO)
                if proc.returncode != 0:
                    print(f"ablation_classification.py: error: the {mode} seed {seed} run failed "
                          f"(exit {proc.returncode}); rerun to resume it", file=sys.stderr)
                    return 1
                print(f"[ablation] {mode} seed {seed}: {time.time() - start:.0f} s", flush=True)
            results[mode]["runs"].append({"seed": seed, **read_run(out)})
    text = table(results, args.seeds)
    meta = {"date": datetime.date.today().isoformat(), "command": shlex.join([sys.executable, *sys.argv]),
            "machine": platform.processor() or platform.machine(), "stages": stages,
            "data": [str(d) for d in data]}
    (root / "results.json").write_text(json.dumps({"meta": meta, "modes": results}, indent=2))
    (root / "results.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
