"""Train SDT-H with the paper's ImageNet recipe:
``accelerate launch training/train_classifier.py --model SDT-H-T --data-dir .../train --eval-data-dir .../val
--output-dir ...``.

A thin wrapper around :func:`sdt_diffusion.training.classifier_trainer.cli` (also installed as
``sdt-train-classifier``); see ``docs/training_sdt_h.md`` and ``python training/train_classifier.py --help``.
"""

from sdt_diffusion.training.classifier_trainer import cli

if __name__ == "__main__":
    cli()
