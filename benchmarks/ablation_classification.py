"""Matched-budget ablation of SDT-H's decay (the paper's Tables 3-5) over several seeds.

Every row is trained by the same trainer (``training/train_classifier.py``: same data, recipe, budget, EMA,
evaluation) and scored by its held-out top-1; the table gives mean ± std over seeds (sample standard deviation).

The rows are the paper's, built from the preset (``--model``, default SDT-H-T: decomposed decay in stages 1-2,
CDSF in 3-4) and chosen with ``--table``:

* 3 (default; the decay itself): "No decay" (``none``: no decay in any stage), "Spatial Decay" (``fixed``: RMT's
  data-independent decay everywhere, ``fixed_decomposed`` in the stages the preset decomposes, ``fixed`` in the
  others), "Ours" (``cdsf``: SDT-H as the preset has it), and ``rmt``: the RMT preset of the same size (RMT-T for
  SDT-H-T; paper, Table 1);
* 4 (the 2D fusion): ``1d``, ``bidirectional``, ``decomposed`` or ``cdsf`` in the global stages (those the preset
  does not decompose: 3-4), the decomposed decay in the others;
* 5 (alpha): SDT-H with alpha 0.05, 0.1, 0.15, 0.2.

The script prints which stage took which mode in every row.  ``--modes`` instead runs one row per decay mode, that
mode in the stages ``--stages`` (default all on digits, 3,4 with ``--data-dir``) and the preset's decay elsewhere.

On the CPU (default): scikit-learn's digits, upscaled to 32x32 (``sdt_diffusion.tools.digits``, fixed split:
1,438 training / 359 held-out images), a small SDT-H (widths 32-64-128-256, depths 1-1-2-1, 1.6M parameters) with
the paper's recipe at a small scale (batch 64, lr 2e-3, no horizontal flips for digits, EMA 0.99) for
``--epochs`` epochs (default 30, the CPU example's budget); at 32x32 the stages see 8x8, 4x4, 2x2 and 1x1 tokens.

    python benchmarks/ablation_classification.py --table 3 --seeds 0 1 2 --output-dir outputs/ablation_classification

On ImageNet (GPUs), the same script with the data and a launcher: the paper's recipe at its defaults (SDT-H-T, 300
epochs, batch 1024):

    python benchmarks/ablation_classification.py --table 3 --data-dir /data/imagenet/train \\
        --eval-data-dir /data/imagenet/val --launcher "accelerate launch --multi_gpu --num_processes 8" --seeds 0 \\
        --output-dir runs/ablation_cls

A finished run (``training_done.json``) is not trained again and an interrupted one resumes from its last
checkpoint: rerun the same command.  Runs of the same configuration are shared between tables (the "Ours" row of
Tables 3 and 4 and alpha 0.1 of Table 5 are one run).  Results: ``<output-dir>/results.md`` and
``<output-dir>/results.json``.
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
from typing import NamedTuple

from sdt_diffusion.attention import DECAY_MODES, decay_mode
from sdt_diffusion.models.sdt_h import sdt_h_preset
from sdt_diffusion.tools.digits import prepare_digits

REPO = Path(__file__).resolve().parent.parent
# The paper's ImageNet-1K top-1 (%) of each row, for the reader's comparison: Tables 3-5 (SDT-H-T) and, for the
# rmt row, RMT-T in Table 1.
PAPER_TOP1 = {"none": 81.9, "fixed": 82.4, "1d": 82.2, "bidirectional": 82.3, "decomposed": 82.5, "cdsf": 82.7,
              "rmt": 82.4, "alpha=0.05": 82.5, "alpha=0.1": 82.7, "alpha=0.15": 82.6, "alpha=0.2": 82.4}
TABLES = (3, 4, 5)
# The RMT preset of each SDT-H size (the rmt row of Table 3).
RMT_OF = {"SDT-H-T": "RMT-T", "SDT-H-S": "RMT-S", "SDT-H-B": "RMT-B"}
DIGITS_MODEL = {"embed_dims": [32, 64, 128, 256], "depths": [1, 1, 2, 1], "num_heads": [2, 2, 4, 8],
                "head_hidden_size": 256}
DIGITS_ARGS = ["--resolution", "32", "--global-batch-size", "64", "--learning-rate", "2e-3", "--lr-base-batch", "64",
               "--warmup-epochs", "2", "--hflip", "0", "--repeated-aug", "1", "--ema-decay", "0.99",
               "--num-workers", "0", "--report-to", "none", "--no-progress-bar"]


class Row(NamedTuple):
    """One row of a table: what is trained (preset, decay per stage, alpha) and where its runs live."""

    name: str  # the results key (and the PAPER_TOP1 key)
    label: str  # what the paper calls it
    model: str
    decay_modes: tuple[str, ...]
    alpha: float | None = None  # None: the preset's

    @property
    def folder(self) -> str:
        """One folder per configuration, so that equal rows of different tables share their runs."""
        alpha = "" if self.alpha is None else f"_alpha{self.alpha:g}"
        return f"{self.model}_{'-'.join(self.decay_modes)}{alpha}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--table", type=int, default=None, choices=TABLES,
                      help="the paper's table whose rows are trained: 3 (decay: none / RMT's fixed / SDT-H, and the "
                           "RMT preset), 4 (2D fusion in the global stages), 5 (alpha) (default: 3, unless --modes)")
    rows.add_argument("--modes", nargs="+", default=None, choices=DECAY_MODES,
                      help="instead of a table: one row per decay mode, that mode in --stages")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds per row (default: 0 1 2)")
    p.add_argument("--stages", type=str, default=None,
                   help="with --modes: 1-based stages that take the mode under test, e.g. 3,4 (default: all on "
                        "digits, 3,4 with --data-dir); the other stages keep the preset's decay")
    p.add_argument("--epochs", type=int, default=30,
                   help="digits: training epochs per run (default: 30, the CPU example's budget; after 10 epochs the "
                        "attention branch is still too small for the decay to change the predictions)")
    p.add_argument("--data-root", type=str, default="outputs/digits32",
                   help="digits: where the image folders go (default: outputs/digits32)")
    p.add_argument("--data-dir", type=str, default=None, help="training image folder (ImageNet mode)")
    p.add_argument("--eval-data-dir", type=str, default=None, help="validation image folder (ImageNet mode)")
    p.add_argument("--model", type=str, default="SDT-H-T", choices=sorted(RMT_OF),
                   help="the SDT-H preset the rows are built from (default: SDT-H-T)")
    p.add_argument("--launcher", type=str, default=None,
                   help="command prefix that runs the training script (default: this Python)")
    p.add_argument("--train-args", type=str, default="",
                   help="more flags for train_classifier.py (appended last, so they override the defaults here)")
    p.add_argument("--output-dir", type=str, default="outputs/ablation_classification",
                   help="folder of the runs and the results (default: outputs/ablation_classification)")
    return p


def stage_modes(mode: str, stages: list[int], base: tuple[str, ...]) -> list[str]:
    """The per-stage decay of a ``--modes`` row: ``mode`` in ``stages`` (1-based), ``base`` (the preset's) elsewhere."""
    return [mode if i + 1 in stages else base[i] for i in range(len(base))]


def table_rows(table: int, model: str) -> list[Row]:
    """The rows of the paper's Table ``table`` built from preset ``model`` (see the module docstring)."""
    base = tuple(sdt_h_preset(model)["decay_modes"])
    axial = [decay_mode(m).axial is not None for m in base]  # the stages the preset decomposes
    if table == 3:
        rmt = RMT_OF[model]
        return [Row("none", "No decay", model, ("none",) * len(base)),
                Row("fixed", "Spatial Decay (RMT's)", model,
                    tuple("fixed_decomposed" if a else "fixed" for a in axial)),
                Row("cdsf", "Ours (SDT-H)", model, base),
                Row("rmt", f"{rmt} (Table 1)", rmt, tuple(sdt_h_preset(rmt)["decay_modes"]))]
    if table == 4:
        return [Row(m, f"{m} in the global stages", model, tuple(b if a else m for a, b in zip(axial, base)))
                for m in ("1d", "bidirectional", "decomposed", "cdsf")]
    if table == 5:  # alpha 0.1 is the preset's: the same run as "Ours"
        return [Row(f"alpha={a:g}", f"alpha = {a:g}", model, base, None if a == 0.1 else a)
                for a in (0.05, 0.1, 0.15, 0.2)]
    raise ValueError(f"--table must be one of {TABLES}, got {table!r}")


def mode_rows(modes: list[str], stages: list[int], model: str) -> list[Row]:
    """One row per decay mode (``--modes``), in the folders ``<mode>/`` as before the tables existed."""
    base = tuple(sdt_h_preset(model)["decay_modes"])
    return [Row(m, m, model, tuple(stage_modes(m, stages, base))) for m in modes]


def describe(row: Row) -> str:
    """Which stage takes which mode (and the preset, alpha) in ``row``, for the log and the table."""
    stages = ", ".join(f"stage {i + 1} {m}" for i, m in enumerate(row.decay_modes))
    return f"{row.model}: {stages}" + ("" if row.alpha is None else f"; alpha {row.alpha:g}")


def run_command(args: argparse.Namespace, row: Row, seed: int, out: Path, data: tuple[Path, Path]) -> list[str]:
    """The training command of one (row, seed) run."""
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    cmd = [*launcher, str(REPO / "training" / "train_classifier.py"), "--model", row.model,
           "--data-dir", str(data[0]), "--eval-data-dir", str(data[1]), "--seed", str(seed),
           "--decay-mode", ",".join(row.decay_modes), "--output-dir", str(out), "--resume", "auto"]
    if row.alpha is not None:
        cmd += ["--alpha", str(row.alpha)]
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
    head = ("| row | final top-1, online (%) | final top-1, EMA (%) | best epoch, max(online, EMA) (%) | "
            "paper, ImageNet (Tables 1, 3-5) | trained |\n|---|---|---|---|---|---|\n")
    rows = ""
    for name, entry in results.items():
        runs = entry["runs"]
        rows += (f"| {name} | {mean_std([r['final_top1'] for r in runs])} | "
                 f"{mean_std([r['final_top1_ema'] for r in runs])} | {mean_std([r['best_top1'] for r in runs])} | "
                 f"{PAPER_TOP1.get(name, '-')} | {entry.get('trained', '')} |\n")
    return head + rows + f"\nMean ± sample std over seeds {', '.join(map(str, seeds))}.\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.data_dir is None) != (args.eval_data_dir is None):
        print("ablation_classification.py: error: pass both --data-dir and --eval-data-dir (or neither: digits)",
              file=sys.stderr)
        return 2
    if args.stages is not None and args.modes is None:
        print("ablation_classification.py: error: --stages applies to --modes only (a --table row sets every "
              "stage's decay itself)", file=sys.stderr)
        return 2
    stages = None
    if args.modes is not None:
        stages = [int(s) for s in (args.stages or ("1,2,3,4" if args.data_dir is None else "3,4")).split(",")]
        rows = mode_rows(args.modes, stages, args.model)
    else:
        args.table = 3 if args.table is None else args.table
        rows = table_rows(args.table, args.model)
    for row in rows:
        print(f"[ablation] {row.name} ({row.label}): {describe(row)}", flush=True)
    if args.data_dir is None:
        digits = prepare_digits(Path(args.data_root), resolution=32)
        data = (digits.train_dir, digits.heldout_dir)
    else:
        data = (Path(args.data_dir), Path(args.eval_data_dir))
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for row in rows:
        results[row.name] = {"label": row.label, "model": row.model, "decay_modes": list(row.decay_modes),
                             "alpha": row.alpha, "trained": describe(row), "runs": []}
        for seed in args.seeds:
            out = root / (row.name if args.modes is not None else row.folder) / f"seed{seed}"
            if not (out / "training_done.json").is_file():
                cmd = run_command(args, row, seed, out, data)
                print(f"[ablation] {row.name} seed {seed}: {shlex.join(cmd)}", flush=True)
                start = time.time()
                proc = subprocess.run(cmd, cwd=REPO)
                if proc.returncode != 0:
                    print(f"ablation_classification.py: error: the {row.name} seed {seed} run failed "
                          f"(exit {proc.returncode}); rerun to resume it", file=sys.stderr)
                    return 1
                print(f"[ablation] {row.name} seed {seed}: {time.time() - start:.0f} s", flush=True)
            results[row.name]["runs"].append({"seed": seed, **read_run(out)})
    text = table(results, args.seeds)
    meta = {"date": datetime.date.today().isoformat(), "command": shlex.join([sys.executable, *sys.argv]),
            "machine": platform.processor() or platform.machine(), "table": None if args.modes else args.table,
            "stages": stages, "data": [str(d) for d in data]}
    (root / "results.json").write_text(json.dumps({"meta": meta, "modes": results}, indent=2))
    (root / "results.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
