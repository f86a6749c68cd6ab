"""Training library behind ``training/train.py`` and ``training/extract_latents.py`` (DiT's recipe for SDT-P).

Modules (imported on demand, so ``import sdt_diffusion`` stays light):

* ``config``: flags, YAML configs (``parse_args``), static validation (``ConfigError``);
* ``data``: ADM centre crop, image folders / saved datasets, the latent cache, the seeded ``EpochSampler``;
* ``diffusion``: the noise schedule and the hybrid loss (``normal_kl``, ``discretized_gaussian_log_likelihood``,
  ``vlb_terms``, ``training_losses``);
* ``ema``: DiT's constant-decay EMA;
* ``checkpointing``: atomic ``checkpoint-<step>`` folders, ``--resume`` resolution, pruning;
* ``export``: the EMA ``SDTPipeline`` export and labelled sample grids;
* ``trainer``: ``train(args)`` and ``main(argv)``; ``extract``: ``extract_latents(args)`` and ``main(argv)``.
"""

__all__ = ["checkpointing", "config", "data", "diffusion", "ema", "export", "extract", "trainer"]
