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

``--figure3`` trains SDT-H against RMT (issue 23, section 3): the rows ``rmt`` (the RMT preset of the same size),
``none`` (SDT-H without decay), ``sdt-h`` (the preset, the same run as Table 3's "Ours"), ``sdt-h+unit-gate``
(the output gate U exactly 1 at start, ``output_gate_init="unit"``) and ``sdt-h+rmt-decay`` (the decay gates'
bias at RMT's gamma, ``decay_gate_init="rmt"``), or those named by ``--rows``.  Besides the table (final top-1 and
held-out loss, mean ± std) it plots every row's training loss (smoothed over an epoch) and held-out loss against
the epoch, the mean over seeds with the min-max band (``--figure``, default ``<output-dir>/sdt_h_vs_rmt_loss.png``).

On the CPU (default): scikit-learn's digits, upscaled to 32x32 (``sdt_diffusion.tools.digits``, fixed split:
1,438 training / 359 held-out images), a small SDT-H (widths 32-64-128-256, depths 1-1-2-1, 1.6M parameters) with
the paper's recipe at a small scale (batch 64, lr 2e-3, no horizontal flips for digits, EMA 0.99) for
``--epochs`` epochs (default 30, the CPU example's budget); at 32x32 the stages see 8x8, 4x4, 2x2 and 1x1 tokens.
Every step's training loss is logged (``--log-every 1``).  Harder digits runs: ``--train-per-class N`` trains on
the first N training images of each class after a fixed seeded shuffle (the same images for every row and seed;
the held-out set is unchanged) and ``--head-hidden-size`` narrows the head (default 256).

    python benchmarks/ablation_classification.py --table 3 --seeds 0 1 2 --output-dir outputs/ablation_classification

On ImageNet (GPUs), the same script with the data and a launcher: the paper's recipe at its defaults (SDT-H-T, 300
epochs, batch 1024):

    python benchmarks/ablation_classification.py --table 3 --data-dir /data/imagenet/train \\
        --eval-data-dir /data/imagenet/val --launcher "accelerate launch --multi_gpu --num_processes 8" --seeds 0 \\
        --output-dir runs/ablation_cls

A finished run (``training_done.json``) is not trained again and an interrupted one resumes from its last
checkpoint: rerun the same command.  A finished run trained with other flags (budget, data, model) is refused
(exit 2) rather than reused: give another ``--output-dir``.  ``--train-per-class`` and ``--head-hidden-size`` add
``_tpc<N>`` / ``_head<H>`` to the run folders, so those variants live side by side.  Runs of the same configuration are shared between tables (the "Ours" row of
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
from typing import Any, NamedTuple

import yaml

from sdt_diffusion.attention import DECAY_MODES, decay_mode
from sdt_diffusion.models.sdt_h import sdt_h_preset
from sdt_diffusion.tools.digits import digits_train_subset, prepare_digits
from sdt_diffusion.training.classifier_config import parse_args as parse_trainer_args
from sdt_diffusion.training.flags import plain
from sdt_diffusion.utils.errors import ConfigError
from sdt_diffusion.utils.optional import import_optional
from sdt_diffusion.utils.safe_yaml import load_yaml

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
               "--num-workers", "0", "--report-to", "none", "--no-progress-bar", "--log-every", "1"]
# Figure 3 of issue 23: SDT-H against RMT, with the initialisations the paper leaves open (docs/sdt_h.md).
FIGURE3_ROWS = ("rmt", "none", "sdt-h", "sdt-h+unit-gate", "sdt-h+rmt-decay")
FIGURE_NAME = "sdt_h_vs_rmt_loss.png"
# Trainer flags that do not change what a run computes (a finished run with other values is still the same run).
NOT_THE_RUN = {"output_dir", "resume", "overwrite", "allow_inexact_resume", "log_every", "report_to",
               "tracker_project", "progress_bar", "num_workers", "verify_images", "eval_batch_size",
               "attention_backend", "checkpoint_every", "keep_checkpoints", "config"}


class Row(NamedTuple):
    """One row of a table: what is trained (preset, decay per stage, alpha) and where its runs live."""

    name: str  # the results key (and the PAPER_TOP1 key)
    label: str  # what the paper calls it
    model: str
    decay_modes: tuple[str, ...]
    alpha: float | None = None  # None: the preset's
    model_kwargs: tuple[tuple[str, Any], ...] = ()  # other SDT-H arguments (the gate initialisations)

    @property
    def folder(self) -> str:
        """One folder per configuration, so that equal rows of different tables share their runs."""
        alpha = "" if self.alpha is None else f"_alpha{self.alpha:g}"
        extra = "".join(f"_{k}-{v}" for k, v in self.model_kwargs)
        return f"{self.model}_{'-'.join(self.decay_modes)}{alpha}{extra}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--table", type=int, default=None, choices=TABLES,
                      help="the paper's table whose rows are trained: 3 (decay: none / RMT's fixed / SDT-H, and the "
                           "RMT preset), 4 (2D fusion in the global stages), 5 (alpha) (default: 3, unless --modes)")
    rows.add_argument("--modes", nargs="+", default=None, choices=DECAY_MODES,
                      help="instead of a table: one row per decay mode, that mode in --stages")
    rows.add_argument("--figure3", action="store_true",
                      help="SDT-H against RMT (rows: " + ", ".join(FIGURE3_ROWS) + "): the table and the loss "
                           "curves of every row (training and held-out loss, mean and min-max over seeds)")
    p.add_argument("--rows", nargs="+", default=None, choices=FIGURE3_ROWS,
                   help="with --figure3: the rows to train (default: all)")
    p.add_argument("--figure", type=str, default=None,
                   help=f"with --figure3: where the plot goes (default: <output-dir>/{FIGURE_NAME}; the docs show "
                        f"docs/images/{FIGURE_NAME})")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="digits: train on the first N training images of each class after a fixed seeded shuffle "
                        "(the same for every row and seed; the held-out set is unchanged)")
    p.add_argument("--head-hidden-size", type=int, default=None,
                   help=f"digits: width of the head's projection (default: {DIGITS_MODEL['head_hidden_size']})")
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


def figure3_rows(names: list[str], model: str) -> list[Row]:
    """The rows of ``--figure3`` (see the module docstring), in the order of ``names``."""
    base = tuple(sdt_h_preset(model)["decay_modes"])
    rmt = RMT_OF[model]
    table = {
        "rmt": Row("rmt", f"{rmt} (RMT)", rmt, tuple(sdt_h_preset(rmt)["decay_modes"])),
        "none": Row("none", "SDT-H without decay", model, ("none",) * len(base)),
        "sdt-h": Row("sdt-h", "SDT-H", model, base),
        "sdt-h+unit-gate": Row("sdt-h+unit-gate", "SDT-H, output gate U = 1 at start", model, base,
                               model_kwargs=(("output_gate_init", "unit"),)),
        "sdt-h+rmt-decay": Row("sdt-h+rmt-decay", "SDT-H, decay gates start at RMT's gamma", model, base,
                               model_kwargs=(("decay_gate_init", "rmt"),)),
    }
    return [table[name] for name in names]


def describe(row: Row) -> str:
    """Which stage takes which mode (and the preset, alpha, other arguments) in ``row``, for the log and the table."""
    stages = ", ".join(f"stage {i + 1} {m}" for i, m in enumerate(row.decay_modes))
    extra = "".join(f"; {k} {v}" for k, v in row.model_kwargs)
    return f"{row.model}: {stages}" + ("" if row.alpha is None else f"; alpha {row.alpha:g}") + extra


def run_command(args: argparse.Namespace, row: Row, seed: int, out: Path, data: tuple[Path, Path]) -> list[str]:
    """The training command of one (row, seed) run."""
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    cmd = [*launcher, str(REPO / "training" / "train_classifier.py"), "--model", row.model,
           "--data-dir", str(data[0]), "--eval-data-dir", str(data[1]), "--seed", str(seed),
           "--decay-mode", ",".join(row.decay_modes), "--output-dir", str(out), "--resume", "auto"]
    if row.alpha is not None:
        cmd += ["--alpha", str(row.alpha)]
    if args.data_dir is None:
        kwargs = {**DIGITS_MODEL, **({} if args.head_hidden_size is None else {"head_hidden_size": args.head_hidden_size}),
                  **dict(row.model_kwargs)}
        cmd += ["--model-kwargs", json.dumps(kwargs), "--epochs", str(args.epochs), *DIGITS_ARGS]
    elif row.model_kwargs:
        cmd += ["--model-kwargs", json.dumps(dict(row.model_kwargs))]
    return cmd + shlex.split(args.train_args)


def run_folder(args: argparse.Namespace, row: Row) -> str:
    """The folder of ``row``'s runs: the configuration, and the digits variant (``_tpc<N>``, ``_head<H>``)."""
    name = row.name if args.modes is not None else row.folder
    if args.train_per_class is not None:
        name += f"_tpc{args.train_per_class}"
    if args.head_hidden_size is not None:
        name += f"_head{args.head_hidden_size}"
    return name


def other_run_flags(out: Path, cmd: list[str]) -> list[str]:
    """The flags in which the finished run in ``out`` differs from training command ``cmd`` (what it computes:
    data, model, budget, recipe, seed), read from its ``train_config.yaml``; empty if none differ or no record."""
    try:
        recorded = load_yaml(out / "train_config.yaml")
    except (OSError, ValueError, yaml.YAMLError):
        return []
    script = next(i for i, part in enumerate(cmd) if part.endswith("train_classifier.py"))
    wanted = plain(vars(parse_trainer_args(cmd[script + 1:])))
    differ = []
    for key, value in wanted.items():
        if key in NOT_THE_RUN or key not in recorded:
            continue
        old = recorded[key]
        if key == "model_kwargs":
            value, old = json.loads(value or "{}"), json.loads(old or "{}")
        if old != value:
            differ.append(f"--{key.replace('_', '-')} {old!r} (wanted {value!r})")
    return differ


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
            "best_weights": best["weights"], "steps": final["step"], "final_eval_loss": final.get("eval_loss"),
            "final_eval_loss_ema": final.get("eval_loss_ema"),
            "train_seconds": max((r["time"] for r in train), default=None)}


def read_curves(out: Path) -> dict:
    """A run's training loss per logged step and its held-out loss and top-1 per evaluation, against the epoch
    (``step / steps_per_epoch``); a step logged twice (a resumed run) counts once, with its last record."""
    by_step: dict[tuple[str, int], dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            kind = "eval" if "eval_top1" in record else "train" if "loss" in record else None
            if kind:
                by_step[(kind, record["step"])] = record
    per_epoch = load_yaml(out / "train_config.yaml")["steps_per_epoch"]
    train = [by_step[k] for k in sorted(k for k in by_step if k[0] == "train")]
    evals = [by_step[k] for k in sorted(k for k in by_step if k[0] == "eval")]
    return {"steps_per_epoch": per_epoch,
            "train_epoch": [r["step"] / per_epoch for r in train], "train_loss": [r["loss"] for r in train],
            "eval_epoch": [r["step"] / per_epoch for r in evals], "eval_loss": [r["eval_loss"] for r in evals],
            "eval_loss_ema": [r["eval_loss_ema"] for r in evals], "eval_top1": [r["eval_top1"] for r in evals]}


def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


# Columns of the results table: (header, run key, digits); None as the key is the paper's ImageNet top-1.
TABLE_COLUMNS = [("final top-1, online (%)", "final_top1", 2), ("final top-1, EMA (%)", "final_top1_ema", 2),
                 ("best epoch, max(online, EMA) (%)", "best_top1", 2), ("paper, ImageNet (Tables 1, 3-5)", None, 0)]
FIGURE3_COLUMNS = [("final top-1, online (%)", "final_top1", 2), ("final top-1, EMA (%)", "final_top1_ema", 2),
                   ("final held-out loss, online", "final_eval_loss", 4),
                   ("final held-out loss, EMA", "final_eval_loss_ema", 4),
                   ("best epoch, max(online, EMA) (%)", "best_top1", 2)]


def table(results: dict, seeds: list[int], columns: list[tuple[str, str | None, int]] = TABLE_COLUMNS) -> str:
    """One row per entry of ``results``: each column's mean ± sample std over seeds, then how it was trained."""
    headers = [h for h, _, _ in columns] + ["trained"]
    text = f"| row | {' | '.join(headers)} |\n|{'---|' * (len(headers) + 1)}\n"
    for name, entry in results.items():
        runs = entry["runs"]
        cells = [str(PAPER_TOP1.get(name, "-")) if key is None else mean_std([r[key] for r in runs], digits)
                 for _, key, digits in columns]
        text += f"| {name} | {' | '.join(cells)} | {entry.get('trained', '')} |\n"
    return text + f"\nMean ± sample std over seeds {', '.join(map(str, seeds))}.\n"


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_figure3(curves: dict[str, list[dict]], labels: dict[str, str], path: Path) -> None:
    """Two panels: training loss (smoothed over one epoch) and held-out loss (online weights) against the epoch;
    per row the mean over seeds and the band between the lowest and highest seed."""
    import_optional("matplotlib", "demo").use("Agg")  # optional dependency: imported only to draw
    plt = import_optional("matplotlib.pyplot", "demo")
    np = import_optional("numpy", "demo")
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, runs) in enumerate(curves.items()):
        colour = f"C{i}"
        per_epoch = max(1, round(len(runs[0]["train_loss"]) / max(1e-9, runs[0]["train_epoch"][-1])))
        for ax, xs, ys in ((train_ax, "train_epoch", [smooth(r["train_loss"], per_epoch) for r in runs]),
                           (eval_ax, "eval_epoch", [r["eval_loss"] for r in runs])):
            n = min(len(y) for y in ys)  # the seeds log the same steps; an unfinished run is cut to the shortest
            x = np.asarray(runs[0][xs][:n])
            y = np.asarray([y[:n] for y in ys])
            seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
            ax.plot(x, y.mean(0), color=colour, label=f"{labels[name]} ({seeds})")
            if len(runs) > 1:
                ax.fill_between(x, y.min(0), y.max(0), color=colour, alpha=0.2, linewidth=0)
    train_ax.set(title="training loss (smoothed over one epoch)", xlabel="epoch", ylabel="loss (Mixup/CutMix targets)")
    eval_ax.set(title="held-out loss (online weights)", xlabel="epoch", ylabel="cross-entropy")
    held_out = [v for runs in curves.values() for r in runs for v in r["eval_loss"]]
    if held_out and min(held_out) > 0 and max(held_out) / min(held_out) > 10:  # falls by orders of magnitude
        eval_ax.set_yscale("log")
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
    eval_ax.legend(fontsize=8)
    fig.suptitle("SDT-H against RMT: mean over seeds, band = min to max")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    for name, value in (("--rows", args.rows), ("--figure", args.figure)):
        if value is not None and not args.figure3:
            print(f"ablation_classification.py: error: {name} applies to --figure3 only", file=sys.stderr)
            return 2
    for name, value, low in (("--train-per-class", args.train_per_class, 1),
                             ("--head-hidden-size", args.head_hidden_size, 1)):
        if value is not None and args.data_dir is not None:
            print(f"ablation_classification.py: error: {name} applies to the digits only (not with --data-dir)",
                  file=sys.stderr)
            return 2
        if value is not None and value < low:
            print(f"ablation_classification.py: error: {name} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    stages = None
    if args.modes is not None:
        stages = [int(s) for s in (args.stages or ("1,2,3,4" if args.data_dir is None else "3,4")).split(",")]
        rows = mode_rows(args.modes, stages, args.model)
    elif args.figure3:
        rows = figure3_rows(args.rows or list(FIGURE3_ROWS), args.model)
    else:
        args.table = 3 if args.table is None else args.table
        rows = table_rows(args.table, args.model)
    for row in rows:
        print(f"[ablation] {row.name} ({row.label}): {describe(row)}", flush=True)
    if args.data_dir is None:
        digits = prepare_digits(Path(args.data_root), resolution=32)
        data = (digits.train_dir, digits.heldout_dir)
        if args.train_per_class is not None:
            try:
                data = (digits_train_subset(digits, Path(args.data_root), args.train_per_class), digits.heldout_dir)
            except ValueError as e:
                print(f"ablation_classification.py: error: --train-per-class: {e}", file=sys.stderr)
                return 2
            print(f"[ablation] training on {args.train_per_class} images per class ({data[0]}); held-out: "
                  f"{data[1]} ({len(digits.heldout_labels)} images)", flush=True)
    else:
        data = (Path(args.data_dir), Path(args.eval_data_dir))
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    curves: dict[str, list[dict]] = {}
    for row in rows:
        results[row.name] = {"label": row.label, "model": row.model, "decay_modes": list(row.decay_modes),
                             "alpha": row.alpha, "model_kwargs": dict(row.model_kwargs), "trained": describe(row),
                             "runs": []}
        for seed in args.seeds:
            out = root / run_folder(args, row) / f"seed{seed}"
            cmd = run_command(args, row, seed, out, data)
            if (out / "training_done.json").is_file():
                try:
                    differ = other_run_flags(out, cmd)
                except ConfigError as e:
                    print(f"ablation_classification.py: error: {e}", file=sys.stderr)
                    return 2
                if differ:
                    print(f"ablation_classification.py: error: {out} holds a finished run trained with other flags "
                          f"({'; '.join(differ)}); give another --output-dir", file=sys.stderr)
                    return 2
            else:
                print(f"[ablation] {row.name} seed {seed}: {shlex.join(cmd)}", flush=True)
                start = time.time()
                proc = subprocess.run(cmd, cwd=REPO)
                if proc.returncode != 0:
                    print(f"ablation_classification.py: error: the {row.name} seed {seed} run failed "
                          f"(exit {proc.returncode}); rerun to resume it", file=sys.stderr)
                    return 1
                print(f"[ablation] {row.name} seed {seed}: {time.time() - start:.0f} s", flush=True)
            results[row.name]["runs"].append({"seed": seed, **read_run(out)})
            if args.figure3:
                curves.setdefault(row.name, []).append(read_curves(out))
    text = table(results, args.seeds, FIGURE3_COLUMNS if args.figure3 else TABLE_COLUMNS)
    meta = {"date": datetime.date.today().isoformat(), "command": shlex.join([sys.executable, *sys.argv]),
            "machine": platform.processor() or platform.machine(),
            "table": None if args.modes or args.figure3 else args.table, "figure3": args.figure3, "stages": stages,
            "data": [str(d) for d in data], "train_per_class": args.train_per_class,
            "head_hidden_size": args.head_hidden_size, "epochs": args.epochs if args.data_dir is None else None}
    (root / "results.json").write_text(json.dumps({"meta": meta, "modes": results}, indent=2))
    (root / "results.md").write_text(text)
    if args.figure3:
        figure = Path(args.figure) if args.figure else root / FIGURE_NAME
        plot_figure3(curves, {row.name: row.label for row in rows}, figure)
        text += f"\nLoss curves: {figure}\n"
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
