"""SDT-H-T against timm's peers (random weights): training forward + backward time and peak memory.

One step = forward of a fixed batch in train mode, cross-entropy against fixed labels, backward (no optimiser
step).  Timings: ``--repeats`` runs after ``--warmup`` runs, the models alternating run by run so that load from
other processes hits all alike; the table gives the wall-clock median and minimum and, on CPU, the median
of the process's CPU time (all threads), which a busy shared machine disturbs least (with ``--threads 1`` it
equals the wall time of an idle machine).  Peak memory: CUDA ``torch.cuda.max_memory_allocated``
over two steps, one model resident; CPU: a fresh process per model, the growth of its resident-set
high-water mark (Linux ``VmHWM``) over two steps above its size after building model and batch, i.e.
activations + gradients + allocator slack.  The table gives each model's ratio to SDT-H-T.

Peers: ``convnext_nano`` (the timm model closest to SDT-H-T in parameters and FLOPs), ``convnext_tiny``
and ``swin_tiny_patch4_window7_224`` (the ConvNeXt-T and Swin-T of the paper's Table 1).

    # CPU (float32), batch 32, 224x224, one thread: the numbers in benchmarks/RESULTS.md
    python benchmarks/sdt_h_speed.py --device cpu --threads 1 --repeats 5 --output sdt_h_speed_cpu.json
    # CUDA (bf16 autocast), batch 32 -- the same table on a GPU:
    python benchmarks/sdt_h_speed.py --device cuda --mixed-precision bf16 --warmup 5 --repeats 20 --output sdt_h_speed_cuda.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sdt_diffusion  # noqa: F401  (registers sdt_h_tiny with timm)
from sdt_diffusion.utils.cli_args import add_deprecated_alias

DEFAULT_MODELS = ("sdt_h_tiny", "convnext_nano", "convnext_tiny", "swin_tiny_patch4_window7_224")


def build(name: str, backend: str) -> nn.Module:
    """A timm model with random weights; SDT-H gets ``attention_backend=backend``."""
    kwargs = {"attention_backend": backend} if name.startswith("sdt_h") else {}
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)


def make_step(model: nn.Module, device: torch.device, batch: int, size: int, amp: bool) -> Callable[[], None]:
    """A closure: forward (train mode) + cross-entropy + backward on a fixed batch."""
    model.to(device).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        model.zero_grad(set_to_none=True)
        loss.backward()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, dict[str, list[float]]]:
    """``warmup`` untimed calls of each step, then ``repeats`` rounds of one timed call each.

    Returns per step the wall-clock seconds (``wall``) and this process's CPU seconds over all its threads
    (``cpu``, ``time.process_time``): on a CPU shared with other jobs, CPU time barely moves when the step
    is preempted, wall time does.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            synchronize(device)
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - cpu_start)
    return times


def forward_gmacs(name: str, size: int) -> float:
    """Forward multiply-adds (G) of one image, counted on the meta device (FlopCounterMode total / 2)."""
    with torch.device("meta"):
        model = build(name, "math" if name.startswith("sdt_h") else "auto").eval()
        x = torch.empty(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9


# ------------------------------------------------------------------------------------------------ memory
def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def _cpu_memory_child(name: str, backend: str, batch: int, size: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    step = make_step(build(name, backend), torch.device("cpu"), batch, size, amp=False)
    gc.collect()
    base = _status_bytes("VmRSS")
    try:  # reset the high-water mark to the current RSS (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    for _ in range(2):
        step()
    queue.put(max(_status_bytes("VmHWM") - base, 0))


def cpu_peak_memory(name: str, backend: str, batch: int, size: int) -> int:
    """Peak RSS growth (bytes) of a fresh process over two CPU training steps of ``name``."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_memory_child, args=(name, backend, batch, size, torch.get_num_threads(), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return int(result)


def cuda_peak_memory(step: Callable[[], None], device: torch.device) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


# ------------------------------------------------------------------------------------------------ report
def cpu_model_name() -> str:
    """``lscpu``'s "Model name" (falls back to /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(rows: dict[str, dict[str, Any]], ref: str, cpu_time: bool) -> str:
    """Markdown: each model's numbers and its ratio to ``ref``."""
    r0 = rows[ref]
    columns = [("wall s, median", "median_s"), ("wall s, min", "min_s")]
    if cpu_time:
        columns.append(("CPU s, median", "cpu_median_s"))
    if "peak_mib" in r0:
        columns.append(("peak MiB", "peak_mib"))
    head = "| model | params | GMACs/img | " + " | ".join(f"{c} | ×" for c, _ in columns) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(columns))]
    for name, r in rows.items():
        cells = [name, f"{r['params'] / 1e6:.1f}M", f"{r['gmacs']:.2f}"]
        for _, key in columns:
            fmt = ".0f" if key == "peak_mib" else ".2f"
            cells += [format(r[key], fmt), f"{r[key] / r0[key]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm names; the first is the reference")
    p.add_argument("--attention-backend", default="auto", help="SDT-H's attention_backend")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=224, help="square input side")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16"), help="bf16: bf16 autocast (CUDA)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--output", default=None, help="JSON file for the results")
    # the spellings before the flags took the trainers' names
    add_deprecated_alias(p, "--backend", "--attention-backend")
    add_deprecated_alias(p, "--batch", "--batch-size")
    add_deprecated_alias(p, "--size", "--resolution")
    add_deprecated_alias(p, "--amp", "--mixed-precision", nargs=0, const="bf16", choices=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    batch, size, backend = args.batch_size, args.resolution, args.attention_backend
    amp = args.mixed_precision == "bf16"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    models = {name: build(name, backend) for name in args.models}
    steps = {name: make_step(m, device, batch, size, amp) for name, m in models.items()}
    times = time_interleaved(steps, device, args.warmup, args.repeats)
    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        wall, cpu = times[name]["wall"], times[name]["cpu"]
        rows[name] = {"params": sum(q.numel() for q in model.parameters()), "gmacs": forward_gmacs(name, size),
                      "median_s": statistics.median(wall), "min_s": min(wall), "cpu_median_s": statistics.median(cpu),
                      "runs_s": [round(t, 4) for t in wall], "cpu_runs_s": [round(t, 4) for t in cpu]}
    if not args.skip_memory:
        for name in models:
            if device.type == "cuda":
                rows[name]["peak_mib"] = cuda_peak_memory(steps[name], device) / 2**20
            else:
                rows[name]["peak_mib"] = cpu_peak_memory(name, backend, batch, size) / 2**20

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name(),
        "cpu_model": cpu_model_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "timm": timm.__version__, "git_commit": git_commit(),
        "batch": batch, "size": size, "amp": amp, "backend": backend,
        "warmup": args.warmup, "repeats": args.repeats,
    }
    if hasattr(os, "getloadavg"):
        env["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    print(f"{env['device']} ({env['cores']} cores, {env['torch_threads']} torch threads), torch {env['torch']}, "
          f"timm {env['timm']}, batch {batch}, {size}x{size}, "
          f"{'bf16 autocast' if amp else 'float32'}, {env['date_utc']}\n")
    print(table(rows, args.models[0], cpu_time=device.type == "cpu"))
    result = {"environment": env, "rows": rows}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
