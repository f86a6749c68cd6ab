"""One prepared GPU check: every measurement a lent GPU should make of this code, in one command.

Steps, in this order, each a subprocess with its own time limit (a hang or crash in one step does not stop
the next); after every step the results so far go to ``results.json`` and ``summary.md`` in the output
folder, so a run cut short still reports what finished:

0. ``env``             GPU name, driver, torch/CUDA versions, ``nvidia-smi``; the bf16 matrix-product rate
                       measured on the device, and the datasheet peak MFU is held against (with its source).
1. ``setup``           ``pip install -e ".[test]"`` against the machine's torch (pinned, never reinstalled);
                       offline, ``--no-deps`` and what is missing is listed; later steps needing it are skipped.
2. ``cuda_tests``      ``pytest -m cuda``: the tests that only run on a CUDA device.
3. ``models_eager``    SDT-P vs diffusers' DiT (``benchmarks/harness.py``): training step, peak memory, MFU,
   ``models_compiled`` guided sampling throughput, bf16 autocast; eager, then under ``torch.compile``.
   ``attention``       the attention core alone at 256 and 1024 tokens, per backend.
4. ``train_smoke``     ``accelerate launch training/train.py`` on random latents (bf16, compile), a checkpoint
                       half-way and an exact-resume check, then ``eval/sample.py`` on the exported pipeline.
5. ``sdt_h``           SDT-H-T vs timm's convnext_tiny and swin_tiny (``benchmarks/sdt_h_speed.py``).
6. ``profile``         ``torch.profiler``'s top 15 kernels of the worst row whose target was missed.

    python benchmarks/gpu_check.py --output-dir gpu_check_results           # full run: fits 9 minutes on an H100
    python benchmarks/gpu_check.py --quick --output-dir gpu_check_results   # steps 0-3 at S/2 and XL/2: < 5 minutes
    python benchmarks/gpu_check.py --dry-run --output-dir /tmp/check         # CPU, toy sizes: the plumbing only

Every target (``TARGETS``) ends as pass, miss or not-run; a number appears only where a step measured it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent
RESULTS_JSON = "results.json"
SUMMARY_MD = "summary.md"
LOG = "gpu_check.log"
MODES = ("full", "quick", "dry-run")
STEP_EXIT_FAILED = 1

# Dense bf16 tensor-core peaks (TFLOP/s) by NVIDIA's datasheets (the sparse figure halved); matched in order
# against the device name, so the NVL and PCIe parts come before the plain names (SXM, e.g. "NVIDIA H200").
PEAK_BF16_DENSE_TFLOPS: list[tuple[str, float, str]] = [
    ("H200 NVL", 835.0, "NVIDIA H200 NVL datasheet: 1,671 TFLOP/s bf16 with sparsity, 835 dense"),
    ("H100 NVL", 835.0, "NVIDIA H100 NVL datasheet: 1,671 TFLOP/s bf16 with sparsity, 835 dense"),
    ("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet: 1,513 TFLOP/s bf16 with sparsity, 756 dense"),
    ("H200", 989.0, "NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity, 989 dense (the H100's compute)"),
    ("H100", 989.0, "NVIDIA H100 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity, 989 dense"),
    ("A100", 312.0, "NVIDIA A100 datasheet: 624 TFLOP/s bf16 with sparsity, 312 dense"),
]


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Step:
    """One step of the check: its name, the issue's item, a title and the distributions it needs."""

    name: str
    item: str
    title: str
    requires: tuple[str, ...] = ()
    modes: tuple[str, ...] = MODES


STEPS: tuple[Step, ...] = (
    Step("env", "0", "environment: GPU, driver, torch/CUDA, nvidia-smi, measured bf16 matmul rate"),
    Step("setup", "1", "set-up from the checkout: pip install -e .[test] against the machine's torch"),
    Step("cuda_tests", "2", "CUDA tests: pytest -m cuda", ("sdt-diffusion", "pytest", "diffusers", "torch-fidelity")),
    Step("models_eager", "3", "SDT-P vs DiT, eager: training step, peak memory, MFU, guided sampling",
         ("sdt-diffusion", "diffusers")),
    Step("models_compiled", "3", "SDT-P vs DiT under torch.compile: training step, memory, MFU, sampling",
         ("sdt-diffusion", "diffusers"), ("full", "quick")),
    Step("attention", "3", "attention alone at 256 and 1024 tokens, per backend", ("sdt-diffusion", "diffusers")),
    Step("train_smoke", "4", "training smoke: accelerate launch, checkpoint, exact resume, eval/sample.py",
         ("sdt-diffusion", "diffusers", "datasets", "accelerate", "safetensors"), ("full", "dry-run")),
    Step("sdt_h", "5", "SDT-H-T vs timm convnext_tiny and swin_tiny", ("sdt-diffusion", "timm"),
         ("full", "dry-run")),
    Step("profile", "-", "torch.profiler top 15 kernels of the worst missed row", ("sdt-diffusion", "diffusers")),
)
STEP_NAMES = tuple(s.name for s in STEPS)

# Time limit of each step (seconds) and of the whole run, per mode.  The full run's steps need about 8
# minutes on an H100 (set-up offline or from carried wheels); the limits cap a hang.
TIME_LIMITS: dict[str, dict[str, float]] = {
    "full": {"env": 45, "setup": 120, "cuda_tests": 100, "models_eager": 100, "models_compiled": 150,
             "attention": 30, "train_smoke": 180, "sdt_h": 60, "profile": 60},
    "quick": {"env": 30, "setup": 90, "cuda_tests": 90, "models_eager": 45, "models_compiled": 120,
              "attention": 20, "profile": 40},
    "dry-run": dict.fromkeys(STEP_NAMES, 180.0),
}
BUDGETS = {"full": 540.0, "quick": 290.0, "dry-run": 900.0}


def mode_settings(mode: str) -> dict[str, Any]:
    """Sizes, batches and repeats of the measuring steps in ``mode`` (dry run: toy sizes on the CPU)."""
    if mode == "dry-run":
        return {"device": "cpu", "sizes": ["toy"], "patch_size": 4, "batch": 2, "sample_batch": 1,
                "sample_steps": 250, "warmup": 1, "repeats": 2, "memory": False, "target_size": "toy",
                "attn_tokens": [16], "attn_size": "toy", "attn_batch": 2, "compile": False,
                "smoke": {"model_kwargs": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
                                           "gate_rank": 4, "lpe_kernel_size": 3},
                          "latent_side": 8, "vae_levels": 2, "samples": 16, "classes": 2, "batch": 4, "steps": 4,
                          "sample_images": 4, "sample_batch": 2, "sample_steps": 2, "compile": False,
                          "mixed_precision": "no"},
                "sdt_h": {"models": ["sdt_h_tiny", "convnext_tiny"], "batch": 1, "size": 64, "warmup": 0,
                          "repeats": 1, "memory": False},
                "profile_steps": 1}
    sizes = ["S", "XL"] if mode == "quick" else ["S", "B", "L", "XL"]
    return {"device": "cuda", "sizes": sizes, "patch_size": 2, "batch": 32, "sample_batch": 64, "sample_steps": 250,
            "warmup": 3, "repeats": 10, "memory": True, "target_size": "XL", "attn_tokens": [256, 1024],
            "attn_size": "XL", "attn_batch": 32, "compile": True,
            "smoke": {"model_kwargs": None, "latent_side": 32, "vae_levels": 4, "samples": 1024, "classes": 10,
                      "batch": 32, "steps": 100, "sample_images": 256, "sample_batch": 64, "sample_steps": 50,
                      "compile": True, "mixed_precision": "bf16"},
            "sdt_h": {"models": ["sdt_h_tiny", "convnext_tiny", "swin_tiny_patch4_window7_224"], "batch": 128,
                      "size": 224, "warmup": 3, "repeats": 10, "memory": True},
            "profile_steps": 3}


# ------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """A number the check holds the code against: ``value <= threshold`` (``at_most``) or ``>=``."""

    name: str
    description: str
    threshold: float
    at_most: bool
    unit: str = ""


TARGETS: tuple[Target, ...] = (
    Target("setup_seconds", "set-up from the checkout (step 1)", 120.0, True, "s"),
    Target("cuda_tests_green", "all CUDA tests pass (step 2): passed / collected", 1.0, False, "all"),
    Target("train_time_ratio", "SDT-P/DiT training-step time at XL/2, eager, bf16, batch 32", 1.05, True),
    Target("train_time_ratio_compiled", "SDT-P/DiT training-step time at XL/2, compiled", 1.05, True),
    Target("train_memory_ratio", "SDT-P/DiT peak training memory at XL/2, eager", 1.05, True),
    Target("mfu_compiled", "MFU of SDT-P-XL/2, compiled, against the device's dense bf16 peak", 0.50, False, "%"),
    Target("sampling_throughput_ratio", "SDT-P/DiT guided sampling throughput, worst size, eager", 0.95, False),
    Target("resume_exact", "training smoke: the resumed run ends with the uninterrupted run's weights and losses",
           1.0, False, "exact"),
)


def _not_run(target: Target, reason: str) -> dict[str, Any]:
    return {"name": target.name, "description": target.description, "threshold": target.threshold,
            "at_most": target.at_most, "unit": target.unit, "value": None, "status": "not-run", "reason": reason}


def _judged(target: Target, value: float, row: dict[str, Any] | None = None, note: str = "") -> dict[str, Any]:
    ok = value <= target.threshold if target.at_most else value >= target.threshold
    entry = {"name": target.name, "description": target.description, "threshold": target.threshold,
             "at_most": target.at_most, "unit": target.unit, "value": value, "status": "pass" if ok else "miss",
             "reason": note}
    if row is not None:
        entry["row"] = row
    return entry


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def _step(results: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in results["steps"] if s["name"] == name)


def _why_missing(step: dict[str, Any]) -> str:
    if step["status"] in ("pending", "skipped"):
        return f"step {step['name']} did not run ({step.get('reason') or step['status']})"
    if step["status"] in ("failed", "timeout"):
        return f"step {step['name']} {step['status']} before measuring it"
    return f"step {step['name']} measured no such row"


def _model_row(step: dict[str, Any], kind: str, size: str) -> dict[str, Any] | None:
    for row in step.get("results", {}).get(kind, []):
        if row.get("size") == size:
            return row
    return None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target's status from the measured results: pass, miss or not-run (with the reason)."""
    settings = mode_settings(results["mode"])
    size = settings["target_size"]
    by_name = {t.name: t for t in TARGETS}
    out: list[dict[str, Any]] = []

    setup = _step(results, "setup")
    seconds = setup.get("results", {}).get("install_seconds")
    t = by_name["setup_seconds"]
    note = setup.get("results", {}).get("install_note")
    out.append(_judged(t, seconds, note=note or "") if seconds is not None else _not_run(t, note or _why_missing(setup)))

    tests = _step(results, "cuda_tests")
    counts = tests.get("results", {}).get("counts")
    t = by_name["cuda_tests_green"]
    if not counts:
        out.append(_not_run(t, _why_missing(tests)))
    elif counts["collected"] == 0:
        out.append(_not_run(t, "no test carries the cuda marker"))
    elif tests["results"].get("device_type") != "cuda":
        out.append(_not_run(t, f"all {counts['collected']} CUDA tests skipped: no CUDA device"))
    else:
        out.append(_judged(t, counts["passed"] / counts["collected"],
                           note=f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                                f"{counts['skipped']} skipped of {counts['collected']}"))

    for name, step_name, field in (("train_time_ratio", "models_eager", "time"),
                                   ("train_time_ratio_compiled", "models_compiled", "time"),
                                   ("train_memory_ratio", "models_eager", "memory"),
                                   ("mfu_compiled", "models_compiled", "mfu")):
        t, step = by_name[name], _step(results, step_name)
        row = _model_row(step, "train", size)
        if row is None:
            out.append(_not_run(t, _why_missing(step) + f" (training row {size})"))
            continue
        if field == "time":
            value = _ratio(row["sdt"]["time"]["median_s"], row["dit"]["time"]["median_s"])
        elif field == "memory":
            value = _ratio(row["sdt"].get("peak_mem_mib"), row["dit"].get("peak_mem_mib"))
        else:
            value = row["sdt"].get("mfu")
        where = {"step": step_name, "mode": "train", "size": size, "patch_size": row["patch_size"],
                 "batch": row["batch"], "compiled": bool(row.get("compiled"))}
        if value is None:
            why = {"memory": "peak memory not measured in this mode",
                   "mfu": "MFU needs a CUDA device and a known peak"}.get(field, "no time")
            out.append(_not_run(t, why))
        else:
            out.append(_judged(t, value, where, note=f"{size}/{row['patch_size']}, batch {row['batch']}"))

    t, step = by_name["sampling_throughput_ratio"], _step(results, "models_eager")
    ratios = [(_ratio(r["sdt"]["images_per_s"], r["dit"]["images_per_s"]), r)
              for r in step.get("results", {}).get("sample", [])]
    ratios = [(v, r) for v, r in ratios if v is not None]
    if not ratios:
        out.append(_not_run(t, _why_missing(step) + " (sampling rows)"))
    else:
        value, row = min(ratios, key=lambda vr: vr[0])
        out.append(_judged(t, value, {"step": "models_eager", "mode": "sample", "size": row["size"],
                                      "patch_size": row["patch_size"], "batch": row["batch"], "compiled": False},
                           note=f"worst of {', '.join(r['size'] + '/' + str(r['patch_size']) for _, r in ratios)}"))

    t, step = by_name["resume_exact"], _step(results, "train_smoke")
    resume = step.get("results", {}).get("resume")
    if not resume:
        out.append(_not_run(t, _why_missing(step) + " (resume check)"))
    else:
        out.append(_judged(t, 1.0 if resume["exact"] else 0.0,
                           note=f"losses equal: {resume['losses_equal']}, weights identical: "
                                f"{resume['weights_identical']}, largest weight difference "
                                f"{resume['max_abs_weight_diff']:.3g}"))
    return out


def worst_missed_row(targets: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The model row of the missed target farthest from its threshold (None when no row missed)."""
    missed = [t for t in targets if t["status"] == "miss" and t.get("row")]
    if not missed:
        return None

    def shortfall(t: dict[str, Any]) -> float:
        v, thr = t["value"], t["threshold"]
        return v / thr if t["at_most"] else (thr / v if v > 0 else float("inf"))

    worst = max(missed, key=shortfall)
    return {**worst["row"], "target": worst["name"], "value": worst["value"], "threshold": worst["threshold"]}


# ------------------------------------------------------------------------------------------------ reports
def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, int | float) else str(v)


def _fmt_target(t: dict[str, Any]) -> tuple[str, str]:
    """The threshold and value of a target as the summary shows them."""
    unit, v = t.get("unit", ""), t["value"]
    sign = "≤ " if t["at_most"] else "≥ "
    if unit == "all":
        return "all pass", "—" if v is None else f"{v:.1%} passed"
    if unit == "exact":
        return "exact", "—" if v is None else ("exact" if v >= 1 else "not exact")
    if unit == "%":
        return sign + f"{t['threshold']:.0%}", "—" if v is None else f"{v:.1%}"
    suffix = f" {unit}" if unit else ""
    return sign + _fmt(t["threshold"]) + suffix, "—" if v is None else _fmt(v) + suffix


def format_summary(results: dict[str, Any]) -> str:
    """The Markdown summary: environment, steps, targets, then each step's tables."""
    env = _step(results, "env").get("results", {})
    lines = [f"# GPU check ({results['mode']})", "",
             f"Started {results['started_utc']}; last written {results['updated_utc']}. "
             f"Command: `{results['command']}`. Commit {results.get('git_commit', 'unknown')}.", ""]
    if results["mode"] == "dry-run":
        lines += ["**Dry run**: toy sizes on the CPU; it tests the script, its numbers say nothing about speed.", ""]
    if env:
        peak = env.get("peak_bf16_dense_tflops") or {}
        matmul = env.get("matmul")
        lines += ["## Environment", "",
                  f"- device: {env.get('device', '—')}; driver {env.get('driver', '—')}; "
                  f"torch {env.get('torch', '—')}; CUDA {env.get('cuda', '—')}; python {env.get('python', '—')}",
                  f"- MFU peak: {_fmt(peak.get('value'))} TFLOP/s ({peak.get('source', 'none: MFU not computed')})",
                  f"- measured bf16 matrix product ({matmul['shape']}): {matmul['tflops']:.0f} TFLOP/s" if matmul
                  else "- bf16 matrix product: not measured (no CUDA device)", ""]
    lines += ["## Steps", "", "| # | step | status | wall (s) | limit (s) | note |", "|---|---|---|---|---|---|"]
    for s in results["steps"]:
        lines.append(f"| {s['item']} | {s['name']} | {s['status']} | {_fmt(s.get('wall_s'), '.1f')} | "
                     f"{_fmt(s.get('timeout_s'), '.3g')} | {s.get('reason') or ''} |")
    lines += ["", "## Targets", "", "| target | threshold | value | status | note |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        thr, value = _fmt_target(t)
        lines.append(f"| {t['description']} | {thr} | {value} | {t['status']} | {t.get('reason') or ''} |")
    for s in results["steps"]:
        res = s.get("results") or {}
        body = _step_tables(s["name"], res)
        if body:
            lines += ["", f"## {s['name']} ({s['status']})", "", *body]
    return "\n".join(lines) + "\n"


def _step_tables(name: str, res: dict[str, Any]) -> list[str]:
    if name == "setup" and res:
        missing = [k for k, v in res.get("packages", {}).items() if v is None]
        return [f"- install: {res.get('install_note', '')}",
                f"- missing distributions: {', '.join(missing) if missing else 'none'}"]
    if name == "cuda_tests" and res.get("counts"):
        c = res["counts"]
        out = [f"{c['collected']} collected: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
               f"{c['skipped']} skipped ({res.get('device_type')})."]
        out += [f"- FAILED `{f}`" for f in res.get("failing", [])]
        return out
    if name in ("models_eager", "models_compiled", "attention") and res.get("table"):
        out = [res["table"]]
        out += [f"- ERROR {e}" for e in res.get("errors", [])]
        return out
    if name == "train_smoke" and res:
        out = []
        for key in ("straight", "resumed"):
            run = res.get(key)
            if run:
                out.append(f"- {key} run: steps {run['steps']}, wall {run['wall_s']:.1f} s, median "
                           f"{_fmt(run.get('images_per_s_median'), '.4g')} img/s, loss {_fmt(run.get('loss_first'))} "
                           f"→ {_fmt(run.get('loss_last'))}, all finite: {_fmt(run.get('losses_finite'))}")
        if res.get("resume"):
            out.append(f"- resume exact: {_fmt(res['resume']['exact'])}")
        if res.get("sampling"):
            smp = res["sampling"]
            out.append(f"- eval/sample.py: {smp['images']} images {smp['shape']} in {smp['wall_s']:.1f} s "
                       f"(process start included)")
        return out
    if name in ("sdt_h", "profile") and res.get("table"):
        return [res.get("header", ""), "", res["table"]] if res.get("header") else [res["table"]]
    return []


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def write_reports(results: dict[str, Any], out_dir: Path) -> None:
    """Re-evaluate the targets and rewrite ``results.json`` and ``summary.md``."""
    results["updated_utc"] = _now()
    results["targets"] = evaluate_targets(results)
    _write_json_atomic(out_dir / RESULTS_JSON, results)
    tmp = out_dir / (SUMMARY_MD + ".tmp")
    tmp.write_text(format_summary(results))
    os.replace(tmp, out_dir / SUMMARY_MD)


# ------------------------------------------------------------------------------------------------ orchestration
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def installed_distributions(python: str, names: tuple[str, ...]) -> dict[str, str | None]:
    """Version of each distribution as ``python`` sees it (None: not installed), without importing them."""
    code = ("import json, sys\nfrom importlib import metadata\nout = {}\nfor n in sys.argv[1:]:\n"
            "    try:\n        out[n] = metadata.version(n)\n    except metadata.PackageNotFoundError:\n"
            "        out[n] = None\nprint(json.dumps(out))")
    proc = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else dict.fromkeys(names)


def _child_env(mode: str) -> dict[str, str]:
    """The steps' environment: offline hubs, unbuffered output; a dry run hides every GPU (CPU only, everywhere)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if mode == "dry-run":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_subprocess(cmd: list[str], timeout: float, log: Path, env: dict[str, str],
                   cwd: Path = REPO) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group, output appended to ``log``; (exit code or None on timeout, seconds).

    On timeout the whole group (the step and whatever it launched) gets SIGTERM, then SIGKILL after 5 s.
    """
    start = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            _stop_group(proc, signal.SIGTERM)
        finally:  # also when this process is stopped itself (SIGTERM, Ctrl-C): leave no step running
            _stop_group(proc, signal.SIGKILL)
    return rc, time.perf_counter() - start


def _stop_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group of ``proc`` (the step and all it started) and wait up to 5 s."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is gone already
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def partial_path(out_dir: Path, name: str) -> Path:
    """Where a step's process writes its results as it goes (merged into results.json, then removed)."""
    return out_dir / f".step-{name}.json"


def step_command(args: argparse.Namespace, name: str) -> list[str]:
    """The command running step ``name`` in a fresh process."""
    cmd = [args.python, str(Path(__file__).resolve()), "--run-step", name, "--output-dir", str(args.output_dir),
           "--mode", args.mode]
    if args.peak_tflops is not None:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.wheel_dir:
        cmd += ["--wheel-dir", str(args.wheel_dir)]
    return cmd


def run_check(args: argparse.Namespace, commands: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Run every step in order (``commands`` replaces a step's command, for tests); the final results."""
    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / LOG
    log.write_text("")
    limits = {**TIME_LIMITS[args.mode], **args.timeout}
    budget = args.budget if args.budget is not None else BUDGETS[args.mode]
    results: dict[str, Any] = {
        "script": "benchmarks/gpu_check.py", "mode": args.mode, "started_utc": _now(),
        "command": " ".join([Path(args.python).name, *sys.argv]) if commands is None else "run_check (test)",
        "git_commit": _git_commit(), "budget_s": budget, "settings": mode_settings(args.mode),
        "steps": [{"name": s.name, "item": s.item, "title": s.title, "status": "pending", "reason": "not reached"}
                  for s in STEPS],
    }
    write_reports(results, out_dir)
    start = time.perf_counter()
    for step in STEPS:
        entry = _step(results, step.name)
        reason = _skip_reason(step, args, results, budget - (time.perf_counter() - start))
        if reason:
            entry.update(status="skipped", reason=reason)
            print(f"[{step.item}] {step.name}: skipped ({reason})", flush=True)
            write_reports(results, out_dir)
            continue
        timeout = min(limits[step.name], budget - (time.perf_counter() - start))
        entry.update(status="running", reason="", timeout_s=round(timeout, 2), started_utc=_now())
        write_reports(results, out_dir)
        part = partial_path(out_dir, step.name)
        part.unlink(missing_ok=True)
        with open(log, "a") as f:
            f.write(f"\n===== [{step.item}] {step.name}: {step.title} ({_now()}, limit {timeout:.0f} s) =====\n")
        log_offset = log.stat().st_size
        cmd = (commands or {}).get(step.name) or step_command(args, step.name)
        rc, wall = run_subprocess(cmd, timeout, log, _child_env(args.mode))
        entry["wall_s"] = round(wall, 2)
        entry["returncode"] = rc
        if part.exists():
            try:
                entry["results"] = json.loads(part.read_text())
            except json.JSONDecodeError:  # cut off mid-write: nothing of it is trusted
                entry["results"] = {}
            part.unlink()
        if rc is None:
            entry.update(status="timeout", reason=f"killed after {timeout:.3g} s"
                         + ("; results up to then kept" if entry.get("results") else ""))
        elif rc != 0:
            entry.update(status="failed", reason=f"exit code {rc}; see {LOG}")
        else:
            entry.update(status="ok", reason=(entry.get("results") or {}).get("note", ""))
        print(f"[{step.item}] {step.name}: {entry['status']} in {wall:.1f} s {entry['reason']}", flush=True)
        if step.name == "env":  # the environment is printed first
            with open(log) as f:
                f.seek(log_offset)
                print(f.read(), flush=True)
        write_reports(results, out_dir)
    results["finished_utc"] = _now()
    results["wall_s"] = round(time.perf_counter() - start, 1)
    write_reports(results, out_dir)
    return results


def _skip_reason(step: Step, args: argparse.Namespace, results: dict[str, Any], budget_left: float) -> str:
    if args.mode not in step.modes:
        if args.mode == "dry-run" and step.name == "models_compiled":
            return "not part of --dry-run: torch.compile of the models takes minutes on a CPU"
        return f"not part of --{args.mode}"
    if args.steps and step.name not in args.steps and step.name != "env":
        return "not selected (--steps)"
    if budget_left < 5:
        return "the run's time budget is spent"
    if step.requires and not args.assume_installed:
        have = installed_distributions(args.python, step.requires)
        missing = [n for n, v in have.items() if v is None]
        if missing:
            return f"missing package{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
    if step.name == "profile" and worst_missed_row(evaluate_targets(results)) is None:
        return "no target measured on a model row was missed"
    return ""


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ the steps
class Recorder:
    """A step's results, written to its partial file after every update (so a killed step keeps them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def update(self, **values: Any) -> None:
        self.data.update(values)
        _write_json_atomic(self.path, self.data)

    def append(self, key: str, value: Any) -> None:
        self.data.setdefault(key, []).append(value)
        _write_json_atomic(self.path, self.data)


def peak_tflops(device_name: str, override: float | None) -> dict[str, Any] | None:
    """The dense bf16 peak MFU is held against: ``--peak-tflops`` or the datasheet figure of a known GPU."""
    if override is not None:
        return {"value": override, "source": "--peak-tflops"}
    for key, value, source in PEAK_BF16_DENSE_TFLOPS:
        if key in device_name:
            return {"value": value, "source": source}
    return None


def step_env(ctx: argparse.Namespace, rec: Recorder) -> None:
    """Print and record the environment; on CUDA, time an 8192³ bf16 matrix product (random data)."""
    import platform

    smi = shutil.which("nvidia-smi")
    if smi:
        full = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        print(full.stdout or full.stderr)
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        if query:
            name, driver, memory = (p.strip() for p in query[0].split(","))
            rec.update(nvidia_smi_name=name, driver=driver, gpu_memory=memory)
    else:
        print("nvidia-smi: not found")
    import torch

    cuda = torch.cuda.is_available()
    rec.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
               cuda_available=cuda)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        rec.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        rec.update(peak_bf16_dense_tflops=peak_tflops(props.name, ctx.peak_tflops))
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rec.update(matmul={"shape": f"{n}x{n}x{n} bf16, random", "median_s": statistics.median(times),
                           "tflops": 2 * n**3 / statistics.median(times) / 1e12})
    else:
        rec.update(device=f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   peak_bf16_dense_tflops=peak_tflops("", ctx.peak_tflops))
    print(json.dumps(rec.data, indent=2))


def step_setup(ctx: argparse.Namespace, rec: Recorder) -> None:
    """``pip install -e ".[test]"`` pinned to the machine's torch; offline, ``--no-deps``; then what is missing."""
    from importlib import metadata

    names = ("torch", "sdt-diffusion", "diffusers", "transformers", "accelerate", "datasets", "safetensors",
             "pytest", "torch-fidelity", "timm", "scipy")
    if ctx.mode == "dry-run":
        rec.update(install_note="not run (--dry-run uses the environment as it is)")
    else:
        constraints = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "constraints.txt"
        constraints.write_text(f"torch=={metadata.version('torch')}\n")  # never reinstall the machine's torch
        base = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--retries", "0", "--timeout", "10",
                "--disable-pip-version-check", "-c", str(constraints)]
        if ctx.wheel_dir:
            base += ["--no-index", "--find-links", str(ctx.wheel_dir)]
        start = time.perf_counter()
        attempts = []
        for extra in ([], ["--no-deps"]):
            cmd = [*base, *extra, "-e", ".[test]" if not extra else "."]
            print("$", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=REPO).returncode
            attempts.append({"command": " ".join(cmd[3:]), "returncode": rc, "seconds": time.perf_counter() - t0})
            if rc == 0:
                break
        seconds = time.perf_counter() - start
        ok = attempts[-1]["returncode"] == 0
        note = ("installed with the test extra" if ok and len(attempts) == 1 else
                "the test extra could not be installed (no registry or wheels?): installed with --no-deps"
                if ok else "pip install failed")
        rec.update(attempts=attempts, install_seconds=seconds if ok else None, install_note=note)
    packages = {}
    for n in names:
        try:
            packages[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            packages[n] = None
    missing = [n for n, v in packages.items() if v is None]
    rec.update(packages=packages, note=f"missing: {', '.join(missing)}" if missing else "")
    print(json.dumps(rec.data, indent=2))
    if ctx.mode != "dry-run" and rec.data.get("install_seconds") is None:
        raise SystemExit(STEP_EXIT_FAILED)


def parse_junit(path: Path) -> tuple[dict[str, int], list[str], list[str]]:
    """Counts (collected, passed, failed, errors, skipped), failing test ids and all test ids from pytest's JUnit
    XML (ids as ``module.path::test_name[params]``)."""
    import xml.etree.ElementTree as ET

    counts = {"collected": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing: list[str] = []
    ids: list[str] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        counts["collected"] += 1
        tags = {child.tag for child in case}
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        ids.append(test_id)
        if "failure" in tags:
            counts["failed"] += 1
            failing.append(test_id)
        elif "error" in tags:
            counts["errors"] += 1
            failing.append(test_id)
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failing, ids


def step_cuda_tests(ctx: argparse.Namespace, rec: Recorder) -> None:
    """``pytest -m cuda`` over ``tests/``; counts from its JUnit XML (failures are results, not a failed step)."""
    import torch

    junit = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "tests"]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    rec.update(pytest_returncode=rc, device_type="cuda" if torch.cuda.is_available() else "cpu")
    if not junit.exists():  # pytest could not start (rc 2-4: usage or internal error)
        raise SystemExit(STEP_EXIT_FAILED)
    counts, failing, ids = parse_junit(junit)
    rec.update(counts=counts, failing=failing, tests=ids,
               note=f"{counts['passed']} passed, {counts['failed'] + counts['errors']} failed, "
                    f"{counts['skipped']} skipped")


def _bench_setup(ctx: argparse.Namespace):
    import harness as bm
    import torch

    s = mode_settings(ctx.mode)
    device = torch.device(s["device"] if s["device"] == "cpu" or torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 leftovers, as benchmark.py
    warmup, repeats = s["warmup"], s["repeats"]
    return bm, torch, s, device, warmup, repeats


def step_models(ctx: argparse.Namespace, rec: Recorder, compiled: bool) -> None:
    """Training and sampling rows of SDT-P vs DiT (``harness.benchmark_training`` / ``benchmark_sampling``)."""
    bm, torch, s, device, warmup, repeats = _bench_setup(ctx)
    if compiled and device.type != "cuda":
        raise SystemExit("models_compiled needs CUDA")
    peak = None
    if device.type == "cuda":
        peak = (peak_tflops(torch.cuda.get_device_name(device), ctx.peak_tflops) or {}).get("value")
    rec.update(device=bm.device_name(device), peak_tflops=peak, train=[], sample=[], errors=[])
    # compiled: the largest size first (the MFU target), so a timeout cuts the small ones
    sizes = sorted(s["sizes"], key=lambda z: -bm.model_shape(z)["num_layers"]) if compiled else s["sizes"]
    for size in sizes:
        for kind in ("train", "sample"):
            print(f"[{kind}] {size}/{s['patch_size']} {'compiled' if compiled else 'eager'}", flush=True)
            try:
                if kind == "train":
                    row = bm.benchmark_training(size, s["batch"], device, warmup, repeats, "auto", "cdsf",
                                                s["patch_size"], measure_memory=s["memory"], peak_tflops=peak,
                                                compile_model=compiled)
                else:
                    row = bm.benchmark_sampling(size, s["sample_batch"], s["sample_steps"], device, warmup, repeats,
                                                "auto", "cdsf", s["patch_size"], compile_model=compiled)
                rec.append(kind, bm.as_json(row))
            except Exception as err:  # e.g. out of memory or a compile error: keep the other rows
                rec.append("errors", f"{kind} {size}: {type(err).__name__}: {str(err)[:300]}")
            rec.update(table=bm.format_tables({"train": rec.data["train"], "sample": rec.data["sample"]}))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if compiled:
                torch._dynamo.reset()
    print(rec.data["table"])


def step_attention(ctx: argparse.Namespace, rec: Recorder) -> None:
    """The attention core alone, forward + backward, per backend (``harness.benchmark_attention``)."""
    bm, torch, s, device, warmup, repeats = _bench_setup(ctx)
    shape = bm.model_shape(s["attn_size"])
    rec.update(device=bm.device_name(device), attention=[])
    for tokens in s["attn_tokens"]:
        rows = bm.benchmark_attention(tokens, s["attn_batch"], shape["num_attention_heads"],
                                      shape["attention_head_dim"], device, ["sdpa", "augmented", "dense", "flex",
                                                                            "math"], warmup, repeats)
        rec.data["attention"] += bm.as_json(rows)
        tables = bm.format_tables({"attention": rec.data["attention"]})
        rec.update(table=tables[tables.index("| tokens |"):])  # the attention table alone
    print(rec.data["table"])


def _write_latent_cache(root: Path, sm: dict[str, Any]) -> tuple[Path, Path]:
    """A random latent cache in the extraction format and a tiny AutoencoderKL whose factor fits it."""
    import numpy as np
    from diffusers import AutoencoderKL

    from sdt_diffusion.data import CACHE_FORMAT, CACHE_VERSION

    levels, side = sm["vae_levels"], sm["latent_side"]
    vae_dir, cache = root / "vae", root / "cache"
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                  layers_per_block=1, norm_num_groups=4,
                  sample_size=side * 2 ** (levels - 1)).save_pretrained(vae_dir)
    shard = cache / "shard-00000-of-00001"
    shard.mkdir(parents=True)
    n, rng = sm["samples"], np.random.default_rng(0)
    np.save(shard / "mean.npy", rng.normal(size=(n, 2, 4, side, side)).astype(np.float16))
    np.save(shard / "std.npy", np.full((n, 2, 4, side, side), 0.01, np.float16))
    np.save(shard / "labels.npy", np.arange(n) % sm["classes"])
    np.save(shard / "indices.npy", np.arange(n))
    names = [f"class {i}" for i in range(sm["classes"])]
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "num_samples": n, "num_shards": 1,
            "shards": [shard.name], "latent_shape": [4, side, side], "dtype": "float16", "scaling_factor": 0.18215,
            "vae": str(vae_dir), "vae_subfolder": None, "resolution": side * 2 ** (levels - 1),
            "num_classes": sm["classes"], "class_names": names, "id2label": dict(enumerate(names))}
    (cache / "metadata.json").write_text(json.dumps(meta))
    return cache, vae_dir


def _launch(script: str, args: list[str], cpu: bool, mixed_precision: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *(["--cpu"] if cpu else []), "--num_processes", "1",
            "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no", script, *args]


def _run_summary(out: Path, steps: int, wall: float) -> dict[str, Any]:
    import math

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    later = [r["images_per_s"] for r in train[len(train) // 4:] if "images_per_s" in r]  # past compile warm-up
    return {"steps": max((r["step"] for r in train), default=0), "wall_s": wall, "planned_steps": steps,
            "loss_first": train[0]["loss"] if train else None, "loss_last": train[-1]["loss"] if train else None,
            "losses_finite": all(math.isfinite(r["loss"]) for r in train),
            "images_per_s_median": statistics.median(later) if later else None,
            "losses": {r["step"]: r["loss"] for r in train}}


def step_train_smoke(ctx: argparse.Namespace, rec: Recorder) -> None:
    """Train on random latents with the real trainer, resume from the half-way checkpoint, sample the export."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    s = mode_settings(ctx.mode)
    sm = s["smoke"]
    cpu = not torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_smoke_"))
    try:
        cache, _ = _write_latent_cache(work, sm)
        half, steps = sm["steps"] // 2, sm["steps"]
        common = ["--model", "SDT-P-S/2", "--latents-dir", str(cache), "--global-batch-size", str(sm["batch"]),
                  "--max-steps", str(steps), "--checkpoint-every", str(half), "--keep-checkpoints", "0",
                  "--num-workers", "0", "--log-every", "1", "--report-to", "none", "--no-progress-bar", "--seed", "0"]
        if sm["model_kwargs"]:
            common += ["--model-kwargs", json.dumps(sm["model_kwargs"])]
        if sm["mixed_precision"] != "no":
            common += ["--mixed-precision", sm["mixed_precision"]]
        if sm["compile"]:
            common += ["--compile"]
        rec.update(settings=sm, model="SDT-P-S/2", device="cpu" if cpu else "cuda")
        for key, extra in (("straight", []), ("resumed", ["--resume", str(work / "straight" / f"checkpoint-{half}")])):
            cmd = _launch("training/train.py", [*common, *extra, "--output-dir", str(work / key)], cpu,
                          sm["mixed_precision"])
            print("$", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=REPO).returncode
            if rc != 0:
                rec.update(note=f"{key} training run exited with {rc}")
                raise SystemExit(STEP_EXIT_FAILED)
            rec.update(**{key: _run_summary(work / key, steps, time.perf_counter() - t0)})
        a = load_file(str(work / "straight" / f"checkpoint-{steps}" / "model.safetensors"))
        b = load_file(str(work / "resumed" / f"checkpoint-{steps}" / "model.safetensors"))
        diff = max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)
        identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        tail = {k: v for k, v in rec.data["straight"]["losses"].items() if int(k) > half}
        losses_equal = tail == {k: v for k, v in rec.data["resumed"]["losses"].items() if int(k) > half}
        rec.update(resume={"from_step": half, "losses_equal": losses_equal, "weights_identical": identical,
                           "max_abs_weight_diff": diff, "exact": bool(identical and losses_equal)})
        npz = work / "samples.npz"
        cmd = _launch("eval/sample.py", ["--pipeline", str(work / "straight" / "pipeline"), "--num-samples",
                                         str(sm["sample_images"]), "--per-device-batch", str(sm["sample_batch"]),
                                         "--steps", str(sm["sample_steps"]), "--seed", "0", "--output", str(npz)],
                      cpu, "no")
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO).returncode
        wall = time.perf_counter() - t0
        if rc != 0:
            rec.update(note=f"eval/sample.py exited with {rc}")
            raise SystemExit(STEP_EXIT_FAILED)
        with np.load(npz) as f:
            images = f["arr_0"]
        rec.update(sampling={"images": int(images.shape[0]), "shape": list(images.shape), "dtype": str(images.dtype),
                             "wall_s": wall, "steps": sm["sample_steps"], "images_per_s": images.shape[0] / wall})
        if images.shape[0] != sm["sample_images"] or images.dtype != np.uint8:
            rec.update(note=f"eval/sample.py wrote {images.shape} {images.dtype}, not {sm['sample_images']} uint8")
            raise SystemExit(STEP_EXIT_FAILED)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def step_sdt_h(ctx: argparse.Namespace, rec: Recorder) -> None:
    """SDT-H-T vs timm peers through ``sdt_h_speed.main`` (bf16 autocast on CUDA)."""
    import sdt_h_speed
    import torch

    sh = mode_settings(ctx.mode)["sdt_h"]
    cuda = torch.cuda.is_available()
    argv = ["--device", "cuda" if cuda else "cpu", "--models", *sh["models"], "--batch-size", str(sh["batch"]),
            "--resolution", str(sh["size"]), "--warmup", str(sh["warmup"]), "--repeats", str(sh["repeats"])]
    if cuda:
        argv += ["--mixed-precision", "bf16"]
    if not sh["memory"]:
        argv.append("--skip-memory")
    result = sdt_h_speed.main(argv)
    rec.update(argv=argv, environment=result["environment"], rows=result["rows"],
               table=sdt_h_speed.table(result["rows"], "sdt_h_tiny", cpu_time=not cuda),
               header=f"batch {sh['batch']}, {sh['size']}², {'bf16 autocast' if cuda else 'float32'}, "
                      "forward + backward")


def step_profile(ctx: argparse.Namespace, rec: Recorder) -> None:
    """The top 15 kernels (self time) of SDT-P and DiT at the worst missed row (``profile_sdt.top_ops``)."""
    import profile_sdt

    bm, torch, s, device, warmup, repeats = _bench_setup(ctx)
    results = json.loads((ctx.output_dir / RESULTS_JSON).read_text())
    row = worst_missed_row(evaluate_targets(results))
    if row is None:
        rec.update(note="no missed row")
        return
    rec.update(row=row)
    amp = device.type == "cuda"
    tables = {}
    for kind in ("sdt", "dit"):
        model = bm.maybe_compile(bm.build_model(kind, row["size"], row["patch_size"]), row["compiled"])
        make = bm.make_train_step if row["mode"] == "train" else bm.make_sample_step
        step = make(model, device, row["batch"], amp)
        for _ in range(max(warmup, 1)):
            step()
        tables[kind] = profile_sdt.top_ops(step, device, top=15, steps=s["profile_steps"])
        rec.update(top_ops=tables)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = ["| model | op | self time per step (ms) | calls per step |", "|---|---|---|---|"]
    for kind, ops in tables.items():
        lines += [f"| {kind} | `{op['name'][:80]}` | {op['self_ms']:.3f} | {op['calls']:.0f} |" for op in ops]
    rec.update(table="\n".join(lines),
               header=f"worst missed target {row['target']} ({row['value']:.3g} against {row['threshold']:.3g}): "
                      f"{row['mode']} step of {row['size']}/{row['patch_size']}, batch {row['batch']}, "
                      f"{'compiled' if row['compiled'] else 'eager'}; self "
                      f"{'CUDA' if device.type == 'cuda' else 'CPU'} time, top 15")
    print(rec.data["header"])
    print(rec.data["table"])


STEP_FUNCTIONS: dict[str, Callable[[argparse.Namespace, Recorder], None]] = {
    "env": step_env, "setup": step_setup, "cuda_tests": step_cuda_tests,
    "models_eager": lambda ctx, rec: step_models(ctx, rec, compiled=False),
    "models_compiled": lambda ctx, rec: step_models(ctx, rec, compiled=True),
    "attention": step_attention, "train_smoke": step_train_smoke, "sdt_h": step_sdt_h, "profile": step_profile,
}


# ------------------------------------------------------------------------------------------------ command line
def _timeout_arg(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    if not sep or name not in STEP_NAMES:
        raise argparse.ArgumentTypeError(f"--timeout takes STEP=SECONDS with STEP one of {', '.join(STEP_NAMES)}; "
                                         f"got {text!r}")
    try:
        value = float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timeout {text!r}: {seconds!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--timeout {text!r}: the limit must be positive")
    return name, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--quick", action="store_true", help="steps 0-3 and the profile at S/2 and XL/2 (under 5 minutes)")
    how.add_argument("--dry-run", action="store_true",
                     help="CPU, toy sizes: the same steps and reports, to test the script itself")
    how.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--output-dir", type=Path, default=Path("gpu_check_results"),
                   help="folder for results.json, summary.md and gpu_check.log (default: %(default)s)")
    p.add_argument("--steps", nargs="+", choices=STEP_NAMES, default=None,
                   help="run only these steps (env always runs; default: every step of the mode)")
    p.add_argument("--timeout", type=_timeout_arg, action="append", default=[], metavar="STEP=SECONDS",
                   help="override one step's time limit (repeatable)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run; a step gets at most what is left "
                        f"(default: {', '.join(f'{m} {b:.0f}' for m, b in BUDGETS.items())})")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: the datasheet figure of a known GPU; none: no MFU)")
    p.add_argument("--wheel-dir", type=Path, default=None,
                   help="install the test extra from these wheels only (pip --no-index --find-links), "
                        "for a machine without a package registry")
    p.add_argument("--python", default=sys.executable, help="the interpreter the steps run with (default: this one)")
    p.add_argument("--assume-installed", action="store_true",
                   help="do not check each step's packages before running it")
    p.add_argument("--run-step", choices=STEP_NAMES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode is None:
        args.mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget must be positive, got {args.budget}")
    if args.wheel_dir is not None and not args.wheel_dir.is_dir():
        p.error(f"--wheel-dir {args.wheel_dir}: no such folder")
    args.timeout = dict(args.timeout)
    args.output_dir = args.output_dir.resolve()
    return args


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_step:
        sys.path.insert(0, str(BENCHMARKS))
        STEP_FUNCTIONS[args.run_step](args, Recorder(partial_path(args.output_dir, args.run_step)))
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a stopped check stops its running step too
    results = run_check(args)
    print()
    print((args.output_dir / SUMMARY_MD).read_text())
    failed = [s["name"] for s in results["steps"] if s["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
