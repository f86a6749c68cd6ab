"""Image grids with captions (sample grids for the pipeline CLI, training previews and the demo)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["make_labelled_grid", "to_pil"]


def to_pil(image) -> Image.Image:
    """A PIL image (RGB) from a PIL image, an HWC/HW uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an HW or HWC image array, got shape {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable default font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ValueError):
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; overlong words are cut and the last line gets an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if _text_size(draw, trial, font)[0] <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    truncated = len(lines) > max_lines
    lines = lines[:max_lines] or [""]
    fitted = []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        ellipsis = "…" if (last and truncated) else ""
        while line and _text_size(draw, line + ellipsis, font)[0] > width:
            line, ellipsis = line[:-1], "…"
        fitted.append(line + ellipsis)
    return fitted


def make_labelled_grid(
    images: Sequence,
    labels: Sequence[str] | None = None,
    ncols: int | None = None,
    *,
    min_cell_size: int = 128,
    padding: int = 4,
    font_size: int | None = None,
    max_label_lines: int = 2,
    background: str | tuple[int, int, int] = "white",
    text_color: str | tuple[int, int, int] = "black",
) -> Image.Image:
    """Arrange ``images`` in a grid, each with its caption underneath.

    Args:
        images: PIL images (or HWC arrays); they are shown at the size of the largest one. Cells smaller
            than ``min_cell_size`` are upscaled by an integer factor with nearest-neighbour so that tiny
            samples (e.g. 16x16) stay crisp and readable.
        labels: one caption per image, or ``None`` for no captions (no caption strip is drawn).
        ncols: images per row; ``None`` picks ``ceil(sqrt(n))``.
        min_cell_size: smallest displayed image side in pixels (0 disables upscaling).
        padding: gap between cells and around the grid, in pixels.
        font_size: caption font size; ``None`` scales it with the cell width.
        max_label_lines: captions wrap onto at most this many lines (then end with an ellipsis).
        background, text_color: colours.

    Returns:
        The grid as an RGB PIL image.
    """
    pil = [to_pil(im) for im in images]
    if not pil:
        raise ValueError("make_labelled_grid needs at least one image")
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(pil):
            raise ValueError(f"got {len(labels)} labels for {len(pil)} images")
    n = len(pil)
    ncols = math.ceil(math.sqrt(n)) if ncols is None else int(ncols)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)

    cell_w = max(im.width for im in pil)
    cell_h = max(im.height for im in pil)
    factor = max(1, math.ceil(min_cell_size / min(cell_w, cell_h))) if min_cell_size else 1
    cell_w, cell_h = cell_w * factor, cell_h * factor

    caption_h = 0
    font = None
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped: list[list[str]] = []
    if labels is not None:
        font = _font(font_size or max(10, min(24, cell_w // 10)))
        line_h = _text_size(measure, "Ag", font)[1] + 3
        wrapped = [_wrap(measure, label, font, cell_w, max_label_lines) for label in labels]
        caption_h = line_h * max(len(w) for w in wrapped) + padding

    grid = Image.new(
        "RGB",
        (ncols * cell_w + (ncols + 1) * padding, nrows * (cell_h + caption_h) + (nrows + 1) * padding),
        background,
    )
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(pil):
        row, col = divmod(i, ncols)
        x0 = padding + col * (cell_w + padding)
        y0 = padding + row * (cell_h + caption_h + padding)
        shown = im.resize((im.width * factor, im.height * factor), Image.NEAREST) if factor > 1 else im
        grid.paste(shown, (x0 + (cell_w - shown.width) // 2, y0 + (cell_h - shown.height) // 2))
        if labels is not None:
            y = y0 + cell_h + padding // 2
            for line in wrapped[i]:
                w, _ = _text_size(draw, line, font)
                draw.text((x0 + (cell_w - w) // 2, y), line, fill=text_color, font=font)
                y += line_h
    return grid
