"""Clips as files: animated GIF and lossless APNG through Pillow, MP4 through the optional extra `video`, reading
any of them (or a frame folder) back, and PNG strips of every level's frames.

A clip is a float tensor (C, T, H, W) in [-1, 1], C = 1 or 3; pixels are written with the images' convention
(`mdm.io.to_uint8`) and read back as training data is (`mdm.io.from_uint8`). Every write is atomic.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import Blend

from mdm import io
from mdm.data.video import FRAME_MS, ffmpeg_reader, open_clip
from mdm.images import level_strip, to_pil
from mdm.io import from_uint8, to_uint8


def _check(clip: torch.Tensor, what: str = "clip") -> torch.Tensor:
    """`clip` when it is (C, T, H, W) with 1 or 3 channels and at least one frame."""
    if clip.dim() != 4 or clip.shape[0] not in (1, 3) or clip.shape[1] < 1:
        raise ValueError(f"{what}: expected a (C, T, H, W) clip with 1 or 3 channels, got shape {tuple(clip.shape)}")
    return clip


def clip_images(clip: torch.Tensor) -> list[Image.Image]:
    """One PIL image per frame of a (C, T, H, W) clip in [-1, 1]."""
    return to_pil(_check(clip).transpose(0, 1))


def save_gif(frames: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    """An animated GIF of the (C, T, H, W) clip, looping, `fps` frames a second (GIF keeps 10 ms steps).

    Each frame gets its own 256-colour palette, so colours come back within palette tolerance. GIF writers merge
    repeated frames into one longer frame; the file's comment records one frame's duration so `read_clip`
    restores every frame."""
    images = clip_images(frames)
    frame_ms = 1000.0 / fps
    with io.atomic_file(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=frame_ms,
            loop=0,
            comment=FRAME_MS + f"{frame_ms:g}".encode(),
        )
    return Path(path)


def save_apng(frames: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    """A lossless animated PNG of the (C, T, H, W) clip, looping, `fps` frames a second; every frame is stored
    (blending alternates between two modes that are equal on opaque frames, so repeated frames are not merged)."""
    images = clip_images(frames)
    blend = [Blend.OP_SOURCE if i % 2 == 0 else Blend.OP_OVER for i in range(len(images))]
    with io.atomic_file(path) as tmp:
        images[0].save(
            tmp, format="PNG", save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=0, blend=blend
        )
    return Path(path)


def mp4_available() -> bool:
    """Whether the optional extra `video` (imageio + imageio-ffmpeg) is installed, so MP4 can be read and written."""
    try:
        ffmpeg_reader()
    except ImportError:
        return False
    return True


def save_mp4(frames: torch.Tensor, path: str | Path, fps: float = 8.0, min_side: int = 128) -> Path:
    """An H.264 MP4 of the (C, T, H, W) clip (needs the extra `video`), frames upscaled nearest by a whole factor
    to at least `min_side` px and padded to even sides (yuv420p, what players expect); lossy."""
    iio = ffmpeg_reader()
    clip = _check(frames)
    factor = max(1, math.ceil(min_side / min(clip.shape[-2:])))
    pixels = to_uint8(F.interpolate(clip.transpose(0, 1).float(), scale_factor=factor, mode="nearest"))
    pixels = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels
    h, w = pixels.shape[1:3]
    pixels = np.pad(pixels, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with io.atomic_file(path) as tmp:
        iio.imwrite(
            tmp,
            pixels,
            plugin="FFMPEG",
            extension=".mp4",
            fps=fps,
            codec="libx264",
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-f", "mp4"],
        )
    return Path(path)


def read_clip(path: str | Path) -> torch.Tensor:
    """Every frame of a GIF, APNG/WebP, MP4/WebM (extra `video`) or frame folder as a (3, T, H, W) tensor in [-1, 1]."""
    with open_clip(Path(path), max_pixels=2**31) as clip:
        return torch.stack([from_uint8(np.asarray(clip.frame(i).convert("RGB"))) for i in range(clip.count)], dim=1)


def frame_strip(levels: list[torch.Tensor], min_side: int = 64) -> Image.Image:
    """Every level of one sample (square (C, T, S, S) clips, highest first) as a row of its frames, rows stacked,
    each labelled 'T x S px'; frames are upscaled nearest to the top level's size, at least `min_side` px."""
    if not levels:
        raise ValueError("frame_strip needs at least one level")
    top = _check(levels[0], "level 0").shape[-1]
    side = top * max(1, min_side // top)
    rows = []
    for i, level in enumerate(levels):
        _, t, h, w = _check(level, f"level {i}").shape
        if h != w:
            raise ValueError(f"level {i}: frame_strip takes square frames, got {h}x{w}")
        frames = F.interpolate(level.transpose(0, 1).float(), size=(side, side), mode="nearest")
        rows.append(level_strip([frames[k : k + 1] for k in range(t)], [f"{t} x {w} px"] + [""] * (t - 1))[0])
    strip = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 2 for r in rows)), "white")
    y = 0
    for row in rows:
        strip.paste(row, (0, y))
        y += row.height + 2
    return strip
