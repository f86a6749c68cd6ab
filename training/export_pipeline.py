"""Export a training checkpoint's EMA weights as an SDTPipeline folder (the input of ``eval/sample.py``):
``python training/export_pipeline.py runs/x/checkpoint-400000 --output-dir runs/x/pipeline-400k [--vae ...]``.

A thin wrapper around :func:`sdt_diffusion.training.export.main` (also installed as ``sdt-export``).
"""

from sdt_diffusion.training.export import main

if __name__ == "__main__":
    raise SystemExit(main())
