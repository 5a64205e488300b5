"""Generated clips as people look at them: an animated grid (a titled cell per sample, every level side by side,
labelled 'T x S px') and PNG frame strips, written by the trainer, `mdm sample` and `mdm demo`.

Levels are (N, C, T, S, S) clips in [-1, 1], highest first; at top frame t a level of T_l frames shows its frame
t * T_l // T (a one-frame level holds still, a level with half the frames shows each frame twice).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mdm.images import sample_grid, save_png
from mdm.videos import frame_strip, mp4_available, save_gif, save_mp4

FPS = 4.0  # frames a second of written clips: a few frames should read as motion, not flicker


def level_labels(levels: list[torch.Tensor]) -> list[str]:
    """'T x S px' of every (N, C, T, S, S) level."""
    return [f"{lv.shape[2]} x {lv.shape[-1]} px" for lv in levels]


def frames_at(levels: list[torch.Tensor], t: int) -> list[torch.Tensor]:
    """What every level shows at top-level frame `t`: (N, C, S, S) per level."""
    top = levels[0].shape[2]
    return [lv[:, :, t * lv.shape[2] // top] for lv in levels]


def _as_frame(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) frame in [-1, 1] that `mdm.io.to_uint8` turns back into the same pixels."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float().sub(127).div(128)


def grid_clip(levels: list[torch.Tensor], titles: list[str], ncols: int = 4) -> torch.Tensor:
    """The animated sample grid as one (3, T, H, W) clip: frame t is `images.sample_grid` of `frames_at(t)`."""
    labels = level_labels(levels)
    frames = [sample_grid(frames_at(levels, t), titles, ncols, labels) for t in range(levels[0].shape[2])]
    return torch.stack([_as_frame(f) for f in frames], dim=1)


def strips(levels: list[torch.Tensor], titles: list[str]) -> Image.Image:
    """Every sample's frame strip (`videos.frame_strip`: a row of frames per level), titled, stacked."""
    rows = [frame_strip([lv[i] for lv in levels]) for i in range(len(titles))]
    width, line = max(r.width for r in rows), 12
    canvas = Image.new("RGB", (width, sum(r.height + line + 4 for r in rows)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for row, title in zip(rows, titles, strict=True):
        draw.text((2, y), title, fill="black")
        canvas.paste(row, (0, y + line))
        y += row.height + line + 4
    return canvas


def save_samples(
    levels: list[torch.Tensor], titles: list[str], stem: Path, ncols: int = 4, mp4: bool = False
) -> list[Path]:
    """`stem`.gif (the animated grid) and `stem`.png (the frame strips), and `stem`.mp4 when `mp4` is asked for
    and the extra `video` is installed; returns the paths written."""
    clip = grid_clip(levels, titles, ncols)
    paths = [save_gif(clip, stem.with_suffix(".gif"), FPS), save_png(strips(levels, titles), stem.with_suffix(".png"))]
    if mp4 and mp4_available():
        paths.append(save_mp4(clip, stem.with_suffix(".mp4"), FPS))
    return paths
