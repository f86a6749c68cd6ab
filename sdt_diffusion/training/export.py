"""EMA weights out of a training run: the exported ``SDTPipeline`` folder and labelled sample grids.

Two ways to a pipeline, both through :func:`export_pipeline`: the trainer exports the live EMA at the end
of a run (and every ``--export-every`` steps), and :func:`export_checkpoint` (the ``sdt-export`` command,
``training/export_pipeline.py``) turns any complete ``checkpoint-<step>`` folder into one.  Evaluation
reads only such pipeline folders; the checkpoint's layout stays the trainer's business.  Every export carries its
model card (``README.md``, :mod:`.cards`), and ``sdt-export --push-to-hub`` uploads the folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from diffusers import AutoencoderKL
from PIL import Image

from ..hub import CardFacts, HubError, check_hub_flags, push_folder, read_fid_results, write_model_card
from ..models.registry import build_transformer, learns_sigma
from ..pipelines import SDTPipeline
from ..schedulers import default_scheduler
from ..utils.cli_args import add_deprecated_alias
from ..utils.files import private_sibling, replace_dir
from ..utils.images import make_labelled_grid
from ..utils.labels import short_name
from .cards import pipeline_card_facts
from .checkpointing import STATE_FILE, read_ema_shadow, read_ema_shapes, read_training_state
from .config import HubSettings
from .ema import EMA
from .flags import add_flag_group

__all__ = [
    "build_export_parser",
    "checkpoint_vae",
    "cli",
    "default_sample_classes",
    "ema_transformer",
    "export_checkpoint",
    "export_pipeline",
    "load_vae",
    "main",
    "sample_grid",
]

# DiT's sample.py classes (ImageNet ids), used for 1000-class models.
IMAGENET_SAMPLE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


def default_sample_classes(num_classes: int) -> list[int]:
    """Classes shown in the training sample grids: DiT's 8 for ImageNet, all of up to 16 classes, else 8 spread out."""
    if num_classes == 1000:
        return list(IMAGENET_SAMPLE_CLASSES)
    if num_classes <= 16:
        return list(range(num_classes))
    return [round(i * (num_classes - 1) / 7) for i in range(8)]


def ema_transformer(accelerator: Any, model: torch.nn.Module, ema: EMA) -> torch.nn.Module | None:
    """A fresh CPU copy of the model (SDT-P or DiT) holding the EMA weights, on the main process (``None`` elsewhere).

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
    unwrapped = accelerator.unwrap_model(model)
    config = dict(unwrapped.config)
    with torch.random.fork_rng(devices=[]):  # the constructor's initialisation must not move the training RNG
        fresh = type(unwrapped).from_config(config)
    fresh.load_state_dict(state)
    return fresh.eval()


def export_pipeline(
    transformer: torch.nn.Module,
    vae: Any | None,
    id2label: dict[int, str] | None,
    target: str | Path,
    card: CardFacts | None = None,
) -> Path:
    """Save ``SDTPipeline(transformer, vae, DiT's DDPM scheduler, id2label)`` atomically to ``target``, with the
    model card ``card`` (``README.md``, and ``samples.png`` where the card has a grid) written inside it.

    The scheduler is :func:`~sdt_diffusion.schedulers.default_scheduler` for the model's ``learn_sigma``
    (learned-range variance, or fixed-large without a learned variance).  The folder is written under a
    temporary name of its own (:func:`~sdt_diffusion.utils.files.private_sibling`) and renamed, so a crash never
    leaves a half-written pipeline (or a pipeline without its card) and no sibling folder of ``target`` is touched.

    Raises:
        ValueError: the pipeline would not produce images (latents without a VAE to decode them).
    """
    channels = transformer.config.in_channels
    if vae is None and channels != 3:
        raise ValueError(f"the transformer denoises {channels}-channel latents: exporting it without a VAE "
                         f"would give {channels}-channel 'images'; pass the VAE it was trained with")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_sibling(target, "tmp")
    scheduler = default_scheduler(learn_sigma=learns_sigma(transformer))
    pipe = SDTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    try:
        pipe.save_pretrained(str(tmp))
        if card is not None:
            write_model_card(tmp, card)
        return replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours alone: the name is unique to this call
        raise


@torch.no_grad()
def sample_grid(
    transformer: torch.nn.Module,
    vae: Any | None,
    id2label: dict[int, str] | None,
    class_ids: Sequence[int],
    device: torch.device | str,
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    seed: int = 0,
) -> Image.Image:
    """A labelled grid of EMA samples, one per class in ``class_ids``, from a fixed CPU generator."""
    scheduler = default_scheduler(learn_sigma=learns_sigma(transformer))
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


# ------------------------------------------------------------------------------------ checkpoint export
def load_vae(name: str | None, subfolder: str | None = None) -> AutoencoderKL | None:
    """The frozen ``AutoencoderKL`` ``name`` (local folder or hub id) in eval mode, or ``None`` for pixel space."""
    if name is None:
        return None
    return AutoencoderKL.from_pretrained(name, subfolder=subfolder).requires_grad_(False).eval()


def checkpoint_vae(state: dict[str, Any], vae: str | None = None,
                   vae_subfolder: str | None = None) -> tuple[str | None, str | None]:
    """``(name, subfolder)`` of the VAE for a checkpoint's pipeline; ``name`` is ``None`` in pixel space.

    ``vae`` overrides the run's (``"none"``: pixel space).  Otherwise the VAE the trainer recorded in
    ``training_state.json`` is used.

    Raises:
        ValueError: a checkpoint from before the trainer recorded its resolved VAE, without ``vae`` given.
    """
    if vae is not None:
        return (None, None) if vae.lower() == "none" else (vae, vae_subfolder)
    if "vae_subfolder" in state:  # written by this trainer: the resolved VAE (None in pixel space)
        return state.get("vae"), state["vae_subfolder"]
    recorded = state.get("vae")  # older checkpoints recorded the raw --vae flag, None for "the default"
    if recorded is None:
        raise ValueError("this checkpoint does not record which VAE the run used (it was written before the "
                         "trainer recorded it); pass the VAE explicitly (a folder or hub id, or 'none')")
    return (None, None) if recorded.lower() == "none" else (recorded, None)


def _check_ema_shapes(checkpoint: str | Path, state: dict[str, Any]) -> None:
    """Compare the model config of ``training_state.json`` with the EMA file's header before building the model:
    the config is built on the ``meta`` device (no memory) and each parameter's shape is checked against the
    header's, so a config that does not fit the weights (say, far more layers) is refused by name, unallocated.

    Raises:
        ValueError: the config cannot be built, or it does not fit the EMA file (the parameter is named).
    """
    shapes = read_ema_shapes(checkpoint)
    if shapes is None:  # an earlier version's or an FSDP checkpoint: read_ema_shadow reads or refuses it
        return
    config = state.get("model_config")
    where = f"{Path(checkpoint) / STATE_FILE}"
    if not isinstance(config, dict):
        raise ValueError(f"{where}: no model_config mapping")
    try:
        with torch.device("meta"):
            skeleton = build_transformer(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: model_config cannot be built ({e})") from None
    params = list(skeleton.named_parameters())
    ema = Path(checkpoint) / "ema.safetensors"
    if len(params) != len(shapes):
        raise ValueError(f"{where}: the model config has {len(params)} parameters, {ema} holds {len(shapes)} EMA "
                         f"tensors; the config does not belong to these weights")
    for (name, p), shape in zip(params, shapes):
        if tuple(p.shape) != shape:
            raise ValueError(f"{where}: parameter {name} has shape {tuple(p.shape)} in the model config, {ema} "
                             f"holds {shape}; the config does not belong to these weights")


def export_checkpoint(checkpoint: str | Path, output: str | Path, vae: str | None = None,
                      vae_subfolder: str | None = None, *, fid_results: dict[str, Any] | None = None,
                      hub_model_id: str | None = None, license: str | None = None) -> Path:
    """Export the EMA weights of a training checkpoint (``<run>/checkpoint-<step>``) as an ``SDTPipeline`` with
    its model card (:func:`~.cards.pipeline_card_facts`: the run's recipe, held-out loss and sample grid up to the
    checkpoint's step, read from the checkpoint's run folder).

    Args:
        checkpoint: a complete checkpoint folder.
        output: the pipeline folder to write (replaced atomically if it already holds a pipeline).
        vae: override of the run's VAE, see :func:`checkpoint_vae`.
        vae_subfolder: subfolder of ``vae``.
        fid_results: an ``sdt-fid --output`` result (:func:`~sdt_diffusion.hub.read_fid_results`) for the card.
        hub_model_id: the Hub repository the card's load snippet names.
        license: the card's license id (default: none stated).

    Returns:
        The pipeline folder.

    Raises:
        ConfigError: ``checkpoint`` is not a complete checkpoint.
        FileNotFoundError: the checkpoint holds no EMA (FSDP keeps it in per-process shards).
        ValueError: ``output`` is a folder that is not a pipeline, the EMA does not fit the model config, or
            the VAE is unknown or does not fit the model.
    """
    output = Path(output)
    blocking = next((p for p in (output, *output.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ValueError(f"cannot write the pipeline folder {output}: {blocking} is a file")
    if output.exists() and not (output / "model_index.json").is_file() and any(output.iterdir()):
        raise ValueError(f"{output} exists and is not a pipeline folder; choose a new or empty folder")
    state = read_training_state(checkpoint)
    _check_ema_shapes(checkpoint, state)  # before anything the size of the model is allocated
    shadow = read_ema_shadow(checkpoint)
    with torch.random.fork_rng(devices=[]):  # the constructor's initialisation must not move the caller's RNG
        transformer = build_transformer(state["model_config"])
    params = list(transformer.parameters())
    if len(shadow) != len(params):
        raise ValueError(f"{checkpoint}: the EMA holds {len(shadow)} tensors, the model config has {len(params)}")
    with torch.no_grad():
        for p, s in zip(params, shadow):
            if p.shape != s.shape:
                raise ValueError(f"{checkpoint}: EMA tensor of shape {tuple(s.shape)} for a parameter of "
                                 f"{tuple(p.shape)}")
            p.copy_(s)
    name, subfolder = checkpoint_vae(state, vae, vae_subfolder)
    try:
        autoencoder = load_vae(name, subfolder)
    except Exception as e:  # noqa: BLE001 - hub/file errors of diffusers, re-raised with the VAE and its origin named
        origin = "--vae" if vae is not None else f"the VAE the run used ({STATE_FILE})"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{origin} {name}" + (f" (subfolder {subfolder})" if subfolder else "")
                         + f": cannot load an AutoencoderKL ({first})") from None
    id2label = {int(k): v for k, v in state["id2label"].items()} if state.get("id2label") else None
    card = pipeline_card_facts(transformer, id2label, Path(checkpoint).parent, int(state.get("step", 0)),
                               location=str(output), repo_id=hub_model_id, license=license, fid_results=fid_results,
                               model=state.get("model"))
    return export_pipeline(transformer.eval(), autoencoder, id2label, output, card)


def build_export_parser() -> argparse.ArgumentParser:
    """Flags of ``sdt-export`` / ``training/export_pipeline.py``."""
    p = argparse.ArgumentParser(
        description="Export the EMA weights of a training checkpoint as an SDTPipeline folder (the input of "
                    "eval/sample.py and SDTPipeline.from_pretrained).")
    p.add_argument("checkpoint", help="a checkpoint folder, <output-dir>/checkpoint-<step>")
    p.add_argument("--output-dir", default=None, help="the pipeline folder to write (required)")
    add_deprecated_alias(p, "--output", "--output-dir")
    p.add_argument("--vae", default=None,
                   help="AutoencoderKL folder or hub id, or 'none' for pixel space (default: the VAE the run used)")
    p.add_argument("--vae-subfolder", default=None, help="subfolder of --vae")
    p.add_argument("--fid-results", default=None, metavar="PATH",
                   help="an sdt-fid --output JSON of samples of these weights: its FID, sFID, IS, precision and "
                        "recall go into the model card")
    add_flag_group(p, HubSettings, {"push_to_hub": "upload the exported folder (with its model card) to "
                                                   "--hub-model-id"})
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 failed upload, 2 bad input)."""
    parser = build_export_parser()
    args = parser.parse_args(argv)
    if not args.output_dir:
        parser.error("the following arguments are required: --output-dir")
    try:
        check_hub_flags(args.push_to_hub, args.hub_model_id, args.hub_token)
        fid = read_fid_results(args.fid_results) if args.fid_results else None
        path = export_checkpoint(args.checkpoint, args.output_dir, args.vae, args.vae_subfolder, fid_results=fid,
                                 hub_model_id=args.hub_model_id, license=args.hub_license)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError; FileNotFoundError an OSError
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"exported {args.checkpoint} to {path}")
    if args.push_to_hub:
        try:
            url = push_folder(path, args.hub_model_id, private=args.hub_private, token=args.hub_token,
                              commit_message=f"Upload the EMA pipeline of {Path(args.checkpoint).name} (sdt-export)")
        except HubError as e:
            print(f"{parser.prog}: error: {e} (the export in {path} is complete; run the command again to retry "
                  f"the upload)", file=sys.stderr, flush=True)
            return 1
        print(f"uploaded {path} to {url}")
    return 0


def cli() -> NoReturn:
    """Process entry point (``sdt-export``, ``training/export_pipeline.py``, ``python -m
    sdt_diffusion.training.export``)."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
