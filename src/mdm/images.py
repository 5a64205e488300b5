"""Pixel conversions and PNG grids with every level of a pyramid side by side."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mdm import io
from mdm.io import to_uint8


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """One PIL image per batch row."""
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in to_uint8(x)]


def level_strip(levels: list[torch.Tensor], labels: list[str] | None = None) -> list[Image.Image]:
    """Per sample, every level upscaled (nearest) to the top size, side by side, highest first, labelled."""
    size = levels[0].shape[-1]
    panels = [F.interpolate(lv.float(), size=(size, size), mode="nearest") for lv in levels]
    row = torch.cat(panels, dim=-1)
    images = to_pil(row)
    if labels is None:
        labels = [f"{lv.shape[-1]}px" for lv in levels]
    out = []
    for img in images:
        canvas = Image.new("RGB", (img.width, img.height + 12), "white")
        canvas.paste(img.convert("RGB"), (0, 12))
        draw = ImageDraw.Draw(canvas)
        for i, text in enumerate(labels):
            draw.text((i * size + 2, 0), text, fill="black")
        out.append(canvas)
    return out


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG, creating parent folders; written to a temporary name first, then renamed."""
    with io.atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def sample_grid(
    levels: list[torch.Tensor], titles: list[str], ncols: int = 4, labels: list[str] | None = None
) -> Image.Image:
    """A titled cell per sample, each cell every level side by side (highest first, `labels` default '16px'),
    upscaled to >= 128 px.

    Titles wrap to the cell width (captions can be long).
    """
    scale = max(1, 128 // levels[0].shape[-1])
    labels = labels or [f"{lv.shape[-1]}px" for lv in levels]
    strips = level_strip([F.interpolate(lv.float(), scale_factor=scale, mode="nearest") for lv in levels], labels)
    w = strips[0].width
    wrapped = [textwrap.wrap(title, max(8, w // 6)) or [""] for title in titles]
    title_h = 11 * max(len(lines) for lines in wrapped) + 1
    h = strips[0].height + title_h
    nrows = -(-len(strips) // ncols)
    canvas = Image.new("RGB", (ncols * (w + 4), nrows * (h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (strip, lines) in enumerate(zip(strips, wrapped, strict=True)):
        x, y = (i % ncols) * (w + 4), (i // ncols) * (h + 4)
        draw.multiline_text((x + 2, y), "\n".join(lines), fill="black", spacing=1)
        canvas.paste(strip, (x, y + title_h))
    return canvas
