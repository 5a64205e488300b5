"""An oracle for the built-in moving shapes: two small CNNs (the shapes oracle's) trained together on rendered
clips, one over single frames for the class (shape x colour), one over the frames stacked as channels for the
motion.

Why this design: stacking the T frames as 3T input channels lets the first convolution see how each pixel
changes over time, so travel, growth, shrinking and standing still become local features that survive global
pooling; it learns the motion within a few hundred steps. The shape, though, sits at a different place in every
frame, so the stacked channels hold no single shape template: alone, that network stayed at 57-80 % on the class
after 600-900 steps at 8 x 16^2. A per-frame network, trained on frames picked at random from the clips and
averaged over all frames when judging, classifies like the shapes oracle. Both reuse the shapes oracle's network,
training loop, cache and evaluator (`mdm.eval.oracle`), and judge generated clips by what they show rather than
through a hand-made shape tracker that imperfect samples would break. Generated clips are scored by the accuracy
of their requested class and motion and by the Fréchet distance in the oracle's pooled features, next to the
real-versus-real floor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mdm.data.moving_shapes import MovingShapesDataset
from mdm.eval.oracle import (
    BATCH_SIZE,
    CHECK_SEED,
    IMAGES_PER_CLASS,
    REAL_SEED,
    TRAIN_SEED,
    Classifier,
    LabelBreakdown,
    OracleEvaluator,
    SavedModel,
    cached,
    conv_body,
    fit,
    spec_key,
)

FORMAT = "mdm-motion-oracle/1"
FRAMES_PER_CLIP = 2  # frames of each training clip the class network sees


@dataclass(frozen=True)
class MotionOracleSpec:
    """Everything that defines a motion oracle: clip shape, vocabularies, training length and seed, width."""

    size: int
    num_frames: int
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    motions: tuple[str, ...]
    steps: int
    seed: int = 0
    width: int = 16
    batch_size: int = BATCH_SIZE

    def dataset(self, seed: int, num: int) -> MovingShapesDataset:
        """`num` clips of this vocabulary and shape, drawn with dataset seed `seed` (checks the names)."""
        return MovingShapesDataset(
            self.size, self.num_frames, num, list(self.shapes), list(self.colors), list(self.motions), seed
        )

    @property
    def num_classes(self) -> int:
        """len(shapes) x len(colors), the dataset's class labels."""
        return len(self.shapes) * len(self.colors)

    def key(self) -> str:
        """A file name unique to these settings: frames and size, then a hash of the rest."""
        return spec_key(f"motion-oracle-{self.num_frames}x{self.size}px", self)


class MotionOracle(SavedModel):
    """The shapes oracle's conv body over single frames (class: features averaged over the frames, linear head) and
    over the 3T stacked frames (motion: linear head); the features are both pooled vectors side by side."""

    FORMAT = FORMAT

    def __init__(self, spec: MotionOracleSpec) -> None:
        super().__init__()
        self.spec = spec
        self.accuracy: dict[str, float] | None = None
        self.frame_body, frame_width = conv_body(3, spec.size, spec.width)
        self.clip_body, clip_width = conv_body(3 * spec.num_frames, spec.size, spec.width)
        self.class_head = nn.Linear(frame_width, spec.num_classes)
        self.motion_head = nn.Linear(clip_width, len(spec.motions))

    @classmethod
    def from_spec(cls, fields: dict) -> MotionOracle:
        """The network of a saved spec."""
        lists = {k: tuple(fields[k]) for k in ("shapes", "colors", "motions")}
        return cls(MotionOracleSpec(**{**fields, **lists}))

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.class_head.weight.device

    def _check(self, videos: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, S, S) clips in [-1, 1] at the oracle's shape, on its device."""
        t, s = self.spec.num_frames, self.spec.size
        if videos.dim() != 5 or tuple(videos.shape[1:]) != (3, t, s, s):
            raise ValueError(
                f"the motion oracle takes (N, 3, {t}, {s}, {s}) clips in [-1, 1], got shape {tuple(videos.shape)}"
            )
        return videos.to(self.device, torch.float32)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Pooled features (M, D) of single frames (M, 3, S, S): what the class is read from."""
        return self.frame_body(frames).mean(dim=(2, 3))

    def clip_features(self, videos: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, D) of checked clips, their frames stacked as channels: what the motion is read from."""
        return self.clip_body(videos.flatten(1, 2)).mean(dim=(2, 3))

    def _pooled(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class features: frame features averaged over the frames, motion features) of checked clips."""
        n, _, t, s, _ = videos.shape
        frames = self.frame_features(videos.transpose(1, 2).reshape(n * t, 3, s, s)).view(n, t, -1).mean(1)
        return frames, self.clip_features(videos)

    def forward(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (N, classes) and motion logits (N, motions)."""
        frames, clips = self._pooled(self._check(videos))
        return self.class_head(frames), self.motion_head(clips)

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """Both pooled feature vectors side by side (N, D): the space of the oracle Fréchet distance."""
        return torch.cat(self._pooled(self._check(videos)), dim=1)

    @torch.no_grad()
    def predict(self, videos: torch.Tensor) -> torch.Tensor:
        """Predicted (class, motion) labels (N, 2)."""
        classes, motions = self(videos)
        return torch.stack([classes.argmax(1), motions.argmax(1)], dim=1)

    def loss(self, videos: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training loss: class cross entropy on FRAMES_PER_CLIP random frames of each clip, plus motion cross
        entropy on the clips."""
        videos, labels = self._check(videos), labels.to(self.device)
        n, t = videos.shape[0], videos.shape[2]
        picked = torch.randint(t, (n, min(t, FRAMES_PER_CLIP)), generator=generator).to(self.device)
        frames = videos.transpose(1, 2)[torch.arange(n, device=self.device)[:, None], picked].flatten(0, 1)
        classes = self.class_head(self.frame_features(frames))
        class_loss = F.cross_entropy(classes, labels[:, 0].repeat_interleave(picked.shape[1]))
        return class_loss + F.cross_entropy(self.motion_head(self.clip_features(videos)), labels[:, 1])


def render_clips(dataset: MovingShapesDataset, indices: range | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (N, 3, T, S, S) and (class, motion) labels (N, 2) of the dataset's clips `indices`."""
    videos = torch.stack([dataset.render(i) for i in indices])
    labels = torch.tensor([(c.label, c.motion_label) for c in map(dataset.scene, indices)], dtype=torch.long)
    return videos, labels


@torch.no_grad()
def motion_accuracy(
    oracle: MotionOracle, videos: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Fraction of `videos` whose class and whose motion the oracle gets right: {'class': ..., 'motion': ...}."""
    hits = sum(
        (oracle.predict(videos[i : i + batch_size]).cpu() == labels[i : i + batch_size]).sum(0)
        for i in range(0, len(videos), batch_size)
    )
    return {"class": int(hits[0]) / len(videos), "motion": int(hits[1]) / len(videos)}


def motion_oracle_spec(
    size: int,
    num_frames: int,
    shapes: list[str] | None = None,
    colors: list[str] | None = None,
    motions: list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
) -> MotionOracleSpec:
    """Checked settings: the dataset's vocabularies by default, and by default steps for about IMAGES_PER_CLASS
    (the shapes oracle's) training clips per class or per motion, whichever has more labels."""
    probe = MovingShapesDataset(size, num_frames, 1, shapes, colors, motions)
    if steps is None:
        steps = math.ceil(IMAGES_PER_CLASS * max(probe.num_classes, len(probe.motions)) / BATCH_SIZE)
    if steps < 1:
        raise ValueError(f"motion oracle training needs steps >= 1, got {steps}")
    return MotionOracleSpec(
        size, num_frames, tuple(probe.shapes), tuple(probe.colors), tuple(probe.motions), steps, seed
    )


def train_motion_oracle(
    spec: MotionOracleSpec, progress: bool = True, device: str | torch.device = "cpu", check_samples: int = 2000
) -> MotionOracle:
    """Train the motion oracle of `spec` (from `motion_oracle_spec`) on freshly rendered clips (the shapes oracle's
    schedule, `MotionOracle.loss`), then measure both accuracies on `check_samples` held-out clips
    (`MotionOracle.accuracy`)."""
    torch.manual_seed(spec.seed)
    oracle = MotionOracle(spec).to(device)
    clips = spec.dataset(TRAIN_SEED + spec.seed, spec.steps * spec.batch_size)
    generator = torch.Generator().manual_seed(spec.seed)
    b = spec.batch_size
    fit(oracle, spec.steps, lambda k: oracle.loss(*render_clips(clips, range(k * b, (k + 1) * b)), generator), progress)
    held_out = spec.dataset(CHECK_SEED, check_samples)
    oracle.accuracy = motion_accuracy(oracle, *render_clips(held_out, range(check_samples)))
    return oracle


def load_or_train_motion_oracle(
    spec: MotionOracleSpec,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> MotionOracle:
    """The cached motion oracle of `spec` (in the shapes oracle's cache), trained and saved first if absent."""
    return cached(
        spec.key(),
        cache_dir,
        lambda path: MotionOracle.load(path, device),
        lambda: train_motion_oracle(spec, progress, device),
    )


def real_clips(
    size: int, num_frames: int, shapes: list[str], colors: list[str], motions: list[str], num: int
) -> MovingShapesDataset:
    """The real reference clips: set A is clips [0, num), set B (the floor) is clips [num, 2 num)."""
    return MovingShapesDataset(size, num_frames, 2 * num, shapes, colors, motions, seed=REAL_SEED)


@dataclass(frozen=True)
class MotionOracleResult:
    """Class and motion accuracy of generated clips against what they were asked for (None when nothing was
    requested), the oracle Fréchet distance to real set A, the real-versus-real floor FD(A, B), and both accuracies
    on the real sets (the oracle's own error rates); with names given to the evaluator, the accuracy per requested
    class and per requested motion."""

    num_generated: int
    class_accuracy: float | None
    motion_accuracy: float | None
    fd: float
    floor: float
    real_class_accuracy: float
    real_motion_accuracy: float
    per_class: LabelBreakdown | None = None
    per_motion: LabelBreakdown | None = None


class MotionOracleEvaluator(OracleEvaluator):
    """The shapes oracle's evaluator with (class, motion) labels (N, 2): `add_generated(videos, labels)`,
    `add_real(videos, labels, split)`, then the collective `results()`; `class_names` and `motion_names` (both or
    neither) turn on the per-label breakdown."""

    def __init__(
        self, oracle: Classifier, class_names: list[str] | None = None, motion_names: list[str] | None = None
    ) -> None:
        if (class_names is None) != (motion_names is None):
            raise ValueError("the per-label breakdown needs both class_names and motion_names (or neither)")
        names = None if class_names is None or motion_names is None else [class_names, motion_names]
        super().__init__(oracle, (2,), names)

    def results(self) -> MotionOracleResult:
        """Both accuracies, FD(generated, A), FD(A, B), the real accuracies and the per-label breakdowns over all
        ranks (collective)."""
        num, hits, fd, floor, real = self.measure()
        asked = [None if math.isnan(h) else float(h) for h in hits.tolist()]
        per_class, per_motion = self.breakdowns() or [None, None]
        return MotionOracleResult(
            num, asked[0], asked[1], fd, floor, float(real[0]), float(real[1]), per_class, per_motion
        )
