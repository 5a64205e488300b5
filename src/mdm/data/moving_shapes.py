"""Built-in video dataset: one coloured shape moving on a shaded neutral background, with a caption.

A clip is the shapes dataset's scene (same vocabulary, same anti-aliased renderer) whose shape travels left,
right, up or down, grows, shrinks or stands still. Frame t of a T-frame clip is the scene at clip time
u = t / T: the centre moves TRAVEL sides and the radius changes by GROWTH over u in [0, 1), so 8 frames travel
44 % of the side (4 frames 38 %) and grow or shrink about 2.2x (4 frames 2x), and the shape stays inside the
frame. Because the motion is a function of t / T, keeping every k-th frame of a T-frame clip gives exactly the
T / k-frame clip (the `first` frame sub-sampling of a video pyramid), and one frame is the clip's first frame.
Everything about clip `i` is drawn from a generator seeded by (seed, i), whatever the size and frame count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mdm.data.shapes import EXTENT, Scene, ShapeVocabulary, check_names, render_frames, scene_style

MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "still")
PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "grow": "growing",
    "shrink": "shrinking",
    "still": "standing still",
}
TRAVEL = 0.5  # centre displacement over clip time [0, 1), in sides
GROWTH = 2.5  # radius factor over clip time [0, 1)
MOVING_RADIUS = (0.15, 0.2)  # translations: EXTENT * 0.2 on both sides plus TRAVEL fit in the frame
LARGE_RADIUS = (0.28, 0.38)  # the large end of growing / shrinking shapes
STILL_RADIUS = (0.15, 0.3)
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y points down


@dataclass(frozen=True)
class Clip:
    """One clip: the scene at its first frame and how the shape moves (`motion`, index `motion_label`)."""

    scene: Scene
    motion: str
    motion_label: int

    @property
    def label(self) -> int:
        """The class: shape x colour, as in the shapes dataset."""
        return self.scene.label

    @property
    def caption(self) -> str:
        """Names the colour, shape, motion and background: 'a red circle moving left on a gray background'."""
        s = self.scene
        return f"a {s.color} {s.shape} {PHRASES[self.motion]} on a {s.background} background"

    def trajectory(self, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centres cx, cy and radii (num_frames,) of frames t = 0 .. T - 1, at clip time t / T."""
        u = np.arange(num_frames, dtype=np.float64) / num_frames
        s = self.scene
        dx, dy = DIRECTIONS.get(self.motion, (0, 0))
        rate = {"grow": GROWTH, "shrink": 1 / GROWTH}.get(self.motion, 1.0)
        return s.cx + TRAVEL * dx * u, s.cy + TRAVEL * dy * u, s.radius * rate**u


class MovingShapesDataset(ShapeVocabulary):
    """`num_samples` procedural clips of `num_frames` x `image_size`^2; class = shape x colour (shape-major, as
    the shapes dataset), motion = index into `motions`."""

    name = "moving_shapes"
    items = "clips"

    def __init__(
        self,
        image_size: int,
        num_frames: int,
        num_samples: int = 100_000,
        shapes: list[str] | None = None,
        colors: list[str] | None = None,
        motions: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, shapes, colors, seed)
        self.motions = list(motions or MOTIONS)
        check_names(self.motions, MOTIONS, "moving_shapes dataset: motions")
        if image_size < 4 or num_frames < 1:
            raise ValueError(
                f"moving_shapes dataset: need image_size >= 4 and num_frames >= 1, got {image_size}, {num_frames}"
            )
        self.image_size = image_size
        self.num_frames = num_frames

    @property
    def motion_names(self) -> list[str]:
        """The motions in motion-label order."""
        return list(self.motions)

    def motion_prompts(self, per_motion: int = 1) -> list[str]:
        """Captions of the first `per_motion` clips of every motion, in motion-label order."""
        return self.first_captions(lambda clip: clip.motion_label, len(self.motions), per_motion)

    def scene(self, index: int) -> Clip:
        """Clip `index`, drawn from a generator seeded by (seed, index)."""
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(self.num_classes))
        motion_label = int(rng.integers(len(self.motions)))
        motion = self.motions[motion_label]
        shape, color = self.shapes[label // len(self.colors)], self.colors[label % len(self.colors)]
        if motion in DIRECTIONS:
            radius = float(rng.uniform(*MOVING_RADIUS))
            largest = radius
        elif motion == "still":
            radius = float(rng.uniform(*STILL_RADIUS))
            largest = radius
        else:
            largest = float(rng.uniform(*LARGE_RADIUS))
            radius = largest / GROWTH if motion == "grow" else largest
        margin, (dx, dy) = EXTENT * largest, DIRECTIONS.get(motion, (0, 0))
        # The first centre leaves TRAVEL sides of room ahead of a moving shape.
        low = [margin + TRAVEL * max(-d, 0) for d in (dx, dy)]
        high = [1 - margin - TRAVEL * max(d, 0) for d in (dx, dy)]
        cx, cy = (float(v) for v in rng.uniform(low, high))
        angle, bg, rgb, bg_rgb, gradient = scene_style(rng, color)
        return Clip(Scene(label, shape, color, bg, cx, cy, radius, angle, rgb, bg_rgb, gradient), motion, motion_label)

    def render(self, index: int, size: int | None = None, num_frames: int | None = None) -> torch.Tensor:
        """Clip `index` as a float tensor (3, T, size, size) in [-1, 1]."""
        clip = self.scene(index)
        return render_frames(clip.scene, size or self.image_size, *clip.trajectory(num_frames or self.num_frames))

    def __getitem__(self, index: int) -> dict:
        self.check_index(index)
        clip = self.scene(index)
        return {"video": self.render(index), "label": clip.label, "motion": clip.motion_label, "caption": clip.caption}
