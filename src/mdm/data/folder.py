"""Image folders: class subfolders, a `metadata.jsonl`, or flat images with sidecar `.txt` captions.

Layouts, checked in this order:
- `metadata.jsonl`: one JSON object per line with `file_name` (relative to the folder), `text` and an
  optional `label`: class names, or integers 0..K-1 (K is the largest + 1, or the number of lines of a
  `classes.txt` beside it, line i naming label i); every line has a label or none does;
- class subfolders: `root/<class name>/<image>`; the caption is a sidecar `.txt` if present, else the class;
- flat: every image below `root`, captioned by its sidecar `.txt`.

Names starting with '.' (`.ipynb_checkpoints`, `._x.png`) are skipped and folders without images are no class.
Nothing outside the folder is read: a symlinked folder is followed when its target is inside (else the folder
is refused), and a file whose real path leaves the folder (a symlink, `../` or an absolute `file_name`) is an
unusable sample. Text files are UTF-8 (a byte-order mark is allowed).

Images are read with EXIF orientation applied, converted to RGB (grayscale, palette, RGBA over white, 16/32-bit
integer and float), resized so the shorter side is `image_size`, then centre- or randomly cropped and optionally
flipped; the random choices come from a generator seeded by (seed, index). A sample that cannot be used
(unreadable, truncated, empty, too small, a decompression bomb, outside the folder, an unreadable caption, no
caption where one is needed) is replaced by the next usable one, and the item says how many it skipped so the
trainer can count and report them.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """Data that cannot be read as a dataset (the message names the file, and line, and why)."""


class BadSample(DataError):
    """A file that cannot become a training image (the message says why)."""


def require_int(value: object, name: str, low: int) -> int:
    """`value` when it is an integer >= `low` (a bool is not); else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text (a leading byte-order mark dropped); DataError naming `name` and the line otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_class_names(text: str, name: str) -> list[str]:
    """The class names in the text of a `classes.txt` (line i names label i); DataError for empty or repeated ones."""
    names = [line.strip() for line in text.splitlines()]
    for i, class_name in enumerate(names):
        if not class_name:
            raise DataError(f"{name}:{i + 1}: empty line; expected one class name per line")
        if class_name in names[:i]:
            raise DataError(f"{name}:{i + 1}: class {class_name!r} is also on line {names.index(class_name) + 1}")
    return names


def _gray_8bit(image: Image.Image) -> Image.Image:
    """8-bit grayscale from a 16/32-bit integer or float image.

    Floats in [0, 1] and integers in 0..255 (mode I) or 0..65535 keep their meaning; other values are scaled by
    the image's range (from min(its minimum, 0) to its maximum).
    """
    arr = np.asarray(image, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"a mode {image.mode} image with NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if image.mode == "F":
        top = 1.0
    elif lo >= 0 and hi <= 255 and not image.mode.startswith("I;16"):
        top = 255.0
    else:
        top = 65535.0 if lo >= 0 and hi <= 65535 else 1.0
    lo, hi = min(lo, 0.0), max(hi, top)
    return Image.fromarray(((arr - lo) / (hi - lo) * 255.0).round().astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: integer and float grayscale is mapped to 8 bits, alpha is composited over white."""
    if image.mode == "F" or image.mode.startswith("I"):
        image = _gray_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


# What PIL's decoders raise for corrupt or hostile files (besides OSError), so that a bad file is a bad sample.
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


@contextmanager
def open_image(name: str, data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image in `data`, header read and size checked; what PIL raises (here or in the body) becomes BadSample."""
    if not data:
        raise BadSample(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    raise BadSample(f"{name}: {im.width}x{im.height} exceeds data.max_pixels = {max_pixels}")
                yield im
    except BadSample:
        raise
    except UnidentifiedImageError:
        raise BadSample(f"{name}: not a readable image (not in any format PIL knows)") from None
    except DECODE_ERRORS as e:
        raise BadSample(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def load_image(name: str, min_size: int, max_pixels: int, data: bytes) -> Image.Image:
    """Decode, orient and convert the image bytes `data` of the file or archive member `name`; BadSample if unusable."""
    with open_image(name, data, max_pixels) as im:
        im.load()
        image = to_rgb(ImageOps.exif_transpose(im))
    if min(image.size) < min_size:
        raise BadSample(f"{name}: {image.width}x{image.height} is smaller than data.min_size = {min_size}")
    return image


def verify_image(name: str, data: bytes, max_pixels: int) -> str:
    """PIL's format name of the image in `data`, checked cheaply (header, and checksums where the format has them)."""
    with open_image(name, data, max_pixels) as im:
        im.verify()
        return im.format or ""


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
        require_int(self.image_size, "image_size", 1)
        require_int(self.min_size, "data.min_size", 0)
        require_int(self.max_pixels, "data.max_pixels", 1)

    @property
    def smallest(self) -> int:
        """Shorter sides below this are unusable (min_size, else the training size)."""
        return self.min_size or self.image_size


class ImageDataset(Dataset):
    """Shared reading: decode, check, resize and crop; `__getitem__` passes over unusable samples.

    Each storage layout says what sample `index` is (`describe`, BadSample when its caption cannot be read) and
    gives its bytes (`read`, BadSample when the image or label is unusable), and names itself in `layout`.
    """

    options: ReadOptions
    items: list
    class_names: list[str]
    layout: str

    def describe(self, index: int) -> tuple[str, str | None, int]:
        """(name, caption or None, label or -1) of sample `index`; the name is a file or an archive member."""
        raise NotImplementedError

    def read(self, index: int) -> bytes:
        """The image bytes of sample `index`, or BadSample."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes (0 without labels)."""
        return len(self.class_names)

    def captions(self) -> list[str]:
        """The caption of every sample ("" where there is none or it is unreadable), without decoding any image."""
        out = []
        for i in range(len(self)):
            try:
                out.append(self.describe(i)[1] or "")
            except BadSample:
                out.append("")
        return out

    def load(self, index: int) -> dict:
        """Sample `index` or BadSample."""
        name, caption, label = self.describe(index)
        o = self.options
        if o.need_captions and not caption:
            raise BadSample(f"{name}: no caption")
        image = load_image(name, o.smallest, o.max_pixels, self.read(index))
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
        raise DataError(f"data.path: none of the {len(self.items)} samples is usable (run `mdm data check`)")


def image_files(root: Path, suffixes: set[str] | frozenset[str] = frozenset(IMAGE_SUFFIXES)) -> list[Path]:
    """Every image file (name ending in one of `suffixes`) below `root`, sorted, skipping names that start with '.'.

    A symlinked folder is followed when its real path is inside `root` (once per branch, so links cannot loop)
    and refused with DataError otherwise; symlinked files are listed, and checked when read.
    """
    real_root = Path(os.path.realpath(root))
    found: list[Path] = []

    def visit(folder: Path, real: Path, above: frozenset[Path]) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as e:
            raise DataError(f"{folder}: cannot list the folder ({e.strerror})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            if entry.is_dir():
                target = Path(os.path.realpath(path)) if entry.is_symlink() else real / entry.name
                if not target.is_relative_to(real_root):
                    raise DataError(
                        f"{path}: a symlink to the folder {target}, outside the data folder {root}; "
                        "move or copy it inside, or name it as the data path"
                    )
                if target not in above:
                    visit(path, target, above | {target})
            elif Path(entry.name).suffix.lower() in suffixes:
                found.append(path)

    visit(root, real_root, frozenset({real_root}))
    return sorted(found)


class _Item(NamedTuple):
    """One sample of a folder: its image file, caption, label, and why its caption cannot be read."""

    path: Path
    caption: str | None
    label: int
    problem: str = ""


class FolderDataset(ImageDataset):
    """Images (and captions / labels) from a folder in one of the three layouts above."""

    what, looked_for = "images", str(sorted(IMAGE_SUFFIXES))  # what `files` lists, for the error of an empty folder

    def __init__(self, root: str | Path, options: ReadOptions) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.path: {self.root} is not a folder")
        self.real_root = Path(os.path.realpath(self.root))
        self.options = options
        meta = self.root / "metadata.jsonl"
        if os.path.lexists(meta):
            self.items, self.class_names = self._metadata(meta)
            self.layout = "metadata.jsonl"
        else:
            self.items, self.class_names = self._walk()
            self.layout = (
                f"class folders ({self.num_classes} classes)"
                if self.class_names
                else "flat folder with sidecar captions"
            )
        if not self.items:
            raise DataError(f"data.path: no {self.what} found in {self.root} (looked for {self.looked_for})")

    def files(self) -> list[Path]:
        """The samples below the root of a folder without a metadata.jsonl, sorted."""
        return image_files(self.root)

    def checked(self, path: Path) -> Path:
        """The real path of `path` (a file or folder); BadSample when it is missing or outside the folder."""
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.real_root):
            raise BadSample(f"{path}: outside the data folder {self.root} (it resolves to {real}); not read")
        if not os.path.exists(real):
            raise BadSample(f"{path}: listed but missing")
        return real

    def _bytes(self, path: Path) -> bytes:
        """The contents of the regular file `path`; BadSample when it is missing, unreadable or outside the folder."""
        real = self.checked(path)
        if not os.path.isfile(real):
            raise BadSample(f"{path}: not a regular file")
        try:
            return real.read_bytes()
        except OSError as e:
            raise BadSample(f"{path}: cannot be read ({e.strerror})") from None

    def _text(self, path: Path) -> str:
        """A text file of the folder (metadata.jsonl, classes.txt); DataError naming it when it cannot be read."""
        return decode_text(self._bytes(path), str(path))

    def _sidecar(self, image: Path) -> tuple[str | None, str]:
        """The caption in the `.txt` beside `image` (None without one), and why it cannot be read ('' if it can)."""
        side = image.with_suffix(".txt")
        if not os.path.lexists(side):
            return None, ""
        try:
            return self._text(side).strip(), ""
        except DataError as e:
            return None, str(e)

    def _walk(self) -> tuple[list[_Item], list[str]]:
        """Class folders (when no image lies directly in the root) or a flat folder."""
        images = self.files()
        tops = [path.relative_to(self.root).parts for path in images]
        classed = bool(images) and all(len(parts) > 1 for parts in tops)
        names = sorted({parts[0] for parts in tops}) if classed else []
        index = {name: i for i, name in enumerate(names)}
        items = []
        for path, parts in zip(images, tops, strict=True):
            caption, problem = self._sidecar(path)
            if classed:
                items.append(_Item(path, parts[0] if caption is None else caption, index[parts[0]], problem))
            else:
                items.append(_Item(path, caption, -1, problem))
        return items, names

    def _metadata(self, meta: Path) -> tuple[list[_Item], list[str]]:
        """Samples and class names of a metadata.jsonl; DataError naming the line of any malformed row or label."""
        rows: list[tuple[int, str, str | None, str | int | None]] = []
        for n, line in enumerate(self._text(meta).splitlines(), 1):
            if line.strip():
                rows.append((n, *_row(line, f"{meta}:{n}")))
        labelled = [(n, label) for n, _, _, label in rows if label is not None]
        if not labelled:
            return [_Item(self.root / file, text, -1) for _, file, text, _ in rows], []
        first_line, first = labelled[0]
        for n, label in labelled:
            if isinstance(label, str) != isinstance(first, str):
                raise DataError(
                    f"{meta}:{n}: label {label!r} but line {first_line} has the label {first!r}; "
                    "use class names or integers, not both"
                )
        unlabelled = next((n for n, _, _, label in rows if label is None), None)
        if unlabelled is not None:
            raise DataError(f"{meta}:{unlabelled}: no 'label' but line {first_line} has one; label every line or none")
        listing = self.root / "classes.txt"
        listed = parse_class_names(self._text(listing), str(listing)) if os.path.lexists(listing) else None
        if isinstance(first, str):
            names = listed or sorted({label for _, label in labelled})
        else:
            names = listed or [str(i) for i in range(max(label for _, label in labelled) + 1)]
        index = {name: i for i, name in enumerate(names)}
        items = []
        for n, file, text, label in rows:
            i = index.get(label) if isinstance(label, str) else label
            if i is None or i >= len(names):
                raise DataError(f"{meta}:{n}: label {label!r} is not one of the {len(names)} classes of {listing}")
            items.append(_Item(self.root / file, text, i))
        return items, names

    def describe(self, index: int) -> tuple[str, str | None, int]:
        """(image path, caption or None, label or -1) of sample `index`; BadSample when its caption is unreadable."""
        item = self.items[index]
        if item.problem:
            raise BadSample(item.problem)
        return str(item.path), item.caption, item.label

    def read(self, index: int) -> bytes:
        """The bytes of sample `index`'s image file; BadSample when it is missing, unreadable or outside the folder."""
        return self._bytes(self.items[index].path)


def json_object(text: str, where: str, shape: str = "expected a JSON object") -> dict:
    """The JSON object in `text`; DataError naming `where` and the expected `shape` for anything else."""
    try:
        row = json.loads(text)
    except ValueError as e:
        raise DataError(f"{where}: invalid JSON ({e}); {shape}") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: {shape}, got {type(row).__name__} {row!r:.60}")
    return row


def _row(line: str, where: str) -> tuple[str, str | None, str | int | None]:
    """(file_name, text or None, label or None) of one metadata.jsonl line; DataError naming `where` otherwise."""
    shape = "expected a JSON object with 'file_name' (and 'text'/'label')"
    row = json_object(line, where, shape)
    if "file_name" not in row:
        raise DataError(f"{where}: {shape}, got no 'file_name'")
    file, text, label = row["file_name"], row.get("text"), row.get("label")
    if not isinstance(file, str) or not file or "\0" in file:
        raise DataError(f"{where}: 'file_name' must be a path relative to the folder, got {file!r}")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {text!r:.60}")
    named = isinstance(label, str) and label.strip()
    numbered = isinstance(label, int) and not isinstance(label, bool) and label >= 0
    if label is not None and not (named or numbered):
        raise DataError(f"{where}: 'label' must be a class name or an integer >= 0, got {label!r:.60}")
    return file, text, label
