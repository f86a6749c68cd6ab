"""Top-1 / top-5 of a saved classifier with the standard evaluation transform (resize 256 bicubic -> centre crop
224, ImageNet mean/std):

    python eval/classify.py runs/sdt-h-t/model /data/imagenet/val --output top1.json

The checkout script of ``sdt-classify`` (also ``python -m sdt_diffusion.evaluation.classification``).  MODEL is
a transformers folder, a timm folder or a timm weight file (``--arch``); DATA an image folder with one sub-folder
per class or a ``save_to_disk`` dataset, or ``--dataset`` anything ``datasets.load_dataset`` takes.  All logic lives in ``sdt_diffusion.evaluation.classification``
(``--help`` lists the options).
"""

import sys

from sdt_diffusion.evaluation.classification import classify_main

if __name__ == "__main__":
    sys.exit(classify_main())
