"""Decay-map visualisation: where the learned gates make the spatial decay content-dependent.

For one query patch q, every layer and head of an SDT shows the learned decay row M[q, :] on the token
grid beside the fixed Manhattan decay of the same average strength (``alpha * mean(G) * d(q, :)``,
i.e. what the layer would apply if its gates ignored the content).  Where the two differ, the decay
follows the image rather than the distance alone (the paper's Fig. 1 claim).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..attention.backends import dense_decay_bias
from ..attention.modes import DECAY_MODE_TABLE, decay_mode
from ..attention.spatial_decay import manhattan_distance
from ..models.vae import decode_latents, encode_latents, vae_downsampling_factor
from ..utils.optional import import_optional

PANEL_INCHES = 1.1
DPI = 100


@dataclass
class DecayMaps:
    """Decay rows of one query patch: ``learned`` and ``fixed`` are (layers, heads, H, W) arrays."""

    learned: np.ndarray
    fixed: np.ndarray
    query: tuple[int, int]
    class_label: int
    timestep: int
    decay_mode: str


def _capture_attention_inputs(transformer, run) -> list[Tensor]:
    """Run ``run()`` and return the input of every block's attention (the modulated tokens X)."""
    captured: list[Tensor] = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
        for block in transformer.blocks
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def compute_decay_maps(
    transformer,
    latents: Tensor,
    class_label: int,
    timestep: int = 500,
    query: tuple[int, int] | None = None,
) -> DecayMaps:
    """Decay rows M[q, :] of every layer and head for (noisy) ``latents`` (1, C, H, W) of ``class_label``.

    ``query`` is a (row, column) on the token grid; the default is its centre.
    """
    cfg = transformer.config
    spec = decay_mode(cfg.decay_mode)
    if not spec.has_distance_map:
        drawable = [name for name, mode in DECAY_MODE_TABLE.items() if mode.has_distance_map]
        raise ValueError(
            f"decay_mode={cfg.decay_mode!r} has no single L x L decay map to show; decay maps exist for {drawable}"
        )
    if latents.dim() != 4 or latents.shape[0] != 1:
        raise ValueError(f"latents must have shape (1, C, H, W), got {tuple(latents.shape)}")
    p = cfg.patch_size
    gh, gw = latents.shape[-2] // p, latents.shape[-1] // p
    q_row, q_col = query if query is not None else (gh // 2, gw // 2)
    if not (0 <= q_row < gh and 0 <= q_col < gw):
        raise ValueError(f"query patch {(q_row, q_col)} lies outside the {gh}x{gw} token grid")
    q_index = q_row * gw + q_col
    device = next(transformer.parameters()).device
    latents = latents.to(device=device, dtype=next(transformer.parameters()).dtype)
    t = torch.tensor([timestep], device=device)
    y = torch.tensor([class_label], device=device)
    xs = _capture_attention_inputs(transformer, lambda: transformer(latents, t, y))

    dist = manhattan_distance(gh, gw, device)[q_index]  # (L,)
    learned, fixed = [], []
    for block, x in zip(transformer.blocks, xs):
        decay = block.attn.decay_inputs(x, gh, gw)
        row = dense_decay_bias(decay)[..., q_index, :].float()  # (1, N, L) or (N, L)
        row = row.reshape(-1, gh * gw)
        if decay.gates is not None:  # the same average strength, blind to content
            strength = decay.gates.float().mean(dim=1)[0]  # (N,)
            scale = decay.alpha if spec.uses_alpha else 1.0
            flat = strength[:, None] * dist[None] * scale
        else:  # fixed decay is content-blind already
            flat = row
        learned.append(row.reshape(-1, gh, gw).cpu().numpy())
        fixed.append(flat.reshape(-1, gh, gw).cpu().numpy())
    return DecayMaps(np.stack(learned), np.stack(fixed), (q_row, q_col), class_label, timestep, cfg.decay_mode)


def figure_size_pixels(num_layers: int, num_heads: int) -> tuple[int, int]:
    """(width, height) in pixels of the figure :func:`plot_decay_maps` saves."""
    width = PANEL_INCHES * 2 * num_heads + 0.6
    height = PANEL_INCHES * num_layers + 0.9
    return round(width * DPI), round(height * DPI)


def plot_decay_maps(maps: DecayMaps, path: str | Path, title: str | None = None,
                    image: np.ndarray | None = None) -> Path:
    """Save a PNG: one row per layer, per head the learned map (left) beside the fixed one (right).

    Colours are exp(M), the factor the decay multiplies attention weights by (1 = no decay).
    ``image`` (H, W, 3 in [0, 1]) is drawn faintly under the maps when given.
    """
    import_optional("matplotlib", "demo").use("Agg")  # optional dependency: imported only to draw
    plt = import_optional("matplotlib.pyplot", "demo")

    layers, heads = maps.learned.shape[:2]
    w_px, h_px = figure_size_pixels(layers, heads)
    fig, axes = plt.subplots(layers, 2 * heads, figsize=(w_px / DPI, h_px / DPI), dpi=DPI, squeeze=False)
    gh, gw = maps.learned.shape[-2:]
    for layer in range(layers):
        for head in range(heads):
            for k, (grid, kind) in enumerate(((maps.learned, "learned"), (maps.fixed, "fixed"))):
                ax = axes[layer, 2 * head + k]
                if image is not None:
                    ax.imshow(image, extent=(-0.5, gw - 0.5, gh - 0.5, -0.5), alpha=0.35)
                ax.imshow(np.exp(grid[layer, head]), cmap="magma", vmin=0.0, vmax=1.0,
                          alpha=0.75 if image is not None else 1.0)
                ax.plot(maps.query[1], maps.query[0], marker="x", color="cyan", markersize=4)
                ax.set_xticks([])
                ax.set_yticks([])
                if layer == 0:
                    ax.set_title(f"h{head} {kind}", fontsize=7)
            if head == 0:
                axes[layer, 0].set_ylabel(f"layer {layer}", fontsize=7)
    fig.suptitle(title or f"{maps.decay_mode} decay exp(M[q, :]) for query {maps.query}, "
                 f"class {maps.class_label}, t={maps.timestep} (left learned, right content-blind)", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.99, bottom=0.01, top=1 - 0.6 / (h_px / DPI), wspace=0.08, hspace=0.12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


@torch.no_grad()
def pipeline_decay_maps(
    pipe,
    class_label: int | str,
    image=None,
    timestep: int = 500,
    query: tuple[int, int] | None = None,
    num_inference_steps: int = 25,
    seed: int = 0,
) -> tuple[DecayMaps, np.ndarray]:
    """Decay maps of ``pipe``'s transformer for a class, on ``image`` (PIL) or on a sample of that class.

    The clean latents (the encoded image, or a guided sample) are noised to ``timestep`` with fixed
    noise.  Returns the maps and the clean image (H, W, 3) in [0, 1] for display.
    """
    label = pipe.get_label_ids(class_label)[0] if isinstance(class_label, str) else int(class_label)
    transformer = pipe.transformer
    device = next(transformer.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vae = pipe.vae
    if image is not None:
        factor = vae_downsampling_factor(vae) if vae is not None else 1
        size = transformer.config.sample_size * factor
        arr = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(arr).permute(2, 0, 1)[None]
        if vae is not None:
            latents = encode_latents(vae, pixels, sample=False)
        else:
            latents = pixels
        shown = (arr + 1) / 2
    else:
        latents = pipe(class_labels=[label], num_inference_steps=num_inference_steps, generator=generator,
                       output_type="latent").images
        pixels = latents if vae is None else decode_latents(vae, latents)
        shown = (pixels[0].float().permute(1, 2, 0).cpu().numpy() + 1) / 2
    if shown.shape[-1] != 3:  # a pixel-space model with other than 3 channels: show the mean as grey
        shown = np.repeat(shown.mean(-1, keepdims=True), 3, axis=-1)
    shown = np.clip(shown, 0, 1)
    latents = latents.to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device=device, dtype=latents.dtype)
    alphas = pipe.scheduler.alphas_cumprod.to(device)[timestep]
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    maps = compute_decay_maps(transformer, noisy, label, timestep, query)
    return maps, shown
