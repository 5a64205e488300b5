"""An oracle for the built-in shapes: a small CNN that classifies shape x colour, trained on rendered scenes.

It scores generated samples by the accuracy of their requested labels and by the Fréchet distance between
generated and real images in its penultimate (pooled) feature space, reported next to the real-versus-real floor
(two disjoint real sets of the same size), which is what a perfect generator would score at that sample count.
Trained oracles are cached as one safetensors file whose metadata holds the settings (size, shapes, colours).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mdm import io
from mdm.data.shapes import ShapesDataset
from mdm.distributed import reduce_to_cpu
from mdm.eval.accumulate import FeatureAccumulator, RunningMean
from mdm.eval.frechet import frechet_distance

ORACLE_CACHE_ENV = "MDM_ORACLE_CACHE"
FORMAT = "mdm-oracle/1"
TRAIN_SEED = 1_000  # oracle training scenes: ShapesDataset seed TRAIN_SEED + seed
CHECK_SEED = 2_000  # held-out scenes the saved accuracy is measured on
REAL_SEED = 3_000  # real reference scenes for evaluation (disjoint sets A and B)
MIN_SIDE = 4  # the network halves the image until it is at most this many pixels across
IMAGES_PER_CLASS = 2400  # default training length: about this many rendered scenes per class
BATCH_SIZE = 64


@dataclass(frozen=True)
class OracleSpec:
    """Everything that defines an oracle: image size, class vocabulary, training length and seed, width."""

    size: int
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    steps: int
    seed: int = 0
    width: int = 16
    batch_size: int = BATCH_SIZE

    def dataset(self, seed: int, num: int) -> ShapesDataset:
        """`num` scenes of this vocabulary at this size, drawn with dataset seed `seed` (checks the names)."""
        return ShapesDataset(self.size, num, list(self.shapes), list(self.colors), seed=seed)

    @property
    def num_classes(self) -> int:
        """len(shapes) x len(colors), the ShapesDataset labels."""
        return len(self.shapes) * len(self.colors)

    def key(self) -> str:
        """A file name unique to these settings: the size, then a hash of the rest."""
        return spec_key(f"oracle-{self.size}px", self)


def spec_key(prefix: str, spec: object) -> str:
    """`prefix` and a hash of every field of the dataclass `spec`: a cache file name unique to the settings."""
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    return f"{prefix}-{digest}"


def conv_body(in_channels: int, size: int, width: int) -> tuple[nn.Sequential, int]:
    """Conv stem, then stride-2 stages (widening to 4 x `width`) until the side is at most MIN_SIDE px; returns the
    layers and their output width."""
    base = width
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.SiLU()]
    side = size
    while side > MIN_SIDE:
        wider = min(2 * width, 4 * base)
        layers += [nn.Conv2d(width, wider, 3, stride=2, padding=1), nn.BatchNorm2d(wider), nn.SiLU()]
        layers += [nn.Conv2d(wider, wider, 3, padding=1), nn.BatchNorm2d(wider), nn.SiLU()]
        width, side = wider, math.ceil(side / 2)
    return nn.Sequential(*layers), width


class SavedModel(nn.Module):
    """A trained judge saved as one safetensors file whose metadata holds its format, spec and held-out accuracy."""

    FORMAT: ClassVar[str]
    spec: Any
    accuracy: Any

    @classmethod
    def from_spec(cls, fields: dict) -> SavedModel:
        """A fresh network for the spec fields read from a file (JSON lists become the spec's tuples)."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file with the settings and held-out accuracy as metadata (temporary name, then renamed)."""
        meta = {"format": self.FORMAT, "spec": json.dumps(asdict(self.spec)), "accuracy": json.dumps(self.accuracy)}
        with io.atomic_file(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
        """Read a file written by `save`; errors name the file and what it lacks."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such oracle file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != cls.FORMAT or "spec" not in meta:
            raise ValueError(f"{path}: not an oracle file (expected metadata format={cls.FORMAT!r} and 'spec')")
        model = cls.from_spec(json.loads(meta["spec"]))
        model.load_state_dict(state, strict=True)
        model.accuracy = json.loads(meta.get("accuracy", "null"))
        return model.to(device).eval()


class Oracle(SavedModel):
    """Conv stem, then stride-2 stages until the side is at most 4 px, global average pool (the features), linear."""

    FORMAT = FORMAT

    def __init__(self, spec: OracleSpec) -> None:
        super().__init__()
        self.spec = spec
        self.accuracy: float | None = None
        self.body, width = conv_body(3, spec.size, spec.width)
        self.head = nn.Linear(width, spec.num_classes)

    @classmethod
    def from_spec(cls, fields: dict) -> Oracle:
        """The network of a saved spec."""
        return cls(OracleSpec(**{**fields, "shapes": tuple(fields["shapes"]), "colors": tuple(fields["colors"])}))

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.head.weight.device

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] NCHW RGB images at the oracle's size, on its device."""
        s = self.spec.size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"the oracle takes (N, 3, {s}, {s}) images in [-1, 1], got shape {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, classes)."""
        return self.head(self.body(self._check(images)).mean(dim=(2, 3)))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, D): the pooled last stage, the space of the oracle Fréchet distance."""
        return self.body(self._check(images)).mean(dim=(2, 3))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted ShapesDataset labels (N,)."""
        return self(images).argmax(1)


def render(dataset: ShapesDataset, indices: range | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, S, S) and labels (N,) of the dataset's scenes `indices`."""
    images = torch.stack([dataset.render(i) for i in indices])
    labels = torch.tensor([dataset.scene(i).label for i in indices], dtype=torch.long)
    return images, labels


@torch.no_grad()
def accuracy(oracle: Oracle, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of `images` the oracle assigns to `labels`."""
    hits = sum(
        int((oracle.predict(images[i : i + batch_size]).cpu() == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return hits / len(images)


def oracle_spec(
    size: int,
    shapes: list[str] | None = None,
    colors: list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
) -> OracleSpec:
    """Checked settings: ShapesDataset's vocabulary by default, and by default steps for about IMAGES_PER_CLASS
    training scenes per class (more classes need more steps)."""
    probe = ShapesDataset(size, 1, shapes, colors)
    if steps is None:
        steps = math.ceil(IMAGES_PER_CLASS * probe.num_classes / BATCH_SIZE)
    if steps < 1:
        raise ValueError(f"oracle training needs steps >= 1, got {steps}")
    return OracleSpec(size, tuple(probe.shapes), tuple(probe.colors), steps, seed)


def train_oracle(
    size: int,
    shapes: list[str] | None = None,
    colors: list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    check_samples: int = 2000,
) -> Oracle:
    """Train an oracle on freshly rendered scenes (AdamW, warm-up then cosine decay), then measure its accuracy on
    `check_samples` held-out scenes (`Oracle.accuracy`)."""
    spec = oracle_spec(size, shapes, colors, steps, seed)
    torch.manual_seed(seed)
    oracle = Oracle(spec).to(device)
    scenes = spec.dataset(TRAIN_SEED + seed, spec.steps * spec.batch_size)

    def loss(step: int) -> torch.Tensor:
        images, labels = render(scenes, range(step * spec.batch_size, (step + 1) * spec.batch_size))
        return F.cross_entropy(oracle(images), labels.to(oracle.device))

    fit(oracle, spec.steps, loss, progress)
    oracle.accuracy = accuracy(oracle, *render(spec.dataset(CHECK_SEED, check_samples), range(check_samples)))
    return oracle


def fit(
    model: nn.Module, steps: int, loss: Callable[[int], torch.Tensor], progress: bool = True, desc: str = "oracle"
) -> None:
    """Train `model` for `steps` steps of AdamW (lr 3e-3, warm-up over 5 %, then cosine decay) minimising `loss(step)`,
    the loss of that step's fresh batch; leaves it in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * k / steps))
    )
    for step in tqdm(range(steps), desc=desc, disable=not progress):
        value = loss(step)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        schedule.step()
    model.eval()


Judge = TypeVar("Judge", bound=SavedModel)


def cached(
    key: str, cache_dir: str | os.PathLike | None, load: Callable[[Path], Judge], train: Callable[[], Judge]
) -> Judge:
    """The judge saved as `key`.safetensors in the oracle cache, or `train()`ed and saved there first."""
    path = oracle_cache_dir(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        return load(path)
    judge = train()
    judge.save(path)
    return judge


def oracle_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where trained oracles are kept: `cache_dir`, else $MDM_ORACLE_CACHE, else ~/.cache/mdm/oracle."""
    chosen = cache_dir or os.environ.get(ORACLE_CACHE_ENV)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "mdm" / "oracle"


def load_or_train_oracle(
    size: int,
    shapes: list[str] | None = None,
    colors: list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Oracle:
    """The cached oracle for these settings (a file named by `OracleSpec.key`), trained and saved first if absent."""
    spec = oracle_spec(size, shapes, colors, steps, seed)
    return cached(
        spec.key(),
        cache_dir,
        lambda path: Oracle.load(path, device),
        lambda: train_oracle(size, list(spec.shapes), list(spec.colors), spec.steps, seed, progress, device),
    )


def real_dataset(size: int, shapes: list[str], colors: list[str], num: int) -> ShapesDataset:
    """The real reference scenes: set A is scenes [0, num), set B (the floor) is scenes [num, 2 num)."""
    return ShapesDataset(size, 2 * num, shapes, colors, seed=REAL_SEED)


class Classifier(Protocol):
    """What the oracle evaluation needs: features for the Fréchet distance and predicted labels."""

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class LabelBreakdown:
    """How one kind of requested label fared: per label name, the accuracy of the samples asked for it (None: none
    were), and the confusion counts (rows: asked for, columns: what the oracle saw, in label order)."""

    accuracy: dict[str, float | None]
    confusion: list[list[int]]

    def line(self) -> str:
        """'name 95.0%, other 80.0% (most often read as x), ...', skipping labels nobody asked for."""
        names = list(self.accuracy)
        parts = []
        for name, row in zip(names, self.confusion, strict=True):
            value = self.accuracy[name]
            if value is None:
                continue
            misses = [(count, names[j]) for j, count in enumerate(row) if names[j] != name and count > 0]
            worst = f" (most often read as {max(misses)[1]})" if misses else ""
            parts.append(f"{name} {100 * value:.1f}%{worst}")
        return ", ".join(parts)


@dataclass(frozen=True)
class OracleResult:
    """Accuracy of generated samples against their requested labels (None when none were requested), the oracle
    Fréchet distance to real set A, the real-versus-real floor FD(A, B), the accuracy on the real sets (the
    oracle's own error rate), and the accuracy per requested class (when the evaluator was given the class names)."""

    num_generated: int
    accuracy: float | None
    fd: float
    floor: float
    real_accuracy: float
    per_class: LabelBreakdown | None = None


class OracleEvaluator:
    """Accumulates generated images with their requested labels and the two real sets, on every rank;
    `results()` is collective. `label_shape` is the shape of one sample's labels (() for one class label);
    `label_names`, one list of names per label column, turns on the per-label breakdown."""

    def __init__(
        self, oracle: Classifier, label_shape: tuple[int, ...] = (), label_names: list[list[str]] | None = None
    ) -> None:
        self.oracle = oracle
        self.generated = FeatureAccumulator(oracle.features, keep_features=False)
        self.real = [FeatureAccumulator(oracle.features, keep_features=False) for _ in range(2)]
        self.hits = RunningMean(label_shape)
        self.real_hits = RunningMean(label_shape)
        self.label_names = label_names or []
        self.confusion = [torch.zeros(len(n), len(n), dtype=torch.float64) for n in self.label_names]

    def add_generated(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Generated images (N, 3, S, S) in [-1, 1] and the labels they were asked for (N,), if any."""
        self.generated.update(images)
        if labels is not None:
            predicted, labels = self.oracle.predict(images).cpu(), labels.cpu()
            self.hits.update((predicted == labels).double())
            for column, counts in enumerate(self.confusion):
                asked, seen = labels.view(len(labels), -1)[:, column], predicted.view(len(labels), -1)[:, column]
                counts.index_put_((asked, seen), torch.ones(len(labels), dtype=torch.float64), accumulate=True)

    def add_real(self, images: torch.Tensor, labels: torch.Tensor, split: int) -> None:
        """Real images and their labels into set A (`split` 0, the reference) or B (1, for the floor)."""
        self.real[split].update(images)
        self.real_hits.update((self.oracle.predict(images).cpu() == labels.cpu()).double())

    def measure(self) -> tuple[int, torch.Tensor, float, float, torch.Tensor]:
        """(generated count, hit rate per label, FD(generated, A), FD(A, B), real hit rate per label) over all
        ranks (collective); hit rates are NaN where no labels were given."""
        generated, first, second = self.generated.statistics(), self.real[0].statistics(), self.real[1].statistics()
        fd, floor = frechet_distance(generated, first), frechet_distance(first, second)
        return self.generated.total(), self.hits.compute(), fd, floor, self.real_hits.compute()

    def breakdowns(self) -> list[LabelBreakdown | None]:
        """Per label column, the per-name accuracies and confusion counts over all ranks (collective); None for every
        column when no labels were given anywhere."""
        out: list[LabelBreakdown | None] = []
        for names, local in zip(self.label_names, self.confusion, strict=True):
            counts = reduce_to_cpu(local)
            asked = counts.sum(1)
            if not asked.any():
                out.append(None)
                continue
            accuracy = {n: float(counts[i, i] / asked[i]) if asked[i] else None for i, n in enumerate(names)}
            out.append(LabelBreakdown(accuracy, counts.long().tolist()))
        return out

    def results(self) -> OracleResult:
        """Accuracy, FD(generated, A), FD(A, B), the real accuracy and the per-class breakdown over all ranks
        (collective)."""
        num, hits, fd, floor, real_hits = self.measure()
        per_class = (self.breakdowns() or [None])[0]
        return OracleResult(num, None if math.isnan(hits) else float(hits), fd, floor, float(real_hits), per_class)
