"""SDT-P against diffusers' DiT of the same size: training step, sampling throughput, attention alone, MFU.

One run measures everything and prints a table last; ``--output`` also gets a JSON file with the
device, date, torch version and git commit.  Definitions: ``sdt_diffusion/benchmarking.py``.

    # GPU (bf16 autocast): S/2 .. XL/2 at batch 32, sampling batch 64 x 250 steps
    python benchmarks/benchmark.py --output benchmarks/results_h100.json
    # CPU (float32): S/2 at batch 8, with the model as it was before the fast path in the same loop
    python benchmarks/benchmark.py --device cpu --model-sizes S --batch-size 8 --sample-batch 4 --before --output cpu.json
    # both models under torch.compile (inductor)
    python benchmarks/benchmark.py --device cpu --model-sizes S --batch-size 8 --compile --skip-memory --attn-tokens
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import harness as bm
import torch

from sdt_diffusion.attention.backends import resolve_backend_name
from sdt_diffusion.utils.cli_args import add_deprecated_alias
from sdt_diffusion.utils.runtime import default_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--model-sizes", nargs="+", default=None, choices=list(bm.MODEL_SIZES),
                   help="model sizes (default: S B L XL on CUDA, S on CPU)")
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 32 on CUDA, 8 on CPU)")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="images per guided sampling step; the model sees twice as many (default 64 CUDA, 4 CPU)")
    p.add_argument("--sample-steps", type=int, default=250, help="DDPM steps the images/s figure assumes")
    p.add_argument("--attn-tokens", type=int, nargs="*", default=[256, 1024],
                   help="token counts (square grids) for the attention-alone benchmark; none to skip")
    p.add_argument("--attn-batch", type=int, default=None, help="batch of the attention benchmark (default: --batch-size)")
    p.add_argument("--attn-size", default=None, choices=list(bm.MODEL_SIZES),
                   help="heads and head width of the attention benchmark (default: the largest of --model-sizes)")
    p.add_argument("--attn-backends", nargs="+", default=None,
                   help="backends to time against SDPA without bias (default: sdpa augmented dense flex math)")
    p.add_argument("--attention-backend", default="auto", help="SDT's attention_backend for the model benchmarks")
    p.add_argument("--decay-mode", default="cdsf")
    p.add_argument("--before", action="store_true",
                   help="also time SDT on its reference path (the code before the fast path) in the same loop")
    p.add_argument("--before-backend", default="augmented",
                   help="attention backend of the --before model ('augmented': what 'auto' chose before)")
    p.add_argument("--compile", action="store_true", help="torch.compile (inductor) every model")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3 CUDA, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default 10 CUDA, 5 CPU)")
    p.add_argument("--peak-tflops", type=float, default=bm.H100_BF16_DENSE_TFLOPS,
                   help="dense bf16 peak for MFU (H100/H200 SXM: 989); MFU is reported on CUDA only")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-sample", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: this process's CPU time (CPU device; with --threads 1 the "
                        "single-core time of a step, unaffected by other processes on a shared machine)")
    p.add_argument("--output", default=None, help="JSON file for all results")
    # the spellings before the flags took the trainers' names
    add_deprecated_alias(p, "--sizes", "--model-sizes")
    add_deprecated_alias(p, "--batch", "--batch-size")
    add_deprecated_alias(p, "--backend", "--attention-backend")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = default_device(args.device).type
    device = torch.device(name)
    cuda = device.type == "cuda"
    if args.clock == "cpu" and cuda:
        raise SystemExit("--clock cpu measures CPU time; CUDA kernels need --clock wall")
    bm.set_clock(args.clock)
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 leftovers, as DiT trains
    sizes = args.model_sizes or (["S", "B", "L", "XL"] if cuda else ["S"])
    batch = args.batch_size or (32 if cuda else 8)
    sample_batch = args.sample_batch or (64 if cuda else 4)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    repeats = args.repeats or (10 if cuda else 5)
    attn_size = args.attn_size or max(sizes, key=lambda s: bm.MODEL_SIZES[s][1])
    attn_backends = args.attn_backends or ["sdpa", "augmented", "dense", "flex", "math"]

    results: dict = {
        "env": bm.environment(device),
        "command": "python " + " ".join(sys.argv),
        "settings": {**vars(args), "sizes": sizes, "batch": batch, "sample_batch": sample_batch, "warmup": warmup,
                     "repeats": repeats, "attn_size": attn_size,
                     "sdt_backend_resolved": resolve_backend_name(args.attention_backend, device, args.decay_mode,
                                                                  (32 // args.patch_size) ** 2)},
        "train": [], "sample": [], "attention": [],
    }
    results["errors"] = []
    for size in sizes:
        if not args.skip_train:
            print(f"[train] {size}/{args.patch_size} batch {batch}", flush=True)
            try:
                results["train"].append(bm.benchmark_training(
                    size, batch, device, warmup, repeats, args.attention_backend, args.decay_mode, args.patch_size,
                    measure_memory=not args.skip_memory, peak_tflops=args.peak_tflops if cuda else None,
                    before=args.before, before_backend=args.before_backend, compile_model=args.compile))
            except Exception as err:  # e.g. out of memory: keep the other sizes
                results["errors"].append(f"train {size}: {type(err).__name__}: {err}")
        if not args.skip_sample:
            print(f"[sample] {size}/{args.patch_size} batch {sample_batch} x2", flush=True)
            try:
                results["sample"].append(bm.benchmark_sampling(
                    size, sample_batch, args.sample_steps, device, warmup, repeats, args.attention_backend, args.decay_mode,
                    args.patch_size, before=args.before, before_backend=args.before_backend,
                    compile_model=args.compile))
            except Exception as err:
                results["errors"].append(f"sample {size}: {type(err).__name__}: {err}")
        if cuda:
            torch.cuda.empty_cache()
    shape = bm.model_shape(attn_size)
    for tokens in args.attn_tokens:
        print(f"[attention] {tokens} tokens, {attn_size} heads", flush=True)
        results["attention"] += bm.benchmark_attention(
            tokens, args.attn_batch or batch, shape["num_attention_heads"], shape["attention_head_dim"], device,
            attn_backends, warmup, repeats, args.decay_mode)

    if hasattr(os, "getloadavg"):
        results["env"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    results = bm.as_json(results)
    table = bm.format_tables(results)
    results["table"] = table
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    env = results["env"]
    print(f"\n{env['device']} | {env['date_utc']} | torch {env['torch']} | commit {env['git_commit']} | "
          f"SDT backend {results['settings']['sdt_backend_resolved']}")
    print(table)
    for err in results["errors"]:
        print("ERROR", err)
    return results


if __name__ == "__main__":
    main()
