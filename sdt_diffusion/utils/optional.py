"""Optional dependencies: imported where they are used, with an error that names the extra to install.

The core install covers the models, the pipeline and training; the demo, the decay-map pictures, the
metrics, the loggers and SDT-H's timm models need extras (``pyproject.toml``: ``demo``, ``eval``,
``tensorboard``, ``wandb``, ``timm``).  Their imports stay inside the functions
that need them so that ``import sdt_diffusion`` and every console script load without them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# pip distribution of each optional top-level module whose name differs from it.
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "torch_fidelity": "torch-fidelity"}


def import_optional(module: str, extra: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``), which the ``extra`` of sdt-diffusion provides.

    Raises:
        ImportError: the module's package is not installed; the message names the extra and the package.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is missing: keep pip's message
        package = _DISTRIBUTIONS.get(top, top)
        raise ImportError(
            f"{module} is not installed; it comes with the {extra!r} extra: "
            f"pip install 'sdt-diffusion[{extra}]' (or pip install {package})"
        ) from e


__all__ = ["import_optional"]
