"""SDTPipeline: class-conditional sampling with an SDT backbone, an optional SD-VAE and classifier-free guidance.

Drop-in for diffusers' ``DiTPipeline`` (same components and call), fixing its shortcomings: the null label
follows the model's number of classes, ``id2label`` is saved with the pipeline, label names are looked up
case-insensitively with synonyms and suggestions, the learned variance reaches schedulers that use it
(DiT's 250-step DDPM sampler), per-sample generators give batch-independent samples, and DiT's
first-3-channel guidance can be reproduced.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

# Every name by its submodule, never the package as a whole: ``sdt_diffusion/__init__`` imports this module,
# so reading the package's namespace from here would be an import circle.
from sdt_diffusion.models import SDTTransformer2DModel
from sdt_diffusion.models.dit import DiTTransformer2DModel
from sdt_diffusion.models.registry import MODEL_CLASSES, learns_sigma, num_classes_of
from sdt_diffusion.models.vae import decode_latents
from sdt_diffusion.schedulers import LEARNED_VARIANCE, SCHEDULER_NAMES, default_scheduler, make_scheduler
from sdt_diffusion.utils.labels import LabelIndex, default_id2label, normalize_id2label
from sdt_diffusion.utils.validation import check_finite

__all__ = ["SDTPipeline", "default_scheduler", "make_scheduler", "SCHEDULER_NAMES"]

logger = logging.get_logger(__name__)

# The sdt-diffusion component classes, all exported by the top-level package (tests/test_packaging.py checks it),
# so ``model_index.json`` can name them as ``["sdt_diffusion", Class]``.
PUBLIC_COMPONENT_CLASSES = frozenset(
    name for name, cls in MODEL_CLASSES.items() if cls.__module__.split(".")[0] == "sdt_diffusion"
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Image channel counts ``numpy_to_pil`` turns into images (grey, RGB).
IMAGE_CHANNELS = (1, 3)
# Schedulers whose ``step`` consumes a predicted variance of any channel count. Other diffusers schedulers with
# a ``variance_type`` option (DPM-Solver family, SA-Solver) never use it: they drop it by keeping
# ``model_output[:, :3]``, which is only right for 3-channel (pixel-space) models.
_VARIANCE_AWARE_SCHEDULERS = ("DDPMScheduler", "DDPMParallelScheduler")


class SDTPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with a Spatial Decay Transformer.

    Args:
        transformer: the class-conditional denoiser: ``SDTTransformer2DModel``, or diffusers' ``DiTTransformer2DModel``
            (the DiT baseline; see ``sdt_diffusion.models.dit``).
        vae: ``AutoencoderKL`` decoding latents to images, or ``None`` when the transformer works in pixel
            space (its sample, in [-1, 1], is the image).
        scheduler: any diffusers scheduler; ``default_scheduler()`` reproduces DiT's DDPM sampler.
        id2label: ``{class_id: "name, synonym, ..."}``, stored in ``model_index.json``. ``None`` means the
            shipped ImageNet names for a 1000-class model and ``"class 0"``, ... otherwise.

    Example:
        ```py
        >>> pipe = SDTPipeline.from_pretrained("my-sdt-pipeline")
        >>> images = pipe(class_labels=[207, "otter"], guidance_scale=4.0, generator=torch.manual_seed(0)).images
        ```
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: SDTTransformer2DModel | DiTTransformer2DModel,
        vae: AutoencoderKL | None,
        scheduler: Any,
        id2label: dict[int, str] | dict[str, str] | None = None,  # str keys: as read back from JSON
    ) -> None:
        super().__init__()
        if transformer is None:
            raise ValueError("SDTPipeline needs a transformer")
        if scheduler is None:
            scheduler = default_scheduler()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self._check_components()
        num_classes = num_classes_of(self.transformer)
        mapping = normalize_id2label(id2label, num_classes)
        if mapping is None:
            mapping = default_id2label(num_classes)
        self._set_id2label(mapping)

    # ------------------------------------------------------------------ component registry
    def register_modules(self, **kwargs: Any) -> None:
        super().register_modules(**kwargs)
        self._use_public_library_names()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if "_internal_dict" in self.__dict__ and name in ("transformer", "vae", "scheduler"):
            self._use_public_library_names()

    def _use_public_library_names(self) -> None:
        """Record sdt-diffusion components as ``["sdt_diffusion", Class]`` in ``model_index.json``.

        diffusers writes the defining module of a third-party class (``sdt_diffusion.models.transformer_sdt``);
        the top-level package exports the classes (and ``ModelMixin``), so saved pipelines do not depend on
        the internal file layout.
        """
        fixes = {}
        for key, value in self.config.items():
            if (
                isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
                and value[0].startswith("sdt_diffusion.") and value[1] in PUBLIC_COMPONENT_CLASSES
            ):
                fixes[key] = ("sdt_diffusion", value[1])
        if fixes:
            self.register_to_config(**fixes)

    # ------------------------------------------------------------------ labels
    def _set_id2label(self, mapping: dict[int, str] | None) -> None:
        self._label_index = LabelIndex(mapping, num_classes_of(self.transformer))
        self.register_to_config(id2label=mapping)

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> full name entry (synonyms comma-separated); ``"class i"`` where no names were given."""
        return dict(self._label_index.id2label)

    @id2label.setter
    def id2label(self, mapping: dict[int, str] | None) -> None:
        self._set_id2label(normalize_id2label(mapping, num_classes_of(self.transformer)))

    @property
    def labels(self) -> dict[str, int]:
        """Every unambiguous class name and synonym -> class id (as ``DiTPipeline.labels``)."""
        return self._label_index.names

    @property
    def num_classes(self) -> int:
        """Number of classes; the null (unconditional) label equals it."""
        return num_classes_of(self.transformer)

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class ids for one name or a list of names: case-insensitive, any comma-separated synonym counts.

        Raises:
            ValueError: an unknown name (the message lists the closest names) or an ambiguous one.
        """
        return self._label_index.lookup_many(label)

    def get_label_names(self, class_ids: Sequence[int], short: bool = True) -> list[str]:
        """Names of ``class_ids`` (first synonym when ``short``), e.g. for captions."""
        return [self._label_index.name(int(i), short=short) for i in class_ids]

    def resolve_class_labels(self, class_labels: Any) -> list[int]:
        """Class ids for ids and/or names: one, or any nesting of sequences, tensors and arrays of them.

        The nesting is flattened in order, as ``DiTPipeline`` does, so ``[[1], [1]]`` and
        ``[pipe.get_label_ids(n) for n in names]`` work. Raises ``ValueError`` naming a bad label.
        """
        ids: list[int] = []
        for label in _flatten_labels(class_labels):
            if isinstance(label, str):
                ids.append(self._label_index.lookup(label))
                continue
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
                raise ValueError(f"class labels must be ints or class names, got {type(label).__name__}: {label!r}")
            if not 0 <= int(label) < self.num_classes:
                raise ValueError(
                    f"class id {int(label)} is out of range: this model has {self.num_classes} classes "
                    f"(ids 0..{self.num_classes - 1}; {self.num_classes} is the null label used for guidance)"
                )
            ids.append(int(label))
        if not ids:
            raise ValueError("class_labels is empty: pass at least one class id or name")
        return ids

    # ------------------------------------------------------------------ checks
    def _check_components(self) -> None:
        if not isinstance(self.transformer, tuple(MODEL_CLASSES.values())):
            raise ValueError(f"transformer must be an SDTTransformer2DModel or diffusers' DiTTransformer2DModel "
                             f"(the DiT baseline), got {type(self.transformer).__name__}")
        if self.vae is not None:
            latent_channels = self.vae.config.latent_channels
            if latent_channels != self.transformer.config.in_channels:
                raise ValueError(
                    f"the transformer denoises {self.transformer.config.in_channels}-channel latents but the VAE "
                    f"has latent_channels={latent_channels}; use a matching VAE (or vae=None for pixel space)"
                )

    def _uses_variance(self) -> bool:
        """Whether ``scheduler.step`` gets the predicted variance.

        A learned ``variance_type`` on a scheduler that never uses it (DPM-Solver, SA-Solver: typically inherited
        through ``from_config`` of DiT's DDPM config) is set to ``None`` with a warning, so the scheduler gets
        the noise prediction alone; DDPM's learned variance is kept. Raises for a DDPM that expects a variance
        from a transformer that does not predict one.
        """
        # `from_config` keeps keys a scheduler does not know (DDIM built from DDPM's config still lists
        # variance_type), so only a variance_type the scheduler class declares counts.
        declared = inspect.signature(type(self.scheduler).__init__).parameters
        variance_type = self.scheduler.config.get("variance_type") if "variance_type" in declared else None
        if variance_type not in LEARNED_VARIANCE:
            return False
        name = type(self.scheduler).__name__
        if name not in _VARIANCE_AWARE_SCHEDULERS:
            self.scheduler.register_to_config(variance_type=None)
            logger.warning(
                f"set {name}'s variance_type from {variance_type!r} to None: {name} cannot use a predicted "
                f"variance (it keeps the first 3 output channels), so it gets the predicted noise alone"
            )
            return False
        if not learns_sigma(self.transformer):
            raise ValueError(
                f"{name} has variance_type={variance_type!r} but the transformer does not predict a variance "
                f"(learn_sigma=False); use e.g. variance_type='fixed_small'"
            )
        return True

    def _step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
        params = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in params and generator is not None else {}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[Any] | torch.Tensor | np.ndarray,
        guidance_scale: float = 4.0,
        num_inference_steps: int = 250,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guide_first_3_channels: bool = False,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per class label.

        Args:
            class_labels: class ids and/or names (any synonym, case-insensitive), mixed freely: one, or any
                nesting of lists, tuples, tensors and arrays of them, flattened in order (one image each).
            guidance_scale: classifier-free guidance weight ``s`` in ``ε_u + s (ε_c − ε_u)``; values ≤ 1 run
                the conditional model alone (DiT's convention). DiT's FID-50K setting is 1.5.
            num_inference_steps: denoising steps (DiT samples with 250 DDPM steps).
            generator: a ``torch.Generator`` or one per image; with one per image, each image is the same as
                when sampled alone with that generator (for schedulers whose ``step`` draws its noise
                through ``generator``: DDPM, DDIM, DPM-Solver(++ SDE), Euler ancestral, ...).
            latents: initial noise ``(B, C, H, W)`` in the transformer's latent shape (drawn when ``None``).
            output_type: ``"pil"``; ``"np"`` (float NHWC in [0, 1]); ``"pt"`` (float NCHW in [0, 1]);
                ``"latent"`` (the final latents, still multiplied by the VAE's scaling factor).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            guide_first_3_channels: guide only latent channels 0–2 and take the rest from the conditional
                prediction, as DiT's published sampler (``forward_with_cfg``) does.

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``.
        """
        ids = self.resolve_class_labels(class_labels)
        guidance_scale = check_finite("guidance_scale", guidance_scale, minimum=0.0)  # NaN/inf: a ValueError
        generator = self._check_call(len(ids), num_inference_steps, generator, latents, output_type)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        labels = torch.tensor(ids, device=device, dtype=torch.long)
        if do_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        latents = self._initial_latents(len(ids), num_inference_steps, generator, latents, device)
        latents = self._denoise(latents, labels, guidance_scale if do_cfg else None, guide_first_3_channels,
                                generator, device)
        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ------------------------------------------------------------------ the steps of __call__
    def _latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        cfg = self.transformer.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def _check_call(self, batch: int, num_inference_steps: int, generator: Any, latents: torch.Tensor | None,
                    output_type: str) -> Any:
        """Refuse bad call arguments before any compute; return ``generator`` (a list if one per image)."""
        if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch} class labels")
            generator = list(generator)
        self._check_components()
        channels = self.transformer.config.in_channels
        if output_type != "latent" and self.vae is None and channels not in IMAGE_CHANNELS:
            raise ValueError(
                f"output_type={output_type!r} needs images, but the transformer makes {channels}-channel latents "
                f"and the pipeline has no VAE to decode them; set pipe.vae to an AutoencoderKL with "
                f"latent_channels={channels}, or use output_type='latent'"
            )
        shape = self._latent_shape(batch)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must have shape {shape} (batch, in_channels, sample_size, sample_size), "
                f"got {tuple(latents.shape)}"
            )
        return generator

    def _initial_latents(self, batch: int, num_inference_steps: int, generator: Any, latents: torch.Tensor | None,
                         device: torch.device) -> torch.Tensor:
        """The starting noise in float32 (the sampling state keeps float32 whatever the model dtype)."""
        if latents is None:
            latents = randn_tensor(self._latent_shape(batch), generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        return latents * self.scheduler.init_noise_sigma

    def _denoise(self, latents: torch.Tensor, labels: torch.Tensor, guidance_scale: float | None,
                 guide_first_3_channels: bool, generator: Any, device: torch.device) -> torch.Tensor:
        """The scheduler's loop; with ``guidance_scale``, ``labels`` holds the conditional then the null labels."""
        channels = latents.shape[1]
        n_guided = min(3, channels) if guide_first_3_channels else channels
        use_variance = self._uses_variance()
        step_kwargs = self._step_kwargs(generator)
        model_dtype = self.transformer.dtype
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(latents, t)
            if guidance_scale is not None:
                model_in = torch.cat([model_in, model_in])
            timestep = torch.as_tensor(t, device=device).reshape(()).expand(model_in.shape[0])
            out = self.transformer(model_in.to(model_dtype), timestep, labels).sample.float()
            if guidance_scale is not None:
                cond, uncond = out.chunk(2)
                eps = cond[:, :channels].clone()
                g = slice(0, n_guided)
                eps[:, g] = uncond[:, g] + guidance_scale * (cond[:, g] - uncond[:, g])
                out = torch.cat([eps, cond[:, channels:]], dim=1)
            model_output = out if use_variance else out[:, :channels]
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
        return latents

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """Latents to the requested output: latents, tensors, arrays or PIL images in [0, 1]."""
        if output_type == "latent":
            return latents
        samples = decode_latents(self.vae, latents).float() if self.vae is not None else latents
        images = (samples / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images

def _flatten_labels(labels: Any) -> list[Any]:
    """The labels of any nesting of lists, tuples, tensors and arrays, in order; a string is one label."""
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        return labels.reshape(-1).tolist()
    if isinstance(labels, (list, tuple, range)):
        return [label for item in labels for label in _flatten_labels(item)]
    return [labels]
