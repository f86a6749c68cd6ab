"""FID-50K metrics (FID, sFID, IS, precision, recall; ADM definitions) of a sample batch against a reference.

    python eval/evaluate.py samples.npz VIRTUAL_imagenet256_labeled.npz --output results.json --compare XL

The checkout script of ``sdt-fid`` (also ``python -m sdt_diffusion.evaluation.evaluate``).  All logic lives in
``sdt_diffusion.evaluation.evaluate`` (``--help`` lists the options).
"""

import sys

from sdt_diffusion.evaluation.evaluate import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
