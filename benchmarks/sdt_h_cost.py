"""SDT-H presets: trainable parameters and forward GFLOPs at 224x224, against the paper's and RMT's figures.

FLOPs follow the paper's convention (fvcore's): one multiply-add = one FLOP.  They are counted with
``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-add, so its total is halved.
Counted: convolutions, linear layers and the attention matmuls (Q K^T and P V; the ``math`` backend, so the
decay bias, softmax, norms, activations and pooling, elementwise work, are not counted: fvcore would add
its small norm counts).  Models are built on the meta device (no weights, no compute), so the script takes
seconds.  Each preset is measured with the paper's text layout (decomposed decay in stages 1-2, CDSF in
stages 3-4, the default) and with stage 3 decomposed as well (RMT's layout for S and B).

    python benchmarks/sdt_h_cost.py                 # Markdown table
    python benchmarks/sdt_h_cost.py --output cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdt_diffusion.models import count_parameters
from sdt_diffusion.models.sdt_h import SDT_H_PRESETS, SDTH
from sdt_diffusion.utils.cli_args import add_deprecated_alias

# Paper, Table 1 (params M, GFLOPs at 224^2); RMT's released models (exact counts; fvcore GFLOPs measured on
# RMT's code: RMT_T3 2.65, RMT_S 4.80, RMT_M2 10.41; RMT's paper rounds them to 2.5 / 4.5 / 9.7).
PAPER: dict[str, tuple[float, float]] = {"SDT-H-T": (14, 2.7), "SDT-H-S": (27, 4.8), "SDT-H-B": (54, 10.8)}
RMT_PARAMS: dict[str, int] = {"SDT-H-T": 14_334_216, "SDT-H-S": 26_967_240, "SDT-H-B": 54_154_896}
LAYOUTS: dict[str, tuple[str, ...]] = {
    "paper text (dec, dec, cdsf, cdsf)": ("decomposed", "decomposed", "cdsf", "cdsf"),
    "stage 3 decomposed (dec, dec, dec, cdsf)": ("decomposed", "decomposed", "decomposed", "cdsf"),
}


def measure(preset: str, decay_modes: tuple[str, ...], size: int = 224) -> dict[str, Any]:
    """Parameters and multiply-add GFLOPs of one forward pass of ``preset`` on a 1 x 3 x size x size image."""
    with torch.device("meta"):
        model = SDTH.from_preset(preset, decay_modes=decay_modes, attention_backend="math").eval()
        x = torch.empty(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    macs = counter.get_total_flops() / 2  # FlopCounterMode: 2 FLOPs per multiply-add
    return {"preset": preset, "decay_modes": list(decay_modes), "params": count_parameters(model),
            "gflops": macs / 1e9, "image_size": size}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | decay per stage | params (ours) | params (paper) | params (RMT) | GFLOPs (ours) | GFLOPs (paper) "
        "| ours / paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper_p, paper_g = PAPER[r["preset"]]
        lines.append(
            f"| {r['preset']} | {r['layout']} | {r['params'] / 1e6:.2f}M | {paper_p}M | {RMT_PARAMS[r['preset']] / 1e6:.2f}M "
            f"| {r['gflops']:.2f} | {paper_g} | {r['gflops'] / paper_g:.3f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=224, help="square input side (a multiple of 32)")
    p.add_argument("--output", default=None, help="JSON file for the rows")
    add_deprecated_alias(p, "--size", "--resolution")  # the spelling before the flags took the trainers' names
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    rows = []
    for preset in PAPER:  # the SDT-H presets (the RMT presets: tests/test_rmt.py, docs/sdt_h.md)
        for layout, modes in LAYOUTS.items():
            rows.append({**measure(preset, modes, args.resolution), "layout": layout,
                         "gate_rank": SDT_H_PRESETS[preset]["gate_rank"]})
    print(f"SDT-H at {args.resolution}x{args.resolution}, 1 multiply-add = 1 FLOP (FlopCounterMode total / 2):\n")
    print(table(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
