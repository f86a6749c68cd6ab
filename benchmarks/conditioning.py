"""How much does the class label move the model's prediction?  Conditional vs. unconditional noise prediction.

Classifier-free guidance extrapolates from the unconditional prediction ``eps(x_t, t, null)`` towards the
conditional one ``eps(x_t, t, y)``; a model that rarely saw the null label in training (e.g. diffusers' DiT
with its per-block label dropout, docs/model.md) or that ignores its label shows it here.  For each trained
pipeline and each timestep, held-out samples are noised with the pipeline's scheduler (``x_t = add_noise(x_0,
eps, t)``, the same noise for every pipeline) and predicted with their true label and with the null label:

* ``mse``: mean over samples and elements of ``(eps_y - eps_null)^2``;
* ``relative``: mean over samples of ``||eps_y - eps_null|| / ||eps_y||``.

Pipelines: any folder with ``model_index.json``, or a folder searched for them (an ``ablation.py`` output
folder: ``<variant>/seed-<n>/train/pipeline``; rows of one variant are also averaged over seeds).

    python benchmarks/conditioning.py outputs/ablation --data-dir outputs/ablation/data/heldout \\
        --output-dir outputs/conditioning
    python benchmarks/conditioning.py runs/ablation --latents-dir data/imagenet256-val-latents --num-samples 1000

Results: ``<output-dir>/conditioning.json`` and ``<output-dir>/conditioning.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from sdt_diffusion import SDTPipeline
from sdt_diffusion.data import ImageClassDataset, LatentCacheDataset, load_image_folder
from sdt_diffusion.models.registry import num_classes_of
from sdt_diffusion.models.vae import encode_latents, vae_downsampling_factor, vae_scaling_factor
from sdt_diffusion.utils.errors import ConfigError

DEFAULT_TIMESTEPS = (50, 250, 500, 750, 950)


def find_pipelines(roots: list[str]) -> list[tuple[str, str, Path]]:
    """``(label, group, folder)`` of every pipeline: a folder with ``model_index.json`` or found below one."""
    found = []
    for root in map(Path, roots):
        if (root / "model_index.json").is_file():
            found.append((root.name or str(root), root.name or str(root), root))
            continue
        if not root.is_dir():
            raise ConfigError(f"pipeline folder {str(root)!r} does not exist")
        below = sorted(p.parent for p in root.rglob("model_index.json"))
        if not below:
            raise ConfigError(f"{str(root)!r} holds no pipeline (no model_index.json below it)")
        for folder in below:
            rel = folder.relative_to(root)
            if rel.parts[0].startswith("seed-"):  # one variant's folder (<variant>/seed-<n>/...): named after it
                rel = Path(root.resolve().name) / rel
            found.append((str(rel), rel.parts[0] if len(rel.parts) > 1 else str(rel), folder))
    return found


def heldout_samples(pipe: SDTPipeline, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_samples`` held-out samples as the model's input ``x_0`` (scaled latents or pixels) and labels."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.latents_dir:
        data = LatentCacheDataset(args.latents_dir)
        cfg = pipe.transformer.config
        wanted = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if tuple(data.latent_shape) != wanted:
            raise ConfigError(f"--latents-dir {args.latents_dir}: latents of shape {tuple(data.latent_shape)}, the "
                              f"model takes {wanted}")
        items = [data[i] for i in evenly_spaced(len(data), args.num_samples)]
        scale = data.meta.get("scaling_factor")  # the cache's VAE's; else the pipeline's
        if scale is None:
            scale = vae_scaling_factor(pipe.vae) if pipe.vae is not None else 1.0
        x0 = torch.stack([it["latent_mean"] for it in items]) * float(scale)  # the posterior mean: no sampling noise
    else:
        cfg = pipe.transformer.config
        factor = vae_downsampling_factor(pipe.vae) if pipe.vae is not None else 1
        data = ImageClassDataset(load_image_folder(args.data_dir), cfg.sample_size * factor)
        items = [data[i] for i in evenly_spaced(len(data), args.num_samples)]
        pixels = torch.stack([it["pixel_values"] for it in items])
        if pipe.vae is None:
            x0 = pixels
        else:
            with torch.no_grad():
                x0 = encode_latents(pipe.vae, pixels.to(pipe.vae.dtype), generator, sample=False).float()
    if not items:
        raise ConfigError("the held-out data holds no samples")
    return x0, torch.tensor([it["labels"] for it in items])


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread over ``range(total)`` (every class of a class-sorted folder appears)."""
    if count >= total:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, count)})


@torch.no_grad()
def label_effect(pipe: SDTPipeline, x0: torch.Tensor, labels: torch.Tensor, timesteps: list[int], seed: int,
                 batch_size: int) -> dict[int, dict[str, float]]:
    """``{t: {"mse", "relative"}}``: conditional vs. null-label noise prediction at each timestep."""
    model = pipe.transformer.eval()
    device, dtype = model.device, model.dtype
    channels = model.config.in_channels
    null = num_classes_of(model)
    if int(labels.max()) >= null:
        raise ConfigError(f"held-out labels reach {int(labels.max())}, but the model has {null} classes")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out: dict[int, dict[str, float]] = {}
    for t in timesteps:
        sq, rel = [], []
        for start in range(0, len(x0), batch_size):
            sl = slice(start, start + batch_size)
            tt = torch.full((len(x0[sl]),), t, dtype=torch.long)
            x_t = pipe.scheduler.add_noise(x0[sl], noise[sl], tt).to(device, dtype)
            cond = model(x_t, tt.to(device), labels[sl].to(device)).sample[:, :channels].double()
            uncond = model(x_t, tt.to(device), torch.full_like(labels[sl], null).to(device)).sample[:, :channels].double()
            diff = (cond - uncond).flatten(1)
            sq.append(diff.square().mean(1))
            rel.append(diff.norm(dim=1) / cond.flatten(1).norm(dim=1).clamp_min(1e-12))
        out[t] = {"mse": torch.cat(sq).mean().item(), "relative": torch.cat(rel).mean().item()}
    return out


def markdown(rows: list[dict], timesteps: list[int], key: str, title: str) -> str:
    """One table: a row per pipeline (or variant), a column per timestep."""
    lines = [f"{title}", "", "| pipeline | " + " | ".join(f"t={t}" for t in timesteps) + " |",
             "|---|" + "---|" * len(timesteps)]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(f"{row['by_timestep'][str(t)][key]:.4g}" for t in timesteps) + " |")
    return "\n".join(lines)


def group_means(rows: list[dict], timesteps: list[int]) -> list[dict]:
    """Rows of one group (an ablation variant) averaged over its seeds."""
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return [{"label": f"{group} (mean of {len(members)})", "by_timestep": {
        str(t): {k: statistics.fmean(m["by_timestep"][str(t)][k] for m in members) for k in ("mse", "relative")}
        for t in timesteps}} for group, members in groups.items()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipelines", nargs="+", help="pipeline folders, or folders searched for them (ablation output)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", help="held-out image folder (one subfolder per class)")
    data.add_argument("--latents-dir", help="held-out latent cache (training/extract_latents.py)")
    p.add_argument("--timesteps", nargs="+", type=int, default=list(DEFAULT_TIMESTEPS),
                   help="diffusion steps to measure at (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=256, help="held-out samples (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="device to run on (default: %(default)s)")
    p.add_argument("--output-dir", default="outputs/conditioning",
                   help="folder for conditioning.json and conditioning.md (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error(f"--num-samples and --batch-size must be >= 1, got {args.num_samples} and {args.batch_size}")
    try:
        pipelines = find_pipelines(args.pipelines)
        rows = []
        for label, group, folder in pipelines:
            pipe = SDTPipeline.from_pretrained(folder).to(args.device)
            steps = pipe.scheduler.config.num_train_timesteps
            bad = [t for t in args.timesteps if not 0 <= t < steps]
            if bad:
                raise ConfigError(f"--timesteps {bad} lie outside the scheduler's 0..{steps - 1} ({folder})")
            x0, labels = heldout_samples(pipe, args)
            effect = label_effect(pipe, x0, labels, args.timesteps, args.seed, args.batch_size)
            rows.append({"label": label, "group": group, "pipeline": str(folder), "num_samples": len(x0),
                         "by_timestep": {str(t): v for t, v in effect.items()}})
            print(f"[conditioning] {label}: " + json.dumps({t: round(v["relative"], 4) for t, v in effect.items()}),
                  flush=True)
    except ConfigError as e:
        parser.exit(2, f"conditioning.py: error: {e}\n")
    summary = group_means(rows, args.timesteps) if len({r["group"] for r in rows}) < len(rows) else []
    text = "\n\n".join([
        markdown(rows, args.timesteps, "relative", "Relative change ||eps_y - eps_null|| / ||eps_y||"),
        markdown(rows, args.timesteps, "mse", "Mean squared difference (eps_y - eps_null)^2"),
        *([markdown(summary, args.timesteps, "relative", "Relative change, mean over seeds")] if summary else []),
    ])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args), "runs": rows, "summary": summary}
    (out / "conditioning.json").write_text(json.dumps(result, indent=2))
    (out / "conditioning.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
