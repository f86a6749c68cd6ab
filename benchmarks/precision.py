"""How exact are the fused ("augmented", "dense") spatial-decay attentions?  Errors against the float64 math reference.

* float64 / float32: outputs and gradients (q, k, v, gate logits) of "augmented", "dense" and "sdpa" vs "math".
* bf16 (CPU): q, k, v rounded to bf16, gates in float32, output vs the float64 reference on the
  unrounded inputs; for the fused form used here, for the dense bias cast to bf16 ("sdpa"), for the
  dense bias kept in float32 with bf16 q/k/v (the floor bf16 inputs allow), and for the 0/1-code
  layout (unit codes u_t = 1[x < t], the identity before re-centring to +-1 codes) with every feature rounded separately (shown for comparison only).

    python benchmarks/precision.py [--device cuda] [--output precision.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.attention.backends import ATTENTION_BACKENDS, DecayInputs, math_attention

DEVICE = torch.device("cpu")


def make_problem(height: int, width: int, batch: int, heads: int, head_dim: int, logit_std: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = height * width
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    logits = logit_std * torch.randn(batch, seq, heads, generator=g, dtype=torch.float64)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), logits.to(DEVICE)


def reference_layout_attention(q, k, v, gates, height: int, width: int, alpha: float):
    """The un-centred 0/1-code layout of the low-rank identity: 0/1 codes, query s[1, G_i, c_i, -2 G_i U_i, -2 U_i], key [G_j c_j, c_j, G_j, U_j, G_j U_j],
    each feature computed in float32 and rounded to q's dtype on its own (comparison only)."""
    u = (eq.threshold_codes(height, width, q.device) + 1) / 2  # u_t = 1[x < t]
    c = u.sum(-1)
    g = gates.transpose(1, 2).float()[..., None]  # (B, N, L, 1)
    uu = u.expand(*g.shape[:-1], u.shape[-1])
    cc = c[:, None].expand_as(g)
    s = alpha / 2 * math.sqrt(q.shape[-1])
    f_q = s * torch.cat([torch.ones_like(g), g, cc, -2 * g * uu, -2 * uu], dim=-1)
    f_k = torch.cat([g * cc, cc, g, uu, g * uu], dim=-1)
    q_aug = torch.cat([q, f_q.to(q.dtype)], dim=-1)
    k_aug = torch.cat([k, f_k.to(k.dtype)], dim=-1)
    v_pad = F.pad(v, (0, q_aug.shape[-1] - v.shape[-1]))
    return F.scaled_dot_product_attention(q_aug, k_aug, v_pad, scale=1 / math.sqrt(q.shape[-1]))[..., : v.shape[-1]]


def exactness(dtype: torch.dtype, height: int = 16, width: int = 16) -> dict[str, dict[str, float]]:
    """Max |difference| to float64 "math" of outputs and every gradient, for "augmented", "dense" and "sdpa" in ``dtype``."""
    q, k, v, logits = make_problem(height, width, 2, 6, 64, 1.0)
    rows: dict[str, dict[str, float]] = {}

    def run(backend: str, cast: torch.dtype):
        leaves = [t.to(cast).requires_grad_() for t in (q, k, v, logits)]
        decay = DecayInputs("cdsf", height, width, 0.1, gates=eq.context_aware_gates(leaves[3]))
        out = ATTENTION_BACKENDS[backend](*leaves[:3], decay)
        grads = torch.autograd.grad(out.double().square().sum(), leaves)
        return [out, *grads]

    ref = run("math", torch.float64)
    for backend in ("augmented", "dense", "sdpa"):
        res = run(backend, dtype)
        rows[backend] = {name: (a.double() - b).abs().max().item()
                         for name, a, b in zip(("out", "dq", "dk", "dv", "dlogits"), res, ref)}
    return rows


def bf16_errors(logit_std: float, height: int = 16, width: int = 16, seeds: int = 3) -> dict[str, dict[str, float]]:
    """Mean and max |output error| in bf16 against the float64 reference, averaged over ``seeds``."""
    acc: dict[str, list[tuple[float, float]]] = {}
    for seed in range(seeds):
        q, k, v, logits = make_problem(height, width, 4, 6, 64, logit_std, seed)
        gates = eq.context_aware_gates(logits)
        with torch.no_grad():
            ref = math_attention(q, k, v, DecayInputs("cdsf", height, width, 0.1, gates=gates))
            qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
            decay = DecayInputs("cdsf", height, width, 0.1, gates=gates.float())
            bias = eq.spatial_decay_bias(gates.reshape(4, height, width, 6), 0.1)
            outs = {
                "augmented (bf16)": ATTENTION_BACKENDS["augmented"](qb, kb, vb, decay),
                "dense (bf16 q/k/v, bias cast to bf16)": ATTENTION_BACKENDS["dense"](qb, kb, vb, decay),
                "sdpa, dense bias cast to bf16": ATTENTION_BACKENDS["sdpa"](qb, kb, vb, decay),
                "floor: bf16 q/k/v, float32 bias": eq.attention_with_bias(qb, kb, vb, bias.float()),
                "0/1-code layout (bf16)": reference_layout_attention(qb, kb, vb, gates, height, width, 0.1),
            }
        for name, out in outs.items():
            err = (out.double() - ref).abs()
            acc.setdefault(name, []).append((err.mean().item(), err.max().item()))
    return {name: {"mean_abs": sum(m for m, _ in v) / len(v), "max_abs": max(x for _, x in v)}
            for name, v in acc.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the bf16 kernels differ per device)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    results = {"device": str(DEVICE), "torch": torch.__version__, "exactness": {str(dt): exactness(dt) for dt in (torch.float64, torch.float32)},
               "bf16": {str(s): bf16_errors(s) for s in (0.0, 1.0, 3.0, 6.0)}}
    print("max |diff| to float64 math, 16x16 grid, 6 heads x 64, gate logits ~ N(0, 1)")
    print("| dtype | backend | out | dq | dk | dv | d gate logits |\n|---|---|---|---|---|---|---|")
    for dt, rows in results["exactness"].items():
        for backend, r in rows.items():
            print(f"| {dt} | {backend} | " + " | ".join(f"{r[n]:.1e}" for n in ("out", "dq", "dk", "dv", "dlogits"))
                  + " |")
    print("\nbf16 forward, |output error| vs float64 math (mean / max over 3 seeds, batch 4, 16x16, 6 x 64)")
    print("| gate logits std | path | mean | max |\n|---|---|---|---|")
    for std, rows in results["bf16"].items():
        for name, r in rows.items():
            print(f"| {std} | {name} | {r['mean_abs']:.2e} | {r['max_abs']:.2e} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
