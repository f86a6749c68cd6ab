"""Sample an ADM-format npz for FID-50K: ``accelerate launch eval/sample.py --pipeline DIR --output samples.npz``.

The checkout script of ``sdt-fid-sample`` (also ``python -m sdt_diffusion.evaluation.sampling``).  Resumable
(rerun the same command after a crash) and independent of the number of processes; see
``sdt_diffusion.evaluation.sampling`` for how.  A training checkpoint is exported to a pipeline folder first
(``sdt-export CHECKPOINT --output-dir DIR``).
"""

from sdt_diffusion.evaluation.sampling import main

if __name__ == "__main__":
    raise SystemExit(main())
