"""SDT-H in timm: ``sdt_h_tiny``, ``sdt_h_small`` and ``sdt_h_base`` for ``timm.create_model``, and the RMT
baselines built by the same code: ``rmt_tiny``, ``rmt_small`` and ``rmt_base`` (RMT's RMT_T3 / RMT_S / RMT_M2).

Importing this module (``import sdt_diffusion`` does it when timm is installed) registers the six models.
They are :class:`~sdt_diffusion.models.sdt_h.SDTH` built through timm's ``build_model_with_cfg``, so
``features_only=True`` (multi-scale NCHW maps through ``forward_intermediates``), ``pretrained_cfg`` and
``timm.data.resolve_data_config`` work as for timm's own models.  Architecture keyword arguments have the
names of :class:`~sdt_diffusion.models.sdt_h.SDTH` (``decay_modes``, ``alpha``, ``drop_path_rate``, ...);
the number of classes and input channels take timm's names ``num_classes`` and ``in_chans``.

No pretrained weights are published: ``pretrained=True`` only works with a local file given through
``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .sdt_h import IMAGENET_MEAN, IMAGENET_STD, PRESET_OF_TIMM_NAME, SDTH, sdt_h_preset


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """Evaluation transform of the paper (RMT's protocol): resize 256 -> centre crop 224, bicubic, ImageNet mean/std."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in PRESET_OF_TIMM_NAME})


def _sdt_h_from_timm_kwargs(num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", **kwargs: Any) -> SDTH:
    """Map timm's ``num_classes`` / ``in_chans`` onto SDT-H's ``num_labels`` / ``num_channels``."""
    for ours, theirs in (("num_labels", "num_classes"), ("num_channels", "in_chans")):
        if ours in kwargs:
            raise ValueError(f"timm.create_model takes timm's {theirs}=, not {ours}= (timm always sets {theirs})")
    if global_pool != "avg":
        raise ValueError(f"global_pool must be 'avg' (SDT-H's head normalises before pooling), got {global_pool!r}")
    return SDTH(num_labels=num_classes, num_channels=in_chans, **kwargs)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SDTH:
    arch = {**sdt_h_preset(PRESET_OF_TIMM_NAME[variant]), **kwargs}
    out_indices = arch.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        _sdt_h_from_timm_kwargs, variant, pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **arch,
    )


@register_model
def sdt_h_tiny(pretrained: bool = False, **kwargs: Any) -> SDTH:
    """SDT-H-T: 14M parameters, 2.7 GFLOPs at 224^2 (paper, Table 1)."""
    return _create("sdt_h_tiny", pretrained, **kwargs)


@register_model
def sdt_h_small(pretrained: bool = False, **kwargs: Any) -> SDTH:
    """SDT-H-S: 27M parameters, 4.8 GFLOPs at 224^2 (paper, Table 1)."""
    return _create("sdt_h_small", pretrained, **kwargs)


@register_model
def sdt_h_base(pretrained: bool = False, **kwargs: Any) -> SDTH:
    """SDT-H-B: 54M parameters, 10.8 GFLOPs at 224^2 (paper, Table 1)."""
    return _create("sdt_h_base", pretrained, **kwargs)


@register_model
def rmt_tiny(pretrained: bool = False, **kwargs: Any) -> SDTH:
    """RMT-T (RMT's RMT_T3) built by SDT-H's code: 14,334,216 parameters, as RMT's own."""
    return _create("rmt_tiny", pretrained, **kwargs)


@register_model
def rmt_small(pretrained: bool = False, **kwargs: Any) -> SDTH:
    """RMT-S (RMT's RMT_S) built by SDT-H's code: 26,967,240 parameters, as RMT's own."""
    return _create("rmt_small", pretrained, **kwargs)


@register_model
def rmt_base(pretrained: bool = False, **kwargs: Any) -> SDTH:
    """RMT-B (RMT's RMT_M2) built by SDT-H's code: 54,154,896 parameters, as RMT's own."""
    return _create("rmt_base", pretrained, **kwargs)


__all__ = ["default_cfgs", "rmt_base", "rmt_small", "rmt_tiny", "sdt_h_base", "sdt_h_small", "sdt_h_tiny"]
