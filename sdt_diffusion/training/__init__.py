"""Training library behind ``training/train.py`` (``sdt-train``), ``training/train_classifier.py``
(``sdt-train-classifier``), ``training/extract_latents.py`` (``sdt-extract-latents``) and
``training/export_pipeline.py`` (``sdt-export``).

One engine runs every training task; a task supplies its plan, model, loss, evaluations and export.
Modules (imported on demand, so ``import sdt_diffusion`` stays light):

* the engine: ``engine`` (the task interface, planning and resume checks, exact restore, the loop, checkpoints,
  signals, the NaN stop, the command-line plumbing), ``step`` (one optimizer step), ``tracking``
  (``metrics.jsonl``, trackers), ``signals``, ``state_files`` and ``checkpointing`` (atomic, code-free,
  verified checkpoints), ``ema``;
* settings: ``flags`` (flags generated from settings dataclasses, YAML recipes under ``--config``),
  ``config`` (the settings every task shares, declared once), ``recipes/`` (the packaged recipes: SDT-P with
  DiT's recipe and the paper's four sizes, SDT-H with the paper's recipe and its three sizes);
* the diffusion task (SDT-P / DiT): ``diffusion_config`` (its flags), ``plan`` (data, VAE, model config),
  ``diffusion`` (the noise schedule and the hybrid loss), ``heldout`` (the held-out loss), ``export`` (the EMA ``SDTPipeline`` and
  sample grids; ``sdt-export``), ``trainer`` (the task, ``train(args)``, ``main(argv)``), ``extract`` (the
  latent cache);
* the classification task (SDT-H): ``classifier_config`` (its flags), ``classifier_data`` (seeded timm
  augmentations, repeated augmentation, Mixup), ``classifier_trainer`` (the task, ``train_classifier(args)``,
  ``main(argv)``).

The data every task reads (image folders, saved datasets, the latent cache, the seeded ``EpochSampler``) comes
from :mod:`sdt_diffusion.data`, one floor below.
"""

__all__ = [
    "checkpointing",
    "classifier_config",
    "classifier_data",
    "classifier_trainer",
    "config",
    "diffusion",
    "diffusion_config",
    "ema",
    "engine",
    "export",
    "extract",
    "flags",
    "heldout",
    "plan",
    "signals",
    "state_files",
    "step",
    "tracking",
    "trainer",
]
