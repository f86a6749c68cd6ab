"""FID-50K metrics (FID, sFID, IS, precision, recall; ADM definitions) of a sample batch against a reference.

    python eval/evaluate.py samples.npz VIRTUAL_imagenet256_labeled.npz --output results.json --compare XL

All logic lives in ``sdt_diffusion.evaluation`` (see ``evaluate_main`` for the options, or ``--help``).
"""

import sys

from sdt_diffusion.evaluation import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
