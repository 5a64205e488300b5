"""Built-in procedural dataset: one coloured shape on a shaded neutral background, with a caption.

Each image is rendered from signed distance functions with anti-aliasing (sub-pixel coverage clamp(0.5 -
distance, 0, 1), box-averaged over a few sub-pixels), so the same scene rendered at half the size is close
to the average-pooled full-size render and the levels of a training pyramid agree. Everything about image `i`
(class, geometry, colours) is drawn from a generator seeded by (seed, i): any resolution, any index, any
process gives the same scene.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.data import Dataset

SDF = Callable[[np.ndarray, np.ndarray, float], np.ndarray]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 70),
    "blue": (45, 85, 230),
    "yellow": (235, 200, 35),
    "purple": (140, 60, 200),
    "orange": (245, 130, 30),
    "cyan": (40, 200, 215),
    "magenta": (225, 50, 170),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18),
    "dark gray": (70, 70, 72),
    "gray": (128, 128, 128),
    "light gray": (190, 190, 188),
    "white": (240, 240, 238),
    "beige": (215, 200, 170),
}
SIZES = ("small", "medium", "large")
RADIUS = (0.2, 0.42)  # shape radius range as a fraction of the side; thirds of it are the named sizes
EXTENT = 1.25  # every shape, rotated, lies within this many radii of its centre (the triangle reaches 1.21)


def _box(x: np.ndarray, y: np.ndarray, hx: float, hy: float) -> np.ndarray:
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _circle(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    return np.hypot(x, y) - r


def _square(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    return _box(x, y, 0.82 * r, 0.82 * r)


def _triangle(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Equilateral triangle pointing up, centroid at the origin, half side `h` (exact Euclidean distance)."""
    h = 1.05 * r
    k = math.sqrt(3.0)
    px, py = np.abs(x) - h, -y + h / k
    fold = px + k * py > 0
    px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
    px = px - np.clip(px, -2 * h, 0)
    return np.where(py < 0, 1.0, -1.0) * np.hypot(px, py)


def _cross(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    return np.minimum(_box(x, y, r, 0.32 * r), _box(x, y, 0.32 * r, r))


def _ring(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    return np.abs(np.hypot(x, y) - 0.74 * r) - 0.26 * r


SHAPES: dict[str, SDF] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
}


def supersampling(size: int) -> int:
    """Sub-pixels per side: corners and tips need them at small sizes, large images need few."""
    return 4 if size <= 128 else 2 if size <= 512 else 1


@dataclass(frozen=True)
class Scene:
    """Everything that defines one image, independent of resolution (coordinates in units of the side)."""

    label: int
    shape: str
    color: str
    background: str
    cx: float
    cy: float
    radius: float
    angle: float
    rgb: tuple[float, float, float]
    bg_rgb: tuple[float, float, float]
    gradient: tuple[float, float]

    @property
    def size(self) -> str:
        """small / medium / large, by the radius terciles."""
        return SIZES[min(2, int(3 * (self.radius - RADIUS[0]) / (RADIUS[1] - RADIUS[0])))]

    @property
    def position(self) -> str:
        """Where the shape sits on a 3 x 3 grid: 'top left' ... 'center'."""
        row = ("top", "middle", "bottom")[min(2, int(self.cy * 3))]
        col = ("left", "center", "right")[min(2, int(self.cx * 3))]
        if row == "middle":
            return "center" if col == "center" else col
        return row if col == "center" else f"{row} {col}"

    @property
    def caption(self) -> str:
        """Names the shape, colour, size, position and background."""
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"


def _span(centre: float, reach: float, size: int) -> tuple[int, int]:
    """The pixels [lo, hi) of a side of `size` within `reach` of `centre` (both in units of the side)."""
    return max(0, math.floor((centre - reach) * size)), min(size, math.ceil((centre + reach) * size))


def render_frames(scene: Scene, size: int, cx: ArrayLike, cy: ArrayLike, radius: ArrayLike) -> torch.Tensor:
    """The scene with its shape at centres (cx, cy) and radii `radius` (one per frame, (T,) each), as a float
    tensor (3, T, size, size) in [-1, 1]: the one renderer of still and moving shapes.

    Only the pixels within EXTENT radii (plus a sub-pixel) of a frame's centre can be covered, so each frame's
    shape is drawn in that box; the other pixels are the pooled background, exactly what the blend gives them."""
    ss = supersampling(size)
    fine = size * ss
    coords = (np.arange(fine, dtype=np.float64) + 0.5) / fine
    y, x = np.meshgrid(coords, coords, indexing="ij")
    theta, amount = scene.gradient
    shade = amount * ((x - 0.5) * math.cos(theta) + (y - 0.5) * math.sin(theta))
    background = np.clip(np.asarray(scene.bg_rgb)[:, None, None] + shade, 0, 255)
    pooled = background.reshape(3, size, ss, size, ss).mean(axis=(2, 4))
    frames = list(zip(*(np.asarray(v, np.float64) for v in (cx, cy, radius)), strict=True))
    out = np.repeat(pooled[:, None], len(frames), axis=1)
    rgb = np.asarray(scene.rgb)[:, None, None]
    c, sn = math.cos(scene.angle), math.sin(scene.angle)
    for t, (fx, fy, r) in enumerate(frames):
        reach = EXTENT * r + 1 / fine
        (y0, y1), (x0, x1) = _span(fy, reach, size), _span(fx, reach, size)
        if y0 >= y1 or x0 >= x1:
            continue
        rows, cols = slice(y0 * ss, y1 * ss), slice(x0 * ss, x1 * ss)
        dx, dy = x[rows, cols] - fx, y[rows, cols] - fy
        distance = SHAPES[scene.shape](c * dx + sn * dy, -sn * dx + c * dy, float(r))
        coverage = np.clip(0.5 - distance * fine, 0.0, 1.0)
        under = background[:, rows, cols]
        image = under + coverage * (rgb - under)
        out[:, t, y0:y1, x0:x1] = image.reshape(3, y1 - y0, ss, x1 - x0, ss).mean(axis=(2, 4))
    return torch.from_numpy(out / 127.5 - 1.0).float()


def scene_style(rng: np.random.Generator, color: str) -> tuple[float, str, tuple, tuple, tuple[float, float]]:
    """(angle, background name, shape rgb, background rgb, background gradient) drawn from `rng`: how a scene
    looks apart from its shape, colour name and geometry."""
    angle = float(rng.uniform(-0.35, 0.35))
    bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    jitter = rng.uniform(-18, 18, size=3)
    rgb = tuple(float(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], jitter, strict=True))
    bg_rgb = tuple(float(v) + float(rng.uniform(-8, 8)) for v in BACKGROUNDS[bg])
    theta, amount = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 30))
    return angle, bg, rgb, bg_rgb, (theta, amount)


class ShapeVocabulary(Dataset):
    """What the built-in datasets share: the shape x colour classes (shape-major), `num_samples` items drawn per
    (seed, index), and captions and prompts read from `scene(index)` (anything with `label` and `caption`)."""

    name = "shapes"
    items = "images"  # what one item is, for messages

    def __init__(self, num_samples: int, shapes: list[str] | None, colors: list[str] | None, seed: int) -> None:
        self.shapes = list(shapes or ["circle", "square", "triangle", "cross"])
        self.colors = list(colors or ["red", "green", "blue"])
        for names, vocab, what in ((self.shapes, SHAPES, "shape"), (self.colors, COLORS, "colour")):
            check_names(names, vocab, f"{self.name} dataset: {what}s")
        if num_samples < 1:
            raise ValueError(f"{self.name} dataset: need num_samples >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed

    def scene(self, index: int) -> Scene:
        """What item `index` shows, drawn from a generator seeded by (seed, index)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """len(shapes) x len(colors)."""
        return len(self.shapes) * len(self.colors)

    @property
    def class_names(self) -> list[str]:
        """'red circle', 'green circle', ... in label order."""
        return [f"{c} {s}" for s in self.shapes for c in self.colors]

    def __len__(self) -> int:
        return self.num_samples

    def check_index(self, index: int) -> None:
        """IndexError unless 0 <= index < num_samples."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.name} dataset has {self.num_samples} {self.items}, got index {index}")

    def captions(self) -> list[str]:
        """The caption of every item, without rendering any."""
        return [self.scene(i).caption for i in range(self.num_samples)]

    def prompts(self, per_class: int = 1) -> list[str]:
        """Captions of the first `per_class` scenes of every class, in label order (demo and sample prompts)."""
        return self.first_captions(lambda scene: scene.label, self.num_classes, per_class)

    def first_captions(self, group: Callable[[Scene], int], groups: int, per_group: int) -> list[str]:
        """Captions of the first `per_group` scenes of each of `groups` groups (`group(scene)` in [0, groups)),
        in group order."""
        found: dict[int, list[str]] = {g: [] for g in range(groups)}
        index = 0
        while any(len(v) < per_group for v in found.values()):
            scene = self.scene(index)
            if len(found[group(scene)]) < per_group:
                found[group(scene)].append(scene.caption)
            index += 1
        return [caption for g in range(groups) for caption in found[g]]


def check_names(names: list[str], vocab: dict | tuple, what: str) -> None:
    """ValueError naming `what` unless `names` are distinct, non-empty and all in `vocab`."""
    unknown = [n for n in names if n not in vocab]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"{what} must be distinct names from {sorted(vocab)}, got {names}")


class ShapesDataset(ShapeVocabulary):
    """`num_samples` procedural images at `image_size`; class = shape x colour (shape-major)."""

    def __init__(
        self,
        image_size: int,
        num_samples: int = 100_000,
        shapes: list[str] | None = None,
        colors: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, shapes, colors, seed)
        if image_size < 4:
            raise ValueError(f"shapes dataset: need image_size >= 4, got {image_size}")
        self.image_size = image_size

    def scene(self, index: int) -> Scene:
        """The scene of image `index`, drawn from a generator seeded by (seed, index)."""
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(self.num_classes))
        shape, color = self.shapes[label // len(self.colors)], self.colors[label % len(self.colors)]
        radius = float(rng.uniform(*RADIUS))
        margin = min(radius * EXTENT, 0.5)
        cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
        angle, bg, rgb, bg_rgb, gradient = scene_style(rng, color)
        return Scene(label, shape, color, bg, cx, cy, radius, angle, rgb, bg_rgb, gradient)

    def render(self, index: int, size: int | None = None) -> torch.Tensor:
        """Image `index` as a float tensor (3, size, size) in [-1, 1]."""
        s = self.scene(index)
        return render_frames(s, size or self.image_size, [s.cx], [s.cy], [s.radius])[:, 0]

    def __getitem__(self, index: int) -> dict:
        self.check_index(index)
        scene = self.scene(index)
        return {"image": self.render(index), "label": scene.label, "caption": scene.caption}
