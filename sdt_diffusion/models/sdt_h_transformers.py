"""SDT-H in transformers: ``SDTHConfig``, ``SDTHModel``, ``SDTHForImageClassification``, ``SDTHBackbone``.

All three models wrap :class:`~sdt_diffusion.models.sdt_h.SDTH` (the one implementation, also behind
the timm models) as ``encoder``; the config's architecture fields have its argument names.  Importing
this module registers ``model_type="sdt_h"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForImageClassification`` and ``AutoBackbone``.  ``save_pretrained`` writes safetensors and,
unless the folder already has one, an image-processor config with the paper's evaluation transform
(resize 256 -> centre crop 224, bicubic, ImageNet mean/std), so that
``pipeline("image-classification", model=folder)`` works offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    ConvNextImageProcessor,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.image_utils import PILImageResampling
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

try:  # transformers >= 5
    from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin
except ImportError:  # transformers 4.x
    from transformers.utils.backbone_utils import BackboneConfigMixin, BackboneMixin

from .sdt_h import (
    DEFAULT_DECAY_MODES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SDTH,
    check_sdt_h_args,
    init_sdt_h_module,
    sdt_h_preset,
)

PREPROCESSOR_CONFIG = "preprocessor_config.json"


class SDTHConfig(BackboneConfigMixin, PretrainedConfig):
    """Configuration of SDT-H (default: SDT-H-T, 1000 classes).

    The architecture fields are the keyword arguments of :class:`~sdt_diffusion.models.sdt_h.SDTH` (see it
    for their meaning): ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``, ``decay_modes`` (one per
    stage), ``alpha``, ``drop_path_rate``, ``layer_scale_init_values``, ``gate_rank``, ``head_hidden_size``,
    ``num_channels``, ``lpe_kernel_size``, ``use_rope``, ``rope_base``, ``rope_layout``, ``fixed_decay_init``,
    ``fixed_decay_ranges``, ``layer_norm_eps``, ``attention_backend``, ``initializer_range``,
    ``output_gate_init``, ``decay_gate_init`` (how the gates start; they apply to freshly initialised weights only,
    never to weights ``from_pretrained`` loads); ``num_labels``
    (or ``id2label``) sets the classes.  For :class:`SDTHBackbone`, ``out_features`` / ``out_indices``
    select among ``stage_names = ["stem", "stage1", ..., "stage4"]`` (transformers' convention: index 0
    is the stem, at stride 4 like stage 1).
    """

    model_type = "sdt_h"

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 8, 2),
        num_heads: Sequence[int] = (4, 4, 8, 16),
        mlp_ratios: Sequence[float] = (3.0, 3.0, 3.0, 3.0),
        decay_modes: Sequence[str] = DEFAULT_DECAY_MODES,
        alpha: float = 0.1,
        drop_path_rate: float = 0.1,
        layer_scale_init_values: Sequence[float | None] = (None, None, None, None),
        gate_rank: int = 8,
        head_hidden_size: int = 1024,
        num_channels: int = 3,
        lpe_kernel_size: int = 5,
        use_rope: bool = True,
        rope_base: float = 10000.0,
        rope_layout: str = "2d",
        fixed_decay_init: float = 2.0,
        fixed_decay_ranges: Sequence[float] = (4.0, 4.0, 6.0, 6.0),
        layer_norm_eps: float = 1e-6,
        attention_backend: str = "auto",
        initializer_range: float = 0.02,
        output_gate_init: str = "xavier",
        decay_gate_init: str = "zero",
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("id2label") is None and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = 1000  # ImageNet-1K, the paper's task
        super().__init__(**kwargs)
        args = check_sdt_h_args(
            embed_dims=embed_dims, depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios, decay_modes=decay_modes,
            layer_scale_init_values=layer_scale_init_values, fixed_decay_ranges=fixed_decay_ranges,
            drop_path_rate=drop_path_rate, gate_rank=gate_rank, use_rope=use_rope, rope_layout=rope_layout,
            num_channels=num_channels, head_hidden_size=head_hidden_size, attention_backend=attention_backend,
            alpha=alpha, output_gate_init=output_gate_init, decay_gate_init=decay_gate_init,
        )
        self.embed_dims = list(args["embed_dims"])
        self.depths = list(args["depths"])
        self.num_heads = list(args["num_heads"])
        self.mlp_ratios = list(args["mlp_ratios"])
        self.decay_modes = list(args["decay_modes"])
        self.alpha = alpha
        self.drop_path_rate = drop_path_rate
        self.layer_scale_init_values = list(args["layer_scale_init_values"])
        self.gate_rank = gate_rank
        self.head_hidden_size = head_hidden_size
        self.num_channels = num_channels
        self.lpe_kernel_size = lpe_kernel_size
        self.use_rope = use_rope
        self.rope_base = rope_base
        self.rope_layout = rope_layout
        self.fixed_decay_init = fixed_decay_init
        self.fixed_decay_ranges = list(args["fixed_decay_ranges"])
        self.layer_norm_eps = layer_norm_eps
        self.attention_backend = attention_backend
        self.initializer_range = initializer_range
        self.output_gate_init = output_gate_init
        self.decay_gate_init = decay_gate_init
        self.hidden_sizes = list(self.embed_dims)  # transformers' name for the stage widths
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.embed_dims) + 1)]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> SDTHConfig:
        """The config of a preset (``SDT-H-T/S/B``, or RMT's ``RMT-T/S/B`` built by the same code); keyword arguments
        override the preset's."""
        return cls(**{**sdt_h_preset(name), **kwargs})

    def sdt_h_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~sdt_diffusion.models.sdt_h.SDTH` (all but ``num_labels``)."""
        return dict(
            embed_dims=self.embed_dims, depths=self.depths, num_heads=self.num_heads, mlp_ratios=self.mlp_ratios,
            decay_modes=self.decay_modes, alpha=self.alpha, drop_path_rate=self.drop_path_rate,
            layer_scale_init_values=self.layer_scale_init_values, gate_rank=self.gate_rank,
            head_hidden_size=self.head_hidden_size, num_channels=self.num_channels,
            lpe_kernel_size=self.lpe_kernel_size, use_rope=self.use_rope, rope_base=self.rope_base,
            rope_layout=self.rope_layout, fixed_decay_init=self.fixed_decay_init, fixed_decay_ranges=self.fixed_decay_ranges,
            layer_norm_eps=self.layer_norm_eps, attention_backend=self.attention_backend,
            initializer_range=self.initializer_range, output_gate_init=self.output_gate_init,
            decay_gate_init=self.decay_gate_init,
        )


def sdt_h_image_processor(crop_size: int = 224) -> ConvNextImageProcessor:
    """The paper's (RMT's) evaluation transform: resize the short side to crop_size / 0.875 (256 for 224), centre
    crop ``crop_size``, bicubic, ImageNet mean/std (set explicitly: the processor's default is 0.5)."""
    return ConvNextImageProcessor(
        do_resize=True, size={"shortest_edge": crop_size}, crop_pct=0.875, resample=PILImageResampling.BICUBIC,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )


class SDTHPreTrainedModel(PreTrainedModel):
    """Weight init (RMT's, see :func:`~sdt_diffusion.models.sdt_h.init_sdt_h_module`) and saving for SDT-H."""

    config_class = SDTHConfig
    base_model_prefix = "sdt_h"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SDTHBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        init_sdt_h_module(module, self.config.initializer_range)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        """transformers' per-module init, also for modules without parameters of their own.

        For code outside transformers, transformers 5 marks such a module initialised without calling
        ``_init_weights``; SDT-H's attention and blocks set their children's gates (W_g = 0, ``output_gate_init``,
        ``decay_gate_init``), so they must be visited.  :func:`init_sdt_h_module` leaves every tensor
        ``from_pretrained`` loaded as it is (torch's init functions are guarded, the gate writes check the flag).
        """
        super()._initialize_weights(module, False)

    def set_attention_backend(self, backend: str) -> None:
        """Run every stage's attention with ``backend``; stored in the config, so it is saved with the model."""
        for module in self.modules():
            if isinstance(module, SDTH):
                module.set_attention_backend(backend)
        self.config.attention_backend = backend

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained`` (safetensors), plus the evaluation image-processor config unless the
        folder already has one."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and not os.path.isfile(os.path.join(save_directory, PREPROCESSOR_CONFIG)):
            sdt_h_image_processor().save_pretrained(save_directory)
        return result


class SDTHModel(SDTHPreTrainedModel):
    """SDT-H without classifier: ``last_hidden_state`` is the stage-4 map (B, C4, H/32, W/32) and
    ``pooler_output`` the head's pooled ``head_hidden_size`` vector (Linear -> BN -> Swish -> average pool)."""

    _keys_to_ignore_on_load_unexpected = [r"^classifier\."]  # loading the encoder of a saved classifier

    def __init__(self, config: SDTHConfig) -> None:
        super().__init__(config)
        self.encoder = SDTH(**config.sdt_h_kwargs(), num_labels=0)
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        """``hidden_states`` (with ``output_hidden_states``): the stem's and every stage's output, NCHW."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = self.encoder.forward_stages(pixel_values)
        pooled = self.encoder.forward_head(hidden[-1], pre_logits=True)
        states = tuple(hidden) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (hidden[-1], pooled, states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=hidden[-1], pooler_output=pooled,
                                                        hidden_states=states)


class SDTHForImageClassification(SDTHPreTrainedModel):
    """SDT-H with its classifier ``Linear(head_hidden_size, num_labels)``; the loss follows ``config.problem_type``
    (cross-entropy for integer labels)."""

    def __init__(self, config: SDTHConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.sdt_h = SDTHModel(config)
        self.classifier = nn.Linear(config.head_hidden_size, config.num_labels) if config.num_labels else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.sdt_h(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        if not return_dict:
            rest = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class SDTHBackbone(BackboneMixin, SDTHPreTrainedModel):
    """SDT-H as a transformers backbone: ``feature_maps`` for ``config.out_features`` (NCHW; the stem at stride 4,
    stages 1-4 at strides 4 / 8 / 16 / 32).  The classification head is not built."""

    has_attentions = False
    # loading the encoder of a saved classifier or base model: the head is not built here
    _keys_to_ignore_on_load_unexpected = [r"^classifier\.", r"(^|\.)encoder\.head\."]

    def __init__(self, config: SDTHConfig) -> None:
        super().__init__(config)
        self.encoder = SDTH(**config.sdt_h_kwargs(), num_labels=0)
        self.encoder.prune_intermediate_layers(None, prune_head=True)  # every stage, no head
        self.num_features = [config.embed_dims[0], *config.embed_dims]
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BackboneOutput | tuple:
        if output_attentions:
            raise ValueError("SDT-H's backbone does not return attention maps (output_attentions=True)")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = self.encoder.forward_stages(pixel_values)
        maps = tuple(hidden[self.stage_names.index(name)] for name in self.out_features)
        states = tuple(hidden) if output_hidden_states else None
        if not return_dict:
            return (maps,) + ((states,) if states is not None else ())
        return BackboneOutput(feature_maps=maps, hidden_states=states, attentions=None)


def register_sdt_h_auto_classes() -> None:
    """Register ``model_type="sdt_h"`` with transformers' Auto classes (idempotent)."""
    AutoConfig.register(SDTHConfig.model_type, SDTHConfig, exist_ok=True)
    AutoModel.register(SDTHConfig, SDTHModel, exist_ok=True)
    AutoModelForImageClassification.register(SDTHConfig, SDTHForImageClassification, exist_ok=True)
    AutoBackbone.register(SDTHConfig, SDTHBackbone, exist_ok=True)


register_sdt_h_auto_classes()

__all__ = [
    "SDTHBackbone",
    "SDTHConfig",
    "SDTHForImageClassification",
    "SDTHModel",
    "SDTHPreTrainedModel",
    "register_sdt_h_auto_classes",
    "sdt_h_image_processor",
]
