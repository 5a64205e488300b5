"""Video folders: clips (MP4/WebM/GIF/APNG files or frame folders) with captions, read as (3, T, H, W) tensors.

The layouts are the image folder's (`mdm.data.folder`): a `metadata.jsonl` whose `file_name` names a clip file or
a frame folder, class subfolders, or a flat folder with sidecar `.txt` captions (`clip.gif` -> `clip.txt`, the
frame folder `clip/` -> `clip.txt` beside it). Below the root:
- a folder that holds still images (.png/.jpg/...) and no clip files or subfolders is a *frame folder*, one clip
  whose frames are its images in natural name order (frame2 before frame10), unless its first PNG/WebP is
  animated (then its files are clips);
- every other file named .gif/.png/.apng/.webp is a clip decoded by Pillow, and .mp4/.webm/.mkv/.mov/.avi/.m4v a
  clip decoded by ffmpeg through the optional extra `video` (imageio + imageio-ffmpeg).

A clip gives `num_frames` frames `frame_stride` apart: the window is centred in the clip (`data.crop = center`)
or starts at a random frame (`random`), and every frame gets the same resize, crop and flip as an image would. A
clip that cannot be used (undecodable, too short, frames of different sizes, too small, outside the folder, no
caption where one is needed) is replaced by the next usable one and counted, exactly as a bad image.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from mdm.data.folder import (
    DECODE_ERRORS,
    IMAGE_SUFFIXES,
    BadSample,
    DataError,
    FolderDataset,
    ReadOptions,
    image_files,
    load_image,
    open_image,
    require_int,
    resize_crop,
    to_rgb,
)

PILLOW_CLIPS = frozenset({".gif", ".png", ".apng", ".webp"})
FFMPEG_CLIPS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"})
CLIP_SUFFIXES = PILLOW_CLIPS | FFMPEG_CLIPS
FRAME_SUFFIXES = frozenset(IMAGE_SUFFIXES - {".gif"})
VIDEO_EXTRA = "pip install 'mdm[video]' (imageio and imageio-ffmpeg)"
FRAME_MS = b"mdm frame_ms="  # GIF comment prefix saying how long one frame lasts, so merged frames can be expanded


class Frames(NamedTuple):
    """A decoded clip: how many frames it has, and frame i as an RGB image."""

    count: int
    frame: Callable[[int], Image.Image]


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: frame2 before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def ffmpeg_reader() -> object:
    """imageio's v3 API (with the ffmpeg plugin), or ImportError saying which extra to install."""
    try:
        import imageio.v3 as iio
        import imageio_ffmpeg  # noqa: F401 (the plugin's ffmpeg binary)
    except ImportError as e:
        raise ImportError(f"reading and writing MP4/WebM needs the optional extra: {VIDEO_EXTRA} ({e})") from None
    return iio


def _frame_map(im: Image.Image) -> list[int]:
    """Stored frame index of every shown frame: each frame once, or, in a GIF written by mdm (which merges
    repeated frames), as many times as its duration holds frames."""
    count = getattr(im, "n_frames", 1)
    comment = im.info.get("comment", b"")
    if not isinstance(comment, bytes) or not comment.startswith(FRAME_MS):
        return list(range(count))
    frame_ms = float(comment[len(FRAME_MS) :].decode("ascii"))
    shown = []
    for i in range(count):
        im.seek(i)
        shown += [i] * max(1, round(im.info.get("duration", frame_ms) / frame_ms))
    im.seek(0)
    return shown


@contextmanager
def open_clip(path: Path, max_pixels: int, read: Callable[[Path], bytes] = Path.read_bytes) -> Iterator[Frames]:
    """The frames of the clip at `path` (a file or a frame folder; images are read through `read`, videos by ffmpeg
    from the path); BadSample when they cannot be decoded (inside the block too), ImportError when MP4/WebM
    support is not installed."""
    name = str(path)
    if path.is_dir():
        frames = sorted(
            (p for p in path.iterdir() if not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES),
            key=lambda p: natural_key(p.name),
        )
        yield Frames(len(frames), lambda i: load_image(str(frames[i]), 1, max_pixels, read(frames[i])))
    elif path.suffix.lower() in FFMPEG_CLIPS:
        iio = ffmpeg_reader()
        try:
            arrays = list(iio.imiter(path, plugin="FFMPEG"))
        except (*DECODE_ERRORS, RuntimeError) as e:
            raise BadSample(f"{name}: not a readable video ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if arrays and arrays[0].shape[0] * arrays[0].shape[1] > max_pixels:
            raise BadSample(f"{name}: {arrays[0].shape[1]}x{arrays[0].shape[0]} exceeds data.max_pixels = {max_pixels}")
        yield Frames(len(arrays), lambda i: Image.fromarray(arrays[i]).convert("RGB"))
    else:
        with open_image(name, read(path), max_pixels) as im:
            shown = _frame_map(im)

            def frame(i: int) -> Image.Image:
                im.seek(shown[i])
                return to_rgb(im)

            yield Frames(len(shown), frame)


def clip_paths(root: Path) -> list[Path]:
    """Every clip below `root`, sorted: frame folders (see the module docs) and clip files outside them."""
    files = image_files(root, IMAGE_SUFFIXES | CLIP_SUFFIXES)
    folders: dict[Path, list[Path]] = {}
    for f in files:
        folders.setdefault(f.parent, []).append(f)
    nested = {parent for folder in folders for parent in folder.parents}
    frame_folders = {
        folder
        for folder, inside in folders.items()
        if folder != root
        and folder not in nested
        and all(f.suffix.lower() in FRAME_SUFFIXES for f in inside)
        and not _animated(min(inside, key=lambda p: natural_key(p.name)))
    }
    clips = [f for f in files if f.parent not in frame_folders and f.suffix.lower() in CLIP_SUFFIXES]
    return sorted(clips + list(frame_folders))


def _animated(path: Path) -> bool:
    """Whether the PNG/WebP `path` holds more than one frame (its header says; unreadable files are not)."""
    if path.suffix.lower() not in PILLOW_CLIPS:
        return False
    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except DECODE_ERRORS:
        return False


class VideoFolderDataset(FolderDataset):
    """Clips (and captions / labels) from a folder in one of the image folder's layouts; items hold 'video'
    (3, num_frames, S, S) in [-1, 1], 'label' and 'caption'."""

    what, looked_for = "clips", f"files {sorted(CLIP_SUFFIXES)} and folders of frames"

    def __init__(self, root: str | Path, options: ReadOptions, num_frames: int, frame_stride: int = 1) -> None:
        self.num_frames = require_int(num_frames, "num_frames", 1)
        self.frame_stride = require_int(frame_stride, "data.frame_stride", 1)
        super().__init__(root, options)
        self.layout = f"video clips, {self.layout}"
        ffmpeg = [item.path for item in self.items if item.path.suffix.lower() in FFMPEG_CLIPS]
        if ffmpeg:
            try:
                ffmpeg_reader()
            except ImportError as e:
                raise DataError(f"data.path: {ffmpeg[0]} (and {len(ffmpeg) - 1} more): {e}") from None

    def files(self) -> list[Path]:
        """The clips below the root (clip files and frame folders)."""
        return clip_paths(self.root)

    @property
    def span(self) -> int:
        """Frames a clip needs: (num_frames - 1) * frame_stride + 1."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def frames(self, index: int) -> tuple[list[Image.Image], int]:
        """The chosen frames of clip `index` as RGB images, and how many frames the clip has; BadSample if unusable."""
        name = str(self.items[index].path)
        path = self.checked(self.items[index].path)
        with open_clip(path, self.options.max_pixels, self._bytes) as clip:
            if clip.count < self.span:
                raise BadSample(
                    f"{name}: {clip.count} frames, fewer than the {self.span} that {self.num_frames} frames "
                    f"{self.frame_stride} apart (num_frames, data.frame_stride) need"
                )
            rng = np.random.default_rng([self.options.seed, index, 1])
            room = clip.count - self.span
            start = int(rng.integers(room + 1)) if self.options.crop == "random" else room // 2
            images = [clip.frame(start + k * self.frame_stride) for k in range(self.num_frames)]
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise BadSample(f"{name}: frames of different sizes {sorted(sizes)}")
        w, h = images[0].size
        if min(w, h) < self.options.smallest:
            raise BadSample(f"{name}: {w}x{h} frames are smaller than data.min_size = {self.options.smallest}")
        return images, clip.count

    def load(self, index: int) -> dict:
        """Clip `index` or BadSample."""
        name, caption, label = self.describe(index)
        o = self.options
        if o.need_captions and not caption:
            raise BadSample(f"{name}: no caption")
        images, _ = self.frames(index)
        # Each frame gets a generator in the same state, so all take the same crop and flip.
        frames = [
            resize_crop(im, o.image_size, o.crop, o.flip, np.random.default_rng([o.seed, index])) for im in images
        ]
        return {"video": torch.stack(frames, dim=1), "label": label, "caption": caption or ""}
