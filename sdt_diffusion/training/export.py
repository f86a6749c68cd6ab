"""EMA weights out of a training run: the exported ``SDTPipeline`` folder and labelled sample grids."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..models import SDTTransformer2DModel
from ..schedulers import default_scheduler
from ..utils.files import replace_dir
from .ema import EMA

__all__ = ["default_sample_classes", "ema_transformer", "export_pipeline", "sample_grid"]

# DiT's sample.py classes (ImageNet ids), used for 1000-class models.
IMAGENET_SAMPLE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


def default_sample_classes(num_classes: int) -> list[int]:
    """Classes shown in the training sample grids: DiT's 8 for ImageNet, all of up to 16 classes, else 8 spread out."""
    if num_classes == 1000:
        return list(IMAGENET_SAMPLE_CLASSES)
    if num_classes <= 16:
        return list(range(num_classes))
    return [round(i * (num_classes - 1) / 7) for i in range(8)]


def ema_transformer(accelerator: Any, model: torch.nn.Module, ema: EMA) -> SDTTransformer2DModel | None:
    """A fresh CPU ``SDTTransformer2DModel`` holding the EMA weights, on the main process (``None`` elsewhere).

    All processes must call it: the weights are gathered with ``accelerator.get_state_dict`` while the EMA
    is swapped into the (possibly sharded) training model.  The global RNG is left untouched.
    """
    with ema.swapped_into(model.parameters()):
        state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            state = {k: v.detach().to("cpu", torch.float32, copy=True) if v.is_floating_point()
                     else v.detach().to("cpu", copy=True) for k, v in state.items()}
    if not accelerator.is_main_process:
        return None
    config = dict(accelerator.unwrap_model(model).config)
    with torch.random.fork_rng(devices=[]):  # the constructor's initialisation must not move the training RNG
        fresh = SDTTransformer2DModel.from_config(config)
    fresh.load_state_dict(state)
    return fresh.eval()


def export_pipeline(
    transformer: SDTTransformer2DModel,
    vae: Any | None,
    id2label: dict[int, str] | None,
    target: str | Path,
) -> Path:
    """Save ``SDTPipeline(transformer, vae, DDPM learned-range scheduler, id2label)`` atomically to ``target``.

    The folder is written as ``<target>.tmp`` and renamed, so a crash never leaves a half-written pipeline.
    """
    from ..pipelines import SDTPipeline

    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    scheduler = default_scheduler(learn_sigma=bool(transformer.config.learn_sigma))
    pipe = SDTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.save_pretrained(str(tmp))
    return replace_dir(tmp, target)


@torch.no_grad()
def sample_grid(
    transformer: SDTTransformer2DModel,
    vae: Any | None,
    id2label: dict[int, str] | None,
    class_ids: Sequence[int],
    device: torch.device | str,
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    seed: int = 0,
) -> Image.Image:
    """A labelled grid of EMA samples, one per class in ``class_ids``, from a fixed CPU generator."""
    from ..pipelines import SDTPipeline
    from ..utils.images import make_labelled_grid
    from ..utils.labels import short_name

    scheduler = default_scheduler(learn_sigma=bool(transformer.config.learn_sigma))
    pipe = SDTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        class_labels=list(class_ids),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    ).images
    names = [short_name(id2label[c]) if id2label and c in id2label else f"class {c}" for c in class_ids]
    ncols = min(len(images), 8)
    return make_labelled_grid(images, names, ncols)
