"""Measuring code behind ``benchmarks/benchmark.py``: SDT-P against diffusers' ``DiTTransformer2DModel``.

Every number comes from one of four measurements, each run on both models built with the same
heads, head width, layers and patch size:

* :func:`time_training` -- one training step = forward + backward + ``AdamW.step`` (bf16 autocast on
  CUDA, float32 on CPU) on a fixed batch; the loss is the mean square of the output against a fixed
  target (DiT's hybrid loss adds a VLB term whose cost is negligible next to the model).
* peak memory -- CUDA (:func:`cuda_training_memory`): ``torch.cuda.max_memory_allocated`` over warm
  training steps, one model resident (weights + gradients + AdamW states + activations).  CPU
  (:func:`cpu_training_memory`): a fresh subprocess per model resets its resident-set high-water mark
  (Linux ``VmHWM``) after building the model and the batch, runs training steps and reports the peak
  minus the resident size before them: the memory a step adds on top of the weights, i.e. gradients +
  AdamW states + activations + allocator slack.
* :func:`time_sampling` -- one guided denoising step = one eval forward of a doubled batch
  (conditional + null labels) under ``no_grad``; images/s for an N-step sampler is
  ``batch / (N * step time)``.  The scheduler arithmetic (DDPM with learned variance) and the guidance
  combination are elementwise on (B, 8, 32, 32) tensors and left out.
* :func:`time_attention` -- the attention core alone, forward + backward, per backend, against SDPA
  with no bias at all.

Timings are the median over ``repeats`` runs after ``warmup`` runs; on CPU the two models alternate
run by run so that load from other processes hits both alike.
"""

from __future__ import annotations

import datetime
import gc
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.attention.backends import ATTENTION_BACKENDS, DecayInputs
from sdt_diffusion.models import count_parameters
from sdt_diffusion.models.spatial_decay_attention import use_reference_path
from sdt_diffusion.models.transformer_sdt import MODEL_SIZES, SDTTransformer2DModel

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM dense bf16 peak (H200: the same compute)


# A toy size beside DiT's (depth, width, heads), for dry runs of the benchmark scripts on a CPU
# (benchmarks/gpu_check.py --dry-run); never a measurement.
TOY_SIZES: dict[str, tuple[int, int, int]] = {"toy": (2, 64, 2)}


# ----------------------------------------------------------------------------------------------- models
def model_shape(size: str) -> dict[str, int]:
    """Heads, head width and layers of DiT size ``size`` (S, B, L, XL) or of a :data:`TOY_SIZES` entry."""
    sizes = {**MODEL_SIZES, **TOY_SIZES}
    if size not in sizes:
        raise ValueError(f"unknown model size {size!r}; expected one of {', '.join(sizes)}")
    depth, width, heads = sizes[size]
    return {"num_layers": depth, "num_attention_heads": heads, "attention_head_dim": width // heads}


def build_sdt(size: str, patch_size: int = 2, attention_backend: str = "auto", decay_mode: str = "cdsf",
              reference_path: bool = False) -> nn.Module:
    """SDT-P of DiT size ``size`` for 32x32x4 latents and 1000 classes.

    ``reference_path``: every attention layer on its plain layer-by-layer forward (the code before the
    fast path; ``spatial_decay_attention.use_reference_path``), for before/after comparisons in one run.
    """
    model = SDTTransformer2DModel(
        **model_shape(size), patch_size=patch_size, in_channels=4, sample_size=32, num_embeds_ada_norm=1000,
        attention_backend=attention_backend, decay_mode=decay_mode,
    )
    use_reference_path(model, reference_path)
    return model


def build_dit(size: str, patch_size: int = 2) -> nn.Module:
    """diffusers' ``DiTTransformer2DModel`` of the same size: in 4, out 8 channels, 32x32 latents, 1000 classes."""
    return DiTTransformer2DModel(
        **model_shape(size), patch_size=patch_size, in_channels=4, out_channels=8, sample_size=32,
        num_embeds_ada_norm=1000,
    )


def build_model(kind: str, size: str, patch_size: int = 2, attention_backend: str = "auto",
                decay_mode: str = "cdsf", reference_backend: str = "augmented") -> nn.Module:
    """``kind`` is ``"sdt"``, ``"dit"`` or ``"sdt_before"`` (SDT on its reference path with ``reference_backend``:
    the model as it ran before the fast path)."""
    if kind == "sdt":
        return build_sdt(size, patch_size, attention_backend, decay_mode)
    if kind == "sdt_before":
        return build_sdt(size, patch_size, reference_backend, decay_mode, reference_path=True)
    if kind == "dit":
        return build_dit(size, patch_size)
    raise ValueError(f"unknown model kind {kind!r}")


def make_batch(batch: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Latents (B, 4, 32, 32), timesteps in [0, 1000) and labels in [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device), t.to(device), y.to(device)


def maybe_compile(model: nn.Module, compile_model: bool) -> nn.Module:
    """``torch.compile(model)`` (inductor, default options) when ``compile_model``; the optimizer stays eager."""
    return torch.compile(model) if compile_model else model


def run_model(model: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """Both models share the diffusers call ``model(hidden_states, timestep=, class_labels=).sample``."""
    return model(x, timestep=t, class_labels=y).sample


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


# ----------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def set_clock(name: str) -> None:
    """``"wall"`` (default) or ``"cpu"``: this process's CPU time (``time.process_time``).

    CPU time does not count the time other processes hold the cores, so on a shared machine it measures the
    work itself; with one torch thread it is the single-core time of the step (with more threads it adds
    every thread's time, spin-waits included).  CUDA needs the wall clock.
    """
    global _clock
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {name!r}")
    _clock = CLOCKS[name]


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of ``fn()`` on the clock chosen by :func:`set_clock` (wall by default), synchronised before and after."""
    synchronize(device)
    start = _clock()
    fn()
    synchronize(device)
    return _clock() - start


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, list[float]]:
    """Run every ``fn`` ``warmup`` times, then ``repeats`` rounds of one call each, alternating; seconds per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


@dataclass
class Timing:
    """Seconds per call: median, min and every run."""

    median_s: float
    min_s: float
    runs_s: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, runs: list[float]) -> Timing:
        return cls(statistics.median(runs), min(runs), [round(r, 6) for r in runs])


# ----------------------------------------------------------------------------------------------- steps
def make_train_step(model: nn.Module, device: torch.device, batch: int, amp: bool, seed: int = 0) -> Callable[[], None]:
    """A closure running one training step (forward, MSE loss, backward, AdamW step) on a fixed batch."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x, t, y = make_batch(batch, device, seed)
    target = torch.randn(batch, 8, 32, 32, generator=torch.Generator().manual_seed(seed + 1)).to(device)

    def step() -> None:
        with _autocast(device, amp):
            out = run_model(model, x, t, y)
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_sample_step(model: nn.Module, device: torch.device, batch: int, amp: bool, seed: int = 0) -> Callable[[], Tensor]:
    """A closure running one guided denoising evaluation: a (2 * batch) forward, conditional + null labels."""
    model.to(device).eval()
    x, t, y = make_batch(batch, device, seed)
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    y2 = torch.cat([y, torch.full_like(y, 1000)])  # 1000 = the null label of both models

    @torch.no_grad()
    def step() -> Tensor:
        with _autocast(device, amp):
            return run_model(model, x2, t2, y2)

    return step


# ----------------------------------------------------------------------------------------------- memory
def _status_bytes(field_name: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``), bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def _reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (VmHWM) to the current RSS (Linux: ``5`` to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not permitted: VmHWM then counts from process start, still this process only
        pass


def _cpu_memory_child(kind: str, size: str, batch: int, steps: int, backend: str, decay_mode: str,
                      before_backend: str, threads: int, queue) -> None:
    # VmHWM rather than ru_maxrss: a spawned child's ru_maxrss starts at its parent's RSS at fork time.
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model = build_model(kind, size, attention_backend=backend, decay_mode=decay_mode, reference_backend=before_backend)
    step = make_train_step(model, device, batch, amp=False)
    gc.collect()
    base = _status_bytes("VmRSS")
    _reset_peak_rss()
    for _ in range(steps):
        step()
    queue.put(max(_status_bytes("VmHWM") - base, 0))


def cpu_training_memory(kind: str, size: str, batch: int, backend: str = "auto", decay_mode: str = "cdsf",
                        steps: int = 2, before_backend: str = "augmented") -> int:
    """Peak RSS growth (bytes, ``VmHWM`` - ``VmRSS`` before) of a fresh process over ``steps`` CPU training steps."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_memory_child,
                       args=(kind, size, batch, steps, backend, decay_mode, before_backend, torch.get_num_threads(),
                             queue))
    proc.start()
    result = queue.get()
    proc.join()
    return int(result)


def cuda_training_memory(step: Callable[[], None], device: torch.device, steps: int = 2) -> int:
    """``torch.cuda.max_memory_allocated`` over ``steps`` training steps (after a warm-up elsewhere)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


# ----------------------------------------------------------------------------------------------- FLOPs
def forward_flops_per_image(kind: str, size: str, patch_size: int = 2, decay_mode: str = "cdsf") -> int:
    """Forward FLOPs of one image counted by ``torch.utils.flop_counter.FlopCounterMode`` (CPU, float32, batch 1).

    Counts matrix products, convolutions and attention (SDPA forced to its math form so its two matmuls
    are seen); elementwise work is not counted.  SDT uses the ``math`` backend here, so its attention
    counts head width d, not the augmented width of the fused backend: these are model FLOPs.
    """
    model = build_model(kind, size, patch_size, attention_backend="math", decay_mode=decay_mode).eval()
    x, t, y = make_batch(1, torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        run_model(model, x, t, y)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------- attention
def plain_sdpa(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs) -> Tensor:
    """SDPA with no bias at all: the cost floor every decay backend is compared with."""
    return F.scaled_dot_product_attention(q, k, v)


def time_attention(backend: str, tokens: int, batch: int, heads: int, head_dim: int, device: torch.device,
                   dtype: torch.dtype, warmup: int, repeats: int, decay_mode: str = "cdsf") -> Timing:
    """Forward + backward of one attention core on a square grid of ``tokens`` tokens (gradients into q, k, v, gates).

    ``backend`` is a registered backend name or ``"none"`` (SDPA without bias).
    """
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"tokens must be a square number, got {tokens}")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3))
    gate_logits = torch.randn(batch, tokens, heads, generator=g).to(device).requires_grad_()
    log_gamma = eq.rmt_log_gamma(heads).to(device)
    codes = eq.threshold_codes(side, side, device)
    fn = plain_sdpa if backend == "none" else ATTENTION_BACKENDS[backend]

    def run() -> None:
        decay = DecayInputs(decay_mode, side, side, 0.1, gates=eq.context_aware_gates(gate_logits),
                            log_gamma=log_gamma, codes=codes)
        out = fn(q, k, v, decay)
        out.float().square().mean().backward()
        for p in (q, k, v, gate_logits):
            p.grad = None

    times = time_interleaved({backend: run}, device, warmup, repeats)[backend]
    return Timing.of(times)


# ----------------------------------------------------------------------------------------------- environment
def git_commit(repo: str | None = None) -> str:
    """``git rev-parse --short HEAD`` (+ ``-dirty`` with uncommitted changes), or ``unknown``."""
    cwd = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def environment(device: torch.device) -> dict[str, Any]:
    """Device, date, versions, commit and load: recorded beside every result."""
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    return info


# ----------------------------------------------------------------------------------------------- reports
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def format_tables(results: dict[str, Any]) -> str:
    """Markdown tables: training, sampling and attention, with SDT/DiT ratios (and SDT-before/DiT when measured)."""
    train, sample = results.get("train", []), results.get("sample", [])
    before = any("sdt_before" in row for row in train + sample)
    b_head = " SDT before (s) | before/DiT |" if before else ""
    lines = ["| size | batch | compiled | train step SDT (s) | DiT (s) | SDT/DiT |" + b_head + " peak mem SDT (MiB) "
             "| DiT (MiB) | SDT/DiT |" + (" before/DiT mem |" if before else "") + " MFU SDT | MFU DiT |",
             "|---" * (11 + (3 if before else 0)) + "|"]
    for row in train:
        s, d = row["sdt"], row["dit"]
        line = (f"| {row['size']}/{row['patch_size']} | {row['batch']} | {'yes' if row.get('compiled') else 'no'} | "
                f"{s['time']['median_s']:.3f} | {d['time']['median_s']:.3f} | "
                f"{_fmt(_ratio(s['time']['median_s'], d['time']['median_s']), '.3f')} |")
        if before:
            o = row.get("sdt_before", {})
            t = o.get("time", {}).get("median_s")
            line += f" {_fmt(t, '.3f')} | {_fmt(_ratio(t, d['time']['median_s']), '.3f')} |"
        line += (f" {_fmt(s.get('peak_mem_mib'), '.0f')} | {_fmt(d.get('peak_mem_mib'), '.0f')} | "
                 f"{_fmt(_ratio(s.get('peak_mem_mib'), d.get('peak_mem_mib')), '.3f')} |")
        if before:
            line += f" {_fmt(_ratio(row.get('sdt_before', {}).get('peak_mem_mib'), d.get('peak_mem_mib')), '.3f')} |"
        lines.append(line + f" {_fmt(s.get('mfu'), '.1%')} | {_fmt(d.get('mfu'), '.1%')} |")
    if sample:
        lines += ["", "| size | batch (x2 guided) | compiled | steps | model step SDT (s) | DiT (s) | img/s SDT "
                  "| img/s DiT | SDT/DiT throughput |" + (" before/DiT throughput |" if before else ""),
                  "|---" * (9 + (1 if before else 0)) + "|"]
        for row in sample:
            s, d = row["sdt"], row["dit"]
            line = (f"| {row['size']}/{row['patch_size']} | {row['batch']} | {'yes' if row.get('compiled') else 'no'} "
                    f"| {row['steps']} | {s['time']['median_s']:.3f} | {d['time']['median_s']:.3f} | "
                    f"{s['images_per_s']:.4g} | {d['images_per_s']:.4g} | "
                    f"{_fmt(_ratio(s['images_per_s'], d['images_per_s']), '.3f')} |")
            if before:
                line += f" {_fmt(_ratio(row.get('sdt_before', {}).get('images_per_s'), d['images_per_s']), '.3f')} |"
            lines.append(line)
    if results.get("attention"):
        lines += ["", "| tokens | backend | fwd+bwd (ms) | / SDPA without bias |", "|---|---|---|---|"]
        for row in results["attention"]:
            lines.append(f"| {row['tokens']} | {row['backend']} | "
                         + (f"{1e3 * row['time']['median_s']:.2f} | {_fmt(row.get('vs_plain'), '.2f')} |"
                            if row.get("time") else f"n/a | {row.get('note', '')} |"))
    return "\n".join(lines)


def as_json(obj: Any) -> Any:
    """Dataclasses to dicts, recursively (for ``json.dump``)."""
    if isinstance(obj, Timing):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: as_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [as_json(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- drivers
def compare_models(build: Callable[[str], nn.Module], make_step: Callable[[nn.Module], Callable[[], Any]],
                   device: torch.device, warmup: int, repeats: int, cuda_memory: bool = False,
                   kinds: tuple[str, ...] = ("sdt", "dit")) -> dict[str, dict[str, Any]]:
    """Time ``make_step(build(kind))`` for every kind.

    CPU: all models resident, calls alternating (shared machines drift).  CUDA: one model resident at a
    time, so that ``cuda_memory`` (peak allocated over two more steps) sees that model alone.
    """
    out: dict[str, dict[str, Any]] = {}
    if device.type != "cuda":
        models = {kind: build(kind) for kind in kinds}
        steps = {kind: make_step(models[kind]) for kind in kinds}
        times = time_interleaved(steps, device, warmup, repeats)
        for kind in kinds:
            out[kind] = {"time": Timing.of(times[kind]), "params": count_parameters(models[kind])}
        return out
    for kind in kinds:
        model = build(kind)
        step = make_step(model)
        entry: dict[str, Any] = {"time": Timing.of(time_interleaved({kind: step}, device, warmup, repeats)[kind]),
                                 "params": count_parameters(model)}
        if cuda_memory:
            entry["peak_mem_mib"] = cuda_training_memory(step, device) / 2**20
        out[kind] = entry
        del model, step
        gc.collect()
        torch.cuda.empty_cache()
    return out


def model_kinds(before: bool) -> tuple[str, ...]:
    """The models of one comparison: SDT, DiT and, with ``before``, SDT on its reference path."""
    return ("sdt", "dit", "sdt_before") if before else ("sdt", "dit")


def benchmark_training(size: str, batch: int, device: torch.device, warmup: int, repeats: int, backend: str,
                       decay_mode: str, patch_size: int, measure_memory: bool,
                       peak_tflops: float | None, before: bool = False, before_backend: str = "augmented",
                       compile_model: bool = False) -> dict[str, Any]:
    """Training-step time, peak memory and (CUDA) MFU of SDT-P and DiT of one size.

    ``before``: SDT on its reference path with ``before_backend`` runs in the same interleaved loop (the
    model as it was before the fast path).  ``compile_model``: every model under ``torch.compile``; CPU
    peak memory is then not measured (it would compile again in the fresh process).
    """
    amp = device.type == "cuda"
    kinds = model_kinds(before)

    def build(kind: str) -> nn.Module:
        return build_model(kind, size, patch_size, backend, decay_mode, before_backend)

    res = compare_models(build, lambda m: make_train_step(maybe_compile(m, compile_model), device, batch, amp),
                         device, warmup, repeats, cuda_memory=measure_memory and device.type == "cuda", kinds=kinds)
    if measure_memory and device.type != "cuda" and not compile_model:
        for kind in kinds:
            res[kind]["peak_mem_mib"] = cpu_training_memory(kind, size, batch, backend, decay_mode,
                                                            before_backend=before_backend) / 2**20
    for kind, entry in res.items():
        flops = forward_flops_per_image("sdt" if kind == "sdt_before" else kind, size, patch_size, decay_mode)
        images_per_s = batch / entry["time"].median_s
        entry["forward_gflops_per_image"] = flops / 1e9
        entry["train_images_per_s"] = images_per_s
        entry["achieved_tflops"] = 3 * flops * images_per_s / 1e12  # training ~ 3 x forward FLOPs (backward ~ 2 x forward)
        entry["mfu"] = entry["achieved_tflops"] / peak_tflops if peak_tflops else None
    return {"size": size, "patch_size": patch_size, "batch": batch, "precision": "bf16 autocast" if amp else "fp32",
            "compiled": compile_model, **res}


def benchmark_sampling(size: str, batch: int, steps: int, device: torch.device, warmup: int, repeats: int,
                       backend: str, decay_mode: str, patch_size: int, before: bool = False,
                       before_backend: str = "augmented", compile_model: bool = False) -> dict[str, Any]:
    """Per-step time of guided sampling (model forward on 2 x batch) and the implied images/s for ``steps`` steps."""
    amp = device.type == "cuda"

    def build(kind: str) -> nn.Module:
        return build_model(kind, size, patch_size, backend, decay_mode, before_backend)

    res = compare_models(build, lambda m: make_sample_step(maybe_compile(m, compile_model), device, batch, amp),
                         device, warmup, repeats, kinds=model_kinds(before))
    for entry in res.values():
        entry["images_per_s"] = batch / (steps * entry["time"].median_s)
    return {"size": size, "patch_size": patch_size, "batch": batch, "steps": steps, "compiled": compile_model, **res}


def benchmark_attention(tokens: int, batch: int, heads: int, head_dim: int, device: torch.device,
                        backends: list[str], warmup: int, repeats: int, decay_mode: str = "cdsf") -> list[dict]:
    """Every backend's attention fwd+bwd at ``tokens`` tokens, relative to SDPA without bias (``none``)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    plain: float | None = None
    for name in ["none", *backends]:
        row: dict[str, Any] = {"tokens": tokens, "backend": "SDPA, no bias" if name == "none" else name,
                               "batch": batch, "heads": heads, "head_dim": head_dim, "dtype": str(dtype),
                               "decay_mode": "none" if name == "none" else decay_mode}
        try:
            timing = time_attention(name, tokens, batch, heads, head_dim, device, dtype, warmup, repeats, decay_mode)
        except Exception as err:  # e.g. no flex backward on CPU, a kernel refusing a head width, out of memory
            row["note"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
            timing = None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if timing is not None:
            if name == "none":
                plain = timing.median_s
            row["time"] = timing
            row["vs_plain"] = timing.median_s / plain if plain else None
        rows.append(row)
    return rows
