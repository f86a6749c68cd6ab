"""Per-op profile of one SDT-P training (or guided sampling) step against diffusers' DiT of the same size.

``torch.profiler`` self CPU time per op and step for each model, and the difference SDT - DiT, sorted by
the difference: where SDT's extra time goes.  CPU, float32 (the GPU profile needs CUDA events and is
not covered here).

    python benchmarks/profile_sdt.py --model-size S --batch-size 8 --threads 1 --steps 2
    python benchmarks/profile_sdt.py --backends auto augmented --before   # SDT paths side by side, and the old one
    python benchmarks/profile_sdt.py --pieces --threads 1    # each fast piece against its plain form, CPU time
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import harness as bm
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sdt_diffusion.attention import kernels
from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.attention.grid import GridContext
from sdt_diffusion.utils.cli_args import add_deprecated_alias


def op_self_times(step) -> dict[str, float]:
    """Self CPU milliseconds per op name of one call of ``step``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {event.key: event.self_cpu_time_total / 1e3 for event in prof.key_averages()}


def top_ops(step, device: torch.device, top: int = 15, steps: int = 1) -> list[dict]:
    """The ``top`` ops of ``steps`` calls of ``step`` by self time per call: CUDA kernels by self device time on
    CUDA (``torch.profiler`` with CUDA activity), ops by self CPU time on CPU; name, ms and calls per step."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        if cuda and event.device_type != DeviceType.CUDA:  # the kernels, not the CPU ops that launched them
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            rows.append({"name": event.key, "self_ms": us / 1e3 / steps, "calls": event.count / steps})
    return sorted(rows, key=lambda r: -r["self_ms"])[:top]


def profile_models(size: str, batch: int, backends: list[str], steps: int, warmup: int,
                   mode: str, before: bool = False, compile_model: bool = False) -> dict[str, dict]:
    """Profile DiT and SDT with each of ``backends`` (training or sampling step), ms per step.

    ``before``: also SDT on its reference path with the ``augmented`` backend (the code before the fast path).

    The models take turns step by step (one profiler session per step), so that load from other processes
    on a shared machine hits them alike.
    """
    device = torch.device("cpu")
    runs = {"DiT": ("dit", "auto"), **{f"SDT[{b}]": ("sdt", b) for b in backends}}
    if before:
        runs["SDT before[augmented]"] = ("sdt_before", "augmented")
    step_fns = {}
    for label, (kind, backend) in runs.items():
        model = bm.maybe_compile(bm.build_model(kind, size, attention_backend=backend), compile_model)
        make = bm.make_train_step if mode == "train" else bm.make_sample_step
        step_fns[label] = make(model, device, batch, amp=False)
        for _ in range(warmup):
            step_fns[label]()
    totals: dict[str, dict[str, float]] = {label: defaultdict(float) for label in runs}
    for _ in range(steps):
        for label, step in step_fns.items():
            for name, ms in op_self_times(step).items():
                totals[label][name] += ms / steps
    return {label: {"ops_ms": dict(ops), "total_ms": sum(ops.values())} for label, ops in totals.items()}


def time_pieces(size: str, batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """Forward + backward of each piece of one attention layer, fast form against plain form, ms (CPU time).

    Pieces: RoPE on Q and K, LPE's convolution, the input projections (one GEMM or four), and the whole
    attention layer (fast path against the plain path, both with the backend ``auto`` picks on CPU).
    """
    bm.set_clock("cpu")
    shape = bm.model_shape(size)
    n, d = shape["num_attention_heads"], shape["attention_head_dim"]
    dim, side = n * d, 16
    seq = side * side
    model = bm.build_model("sdt", size)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.gate.weight.normal_(std=0.02)
    context = GridContext.build(side, side, head_dim=d, decay_mode=attn.decay_mode, backend="dense")
    cos, sin = context.rope[0][:, None, None], context.rope[1][:, None, None]
    x = torch.randn(batch, seq, dim, requires_grad=True)
    qk = torch.randn(batch, seq, 2, n, d, requires_grad=True)
    v = torch.randn(batch, seq, dim, requires_grad=True)

    def fwd_bwd(fn):
        def run() -> None:
            out = fn()
            out.backward(torch.ones_like(out))
            for t in (x, qk, v, *attn.parameters()):
                t.grad = None
        return run

    def layer(reference: bool):
        def run():
            attn.reference_path = reference
            return attn(x, context)
        return run

    pairs = {
        "RoPE on Q and K": (lambda: kernels.rope_qk(qk, cos, sin), lambda: eq.apply_rope_tables(qk, cos, sin)),
        "LPE convolution": (lambda: kernels.depthwise_conv_tokens(v, attn.lpe.weight, attn.lpe.bias, side, side),
                            lambda: eq.local_position_encoding_tokens(v, attn.lpe, side, side)),
        "input projections": (lambda: torch.cat(attn._input_projections(x), -1),
                              lambda: torch.cat([attn.qkv(x), attn.gate(x), attn.gate_down(x)], -1)),
        "attention layer (dense)": (layer(False), layer(True)),
    }
    fns = {f"{name} | {form}": fwd_bwd(fn) for name, (fast, plain) in pairs.items()
           for form, fn in (("fast", fast), ("plain", plain))}
    times = bm.time_interleaved(fns, torch.device("cpu"), 2, repeats)
    out: dict[str, dict[str, float]] = {}
    for key, runs in times.items():
        name, form = key.split(" | ")
        out.setdefault(name, {})[form] = 1e3 * sorted(runs)[len(runs) // 2]
    attn.reference_path = False
    return out


def format_profile(results: dict[str, dict], top: int) -> str:
    """One markdown table: the ``top`` ops by |SDT - DiT| of the first SDT column, ms per step."""
    labels = list(results)
    base, first = labels[0], labels[1]
    names = set().union(*(r["ops_ms"] for r in results.values()))

    def get(label: str, name: str) -> float:
        return results[label]["ops_ms"].get(name, 0.0)

    order = sorted(names, key=lambda n: -abs(get(first, n) - get(base, n)))[:top]
    head = "| op | " + " | ".join(labels) + f" | {first} - {base} |"
    lines = [head, "|" + "---|" * (len(labels) + 2)]
    for name in order:
        cells = " | ".join(f"{get(label, name):.1f}" for label in labels)
        lines.append(f"| `{name}` | {cells} | {get(first, name) - get(base, name):+.1f} |")
    totals = " | ".join(f"**{results[label]['total_ms']:.0f}**" for label in labels)
    lines.append(f"| all ops (self time) | {totals} | "
                 f"{results[first]['total_ms'] - results[base]['total_ms']:+.0f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="S", choices=list(bm.MODEL_SIZES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", default="train", choices=["train", "sample"],
                   help="training step, or one guided sampling step (model sees 2 x batch)")
    p.add_argument("--backends", nargs="+", default=["auto"], help="SDT attention backends to profile")
    p.add_argument("--before", action="store_true",
                   help="also profile SDT on its reference path with 'augmented' (the code before the fast path)")
    p.add_argument("--compile", action="store_true", help="torch.compile (inductor) every model")
    p.add_argument("--steps", type=int, default=2, help="profiled steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--pieces", action="store_true",
                   help="instead: time each fast piece of one attention layer against its plain form (CPU time)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per piece with --pieces")
    p.add_argument("--output", default=None, help="JSON with every op's time")
    add_deprecated_alias(p, "--size", "--model-size")  # the spellings before the flags took the trainers' names
    add_deprecated_alias(p, "--batch", "--batch-size")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pieces:
        pieces = time_pieces(args.model_size, args.batch_size, args.repeats)
        env = bm.environment(torch.device("cpu"))
        print(f"{env['device']} | {env['date_utc']} | torch {env['torch']} | commit {env['git_commit']} | "
              f"{args.model_size}/2 shapes, batch {args.batch_size}, fwd+bwd, ms CPU time "
              f"(median of {args.repeats})")
        print("| piece | fast | plain | fast / plain |\n|---|---|---|---|")
        for name, t in pieces.items():
            print(f"| {name} | {t['fast']:.2f} | {t['plain']:.2f} | {t['fast'] / t['plain']:.2f} |")
        if args.output:
            with open(args.output, "w") as f:
                json.dump({"env": env, "command": "python " + " ".join(sys.argv), "pieces_ms": pieces}, f, indent=2)
        return pieces
    results = profile_models(args.model_size, args.batch_size, args.backends, args.steps, args.warmup, args.mode,
                             args.before, args.compile)
    table = format_profile(results, args.top)
    env = bm.environment(torch.device("cpu"))
    print(f"{env['device']} | {env['date_utc']} | torch {env['torch']} | commit {env['git_commit']} | "
          f"{args.mode} step, {args.model_size}/2, batch {args.batch_size}{', compiled' if args.compile else ''}, "
          "ms per step (self CPU time)")
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"env": env, "command": "python " + " ".join(sys.argv), "settings": vars(args),
                       "results": results, "table": table}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
