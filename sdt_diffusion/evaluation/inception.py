"""The Inception-V3 feature extractor of the FID evaluation, loaded without unpickling anything.

torch-fidelity's ``inception-v3-compat`` is a port of the TensorFlow Inception-V3 graph ("2015-12-05") that
OpenAI's guided-diffusion evaluator (ADM) uses. Per image it gives:

- ``pool``: the 2048-d ``pool_3`` features (FID, precision/recall);
- ``spatial``: ADM's sFID features, ``mixed_6/conv`` (``Mixed_6d.branch1x1`` in the port, read with a forward
  hook), first 7 channels of the 17×17 map flattened in TensorFlow's (H, W, C) order → 7·17·17 = 2023-d;
- ``logits``: the 1008 logits without the final bias (Inception Score).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils.optional import import_optional
from ..utils.runtime import ieee_fp32
from .images import EvaluationInputError, MissingInputError, check_image_array_shape

# torch-fidelity comes with the evaluation extra; the ImportError names the extra when it is missing.
fidelity_inception = import_optional("torch_fidelity.feature_extractor_inceptionv3", "eval")

__all__ = [
    "FEATURE_EXTRACTOR_NAME",
    "POOL_DIM",
    "SPATIAL_DIM",
    "InceptionFeatures",
    "extract_features",
    "load_inception",
]

FEATURE_EXTRACTOR_NAME = "inception-v3-compat"
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2023


def _state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and tensor bytes: identifies the weights, not the file."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_state_dict(weights_path: str | Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """Load Inception weights safely (``weights_only=True``); returns (state_dict, description)."""
    if weights_path is None:
        url = fidelity_inception.URL_INCEPTION_V3
        try:
            # Same URL and torch-hub cache file that torch-fidelity uses; hash-checked, loaded without pickle code.
            sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                    weights_only=True)
        except Exception as e:
            raise RuntimeError(
                f"could not fetch the Inception weights from {url} ({e}); download the file elsewhere and pass "
                "--inception-weights PATH (or place it in the torch hub checkpoints folder)"
            ) from e
        return sd, url
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"{path}: Inception weights file does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvaluationInputError(f"{path}: cannot load as a tensors-only PyTorch state dict ({e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EvaluationInputError(f"{path}: expected a state dict of tensors for torch-fidelity's {FEATURE_EXTRACTOR_NAME}")
    return sd, str(path)


class InceptionFeatures(nn.Module):
    """torch-fidelity's ``inception-v3-compat`` plus a hook on ``Mixed_6d.branch1x1`` for sFID features.

    ``forward(images)`` takes uint8 N×3×H×W (any H, W: the network resizes to 299×299 like TF1 bilinear) and
    returns float32 ``{"pool": N×2048, "spatial": N×2023, "logits": N×1008}`` (logits without the fc bias).
    """

    def __init__(self, net: nn.Module, weights_id: str, weights_source: str) -> None:
        super().__init__()
        self.net = net
        self.weights_id = weights_id
        self.weights_source = weights_source
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._spatial = output

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 N×3×H×W images, got {images.dtype} {tuple(images.shape)}")
        self._spatial = None
        pool, logits = self.net(images)
        spatial = self._spatial
        self._spatial = None
        assert spatial is not None and spatial.shape[1:] == (192, SPATIAL_SIZE, SPATIAL_SIZE), "sFID hook did not fire"
        # TF's mixed_6/conv is NHWC: keep channels 0..6 and flatten (H, W, C) like ADM's reshape.
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


def load_inception(weights_path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Build the Inception feature extractor on ``device``.

    ``weights_path``: a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (loaded with
    ``weights_only=True``); None downloads it (hash-checked) into the torch hub cache, where torch-fidelity keeps it.
    """
    state_dict, source = _load_state_dict(weights_path)
    weights_id = _state_dict_digest(state_dict)
    # torch-fidelity unpickles `feature_extractor_weights_path` with weights_only=False, so hand it an in-memory
    # copy of the tensors we already loaded safely instead of the user's file.
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    try:
        net = fidelity_inception.FeatureExtractorInceptionV3(FEATURE_EXTRACTOR_NAME, ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=buffer)
    except RuntimeError as e:
        raise EvaluationInputError(f"{source}: not weights for torch-fidelity's {FEATURE_EXTRACTOR_NAME} ({e})") from e
    del buffer, state_dict
    return InceptionFeatures(net, weights_id, source).to(device).eval()


def extract_features(
    images_iter: Iterable[np.ndarray | torch.Tensor],
    model: InceptionFeatures,
    *,
    total: int | None = None,
    desc: str = "Inception features",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run ``model`` over batches of uint8 images; returns float32 arrays ``pool``, ``spatial``, ``logits``.

    numpy batches are N×H×W×3 (ADM layout), torch batches N×3×H×W. Runs on ``model``'s device.
    """
    device = model.device
    out: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    with torch.inference_mode(), (ieee_fp32() if device.type == "cuda" else contextlib.nullcontext()), tqdm(
        total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        for batch in images_iter:
            if isinstance(batch, np.ndarray):
                check_image_array_shape(batch.shape, batch.dtype, desc)
                x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
            else:
                x = batch
            feats = model(x.to(device, non_blocking=True))
            for key in out:
                out[key].append(feats[key].cpu().numpy())
            bar.update(x.shape[0])
    if not out["pool"]:
        raise ValueError(f"{desc}: no images")
    return {key: np.concatenate(val, axis=0) for key, val in out.items()}

