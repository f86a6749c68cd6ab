"""Train SDT-P with DiT's recipe: ``accelerate launch training/train.py --model SDT-P-XL/2 --data-dir ... --output-dir ...``.

A thin wrapper around :func:`sdt_diffusion.training.trainer.cli` (also installed as ``sdt-train``); see
``docs/training.md`` and ``python training/train.py --help``.
"""

from sdt_diffusion.training.trainer import cli

if __name__ == "__main__":
    cli()
