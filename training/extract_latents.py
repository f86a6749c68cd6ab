"""Pre-extract SD-VAE latents (both flips) for ``train.py --latents-dir``.

``accelerate launch training/extract_latents.py --data-dir /data/imagenet/train --output-dir /data/latents``;
each process writes its own shard. A thin wrapper around :func:`sdt_diffusion.training.extract.main` (also
installed as ``sdt-extract-latents``).
"""

from sdt_diffusion.training.extract import main

if __name__ == "__main__":
    raise SystemExit(main())
