"""Image folders: class subfolders, a `metadata.jsonl`, or flat images with sidecar `.txt` captions.

Layouts, checked in this order:
- `metadata.jsonl`: one JSON object per line with `file_name` (relative to the folder), `text` and an
  optional `label` (an index or a class name);
- class subfolders: `root/<class name>/<image>`; the caption is a sidecar `.txt` if present, else the class;
- flat: every image below `root`, captioned by its sidecar `.txt`.

Images are read with EXIF orientation applied, converted to RGB (grayscale, palette, RGBA over white, 16-bit),
resized so the shorter side is `image_size`, then centre- or randomly cropped and optionally flipped; the
random choices come from a generator seeded by (seed, index). A sample that cannot be used (unreadable,
truncated, empty, too small, a decompression bomb, no caption where one is needed) is replaced by the next
usable one, and the item says how many it skipped so the trainer can count and report them.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BadSample(ValueError):
    """A file that cannot become a training image (the message says why)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16/32-bit grayscale is rescaled, alpha is composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(path: Path | str, min_size: int, max_pixels: int, data: bytes | None = None) -> Image.Image:
    """Open, orient and convert one image (a file, or `data` read from an archive member named `path`).

    Raises BadSample naming the problem.
    """
    try:
        size = len(data) if data is not None else Path(path).stat().st_size
    except FileNotFoundError:
        raise BadSample(f"{path}: listed but missing") from None
    if size == 0:
        raise BadSample(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as im:
                if im.width * im.height > max_pixels:
                    raise BadSample(f"{path}: {im.width}x{im.height} exceeds data.max_pixels = {max_pixels}")
                im.load()
                image = to_rgb(ImageOps.exif_transpose(im))
    except BadSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if min(image.size) < min_size:
        raise BadSample(f"{path}: {image.width}x{image.height} is smaller than data.min_size = {min_size}")
    return image


def resize_crop(image: Image.Image, size: int, crop: str, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """Shorter side to `size` (Lanczos), centre or random square crop, optional flip -> (3, size, size) in [-1, 1]."""
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if crop == "random":
        x, y = int(rng.integers(w - size + 1)), int(rng.integers(h - size + 1))
    else:
        x, y = (w - size) // 2, (h - size) // 2
    arr = np.asarray(image.crop((x, y, x + size, y + size)), dtype=np.float32)
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()) / 127.5 - 1.0


@dataclass(frozen=True)
class ReadOptions:
    """How stored images become training tensors, and which samples count as unusable."""

    image_size: int
    crop: str = "center"
    flip: bool = False
    seed: int = 0
    min_size: int = 0
    max_pixels: int = 89_478_485
    need_captions: bool = False

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {self.crop!r}")

    @property
    def smallest(self) -> int:
        """Shorter sides below this are unusable (min_size, else the training size)."""
        return self.min_size or self.image_size


class ImageDataset(Dataset):
    """Shared reading: decode, check, resize and crop; `__getitem__` passes over unusable samples.

    Each storage layout says what sample `index` is (`describe`) and where its bytes are (`read`), and names
    itself in `layout` (for reports).
    """

    options: ReadOptions
    items: list
    class_names: list[str]
    layout: str

    def describe(self, index: int) -> tuple[str, str | None, int]:
        """(name, caption or None, label or -1) of sample `index`; the name is a file or an archive member."""
        raise NotImplementedError

    def read(self, index: int) -> bytes | None:
        """The image bytes of sample `index`, or None when its `describe` name is the file to open (or BadSample)."""
        return None

    @property
    def num_classes(self) -> int:
        """Number of classes (0 without labels)."""
        return len(self.class_names)

    def captions(self) -> list[str]:
        """The caption of every sample ("" where there is none), read without decoding any image."""
        return [self.describe(i)[1] or "" for i in range(len(self))]

    def load(self, index: int) -> dict:
        """Sample `index` or BadSample."""
        name, caption, label = self.describe(index)
        o = self.options
        if o.need_captions and not caption:
            raise BadSample(f"{name}: no caption")
        image = load_image(name, o.smallest, o.max_pixels, data=self.read(index))
        rng = np.random.default_rng([o.seed, index])
        return {
            "image": resize_crop(image, o.image_size, o.crop, o.flip, rng),
            "label": label,
            "caption": caption or "",
        }

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        """Sample `index`, or the next usable one; 'skipped' counts the unusable ones passed over."""
        for skipped in range(len(self.items)):
            try:
                return {**self.load((index + skipped) % len(self.items)), "skipped": skipped}
            except BadSample:
                continue
        raise ValueError(f"data.path: none of the {len(self.items)} samples is usable (run `mdm data check`)")


class FolderDataset(ImageDataset):
    """Images (and captions / labels) from a folder in one of the three layouts above."""

    def __init__(self, root: str | Path, options: ReadOptions) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.path: {self.root} is not a folder")
        self.options = options
        self.items, self.class_names = self._discover()
        if not self.items:
            raise ValueError(f"data.path: no images found in {self.root} (looked for {sorted(IMAGE_SUFFIXES)})")

    def _discover(self) -> tuple[list[tuple[Path, str | None, int]], list[str]]:
        """(path, caption or None, label) per sample, and the class names (empty without classes)."""
        meta = self.root / "metadata.jsonl"
        if meta.is_file():
            rows = []
            for n, line in enumerate(meta.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows.append((row["file_name"], row.get("text"), row.get("label")))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(
                        f"{meta}:{n}: expected a JSON object with 'file_name' (and 'text'/'label')"
                    ) from None
            names = sorted({str(label) for _, _, label in rows if isinstance(label, str)})
            items = []
            for file, text, label in rows:
                index = names.index(label) if isinstance(label, str) else (-1 if label is None else int(label))
                items.append((self.root / file, text, index))
            return items, names
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        classed = subdirs and all(p.parent != self.root for p in images)
        items = []
        for path in images:
            side = path.with_suffix(".txt")
            caption = side.read_text().strip() if side.is_file() else None
            if classed:
                name = path.relative_to(self.root).parts[0]
                items.append((path, caption if caption is not None else name, subdirs.index(name)))
            else:
                items.append((path, caption, -1))
        return items, subdirs if classed else []

    @property
    def layout(self) -> str:
        """Which of the three folder layouts was found."""
        if (self.root / "metadata.jsonl").is_file():
            return "metadata.jsonl"
        if self.class_names:
            return f"class folders ({self.num_classes} classes)"
        return "flat folder with sidecar captions"

    def describe(self, index: int) -> tuple[str, str | None, int]:
        """(image path, caption or None, label or -1) of sample `index`."""
        path, caption, label = self.items[index]
        return str(path), caption, label
