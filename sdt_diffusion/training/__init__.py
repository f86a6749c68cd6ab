"""Training library behind ``training/train.py``, ``training/extract_latents.py`` and ``training/export_pipeline.py``
(DiT's recipe for SDT-P).

Modules (imported on demand, so ``import sdt_diffusion`` stays light), in the order a run uses them; the data
(image folders, saved datasets, the latent cache, the seeded ``EpochSampler``) comes from :mod:`sdt_diffusion.data`:

* ``config``: flags, YAML configs (``parse_args``), static validation (``ConfigError``) and the explicit
  ``TrainSettings`` the steps below take;
* ``plan``: the batch split, the data and its shapes, the model config and the resume point, checked
  before any compute (``plan_run``);
* ``diffusion``: the noise schedule and the hybrid loss (``normal_kl``, ``discretized_gaussian_log_likelihood``,
  ``vlb_terms``, ``training_losses``);
* ``ema``: DiT's constant-decay EMA;
* ``step``: one optimizer step (``train_step``, ``NonFiniteLossError``);
* ``heldout``: the held-out loss on a fixed set; ``tracking``: ``metrics.jsonl``, trackers;
  ``signals``: SIGTERM/SIGINT as a stop request;
* ``state_files``: the training state in formats that cannot carry code (safetensors, JSON);
* ``checkpointing``: atomic, verified ``checkpoint-<step>`` folders, ``--resume`` resolution, pruning,
  ``training_done.json``;
* ``export``: the EMA ``SDTPipeline`` export (from a live run or a checkpoint: ``sdt-export``) and sample grids;
* ``trainer``: ``train(args)`` and ``main(argv)``; ``extract``: ``extract_latents(args)`` and ``main(argv)``.

The SDT-H classifier's trainer (``training/train_classifier.py``) reuses the pieces above and adds
``classifier_config`` (flags and the paper's recipe), ``classifier_data`` (seeded timm augmentations, repeated
augmentation, Mixup) and ``classifier_trainer`` (``train_classifier(args)`` and ``main(argv)``).
"""

__all__ = [
    "checkpointing",
    "classifier_config",
    "classifier_data",
    "classifier_trainer",
    "config",
    "diffusion",
    "ema",
    "export",
    "extract",
    "heldout",
    "plan",
    "signals",
    "state_files",
    "step",
    "tracking",
    "trainer",
]
