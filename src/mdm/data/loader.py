"""A resumable, rank-sharded stream of training batches.

Training reads one endless stream: stream position q is image perm_e[q mod N] of epoch e = q // N, where
perm_e is a permutation drawn from (seed, e). A global micro-batch covers positions [q, q + b * world);
rank r reads its slice [q + r * b, q + (r + 1) * b). Because every sample is named by its position, a run
resumes at the saved position, and the same global batch gives the same samples for any world size or
gradient-accumulation split.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mdm.config import DataConfig
from mdm.data.folder import FolderDataset, ReadOptions
from mdm.data.moving_shapes import MovingShapesDataset
from mdm.data.shapes import ShapesDataset
from mdm.data.shards import ShardDataset
from mdm.data.video import VideoFolderDataset

VIDEO_DATASETS = ("moving_shapes", "video_folder")


def build_dataset(
    config: DataConfig, image_size: int, need_captions: bool = False, num_frames: int | None = None
) -> Dataset:
    """The dataset named by `config.dataset` at `image_size`; the video datasets give clips of `num_frames`
    frames (the model's `model.num_frames`, or a phase's level), items with 'video' (3, T, S, S)."""
    c = config
    video = c.dataset in VIDEO_DATASETS
    if video and num_frames is None:
        raise ValueError(f"data.dataset = {c.dataset} gives clips: build it with num_frames (model.num_frames)")
    if not video and num_frames not in (None, 1):
        raise ValueError(
            f"data.dataset = {c.dataset} gives images, but {num_frames} frames were asked for "
            f"(model.num_frames); video models train on {' or '.join(VIDEO_DATASETS)}"
        )
    if c.dataset == "shapes":
        return ShapesDataset(image_size, c.num_samples, c.shapes, c.colors, c.seed)
    if c.dataset == "moving_shapes":
        return MovingShapesDataset(image_size, num_frames, c.num_samples, c.shapes, c.colors, c.motions, c.seed)
    options = ReadOptions(image_size, c.crop, c.flip, c.seed, c.min_size, c.max_pixels, need_captions)
    if c.dataset == "video_folder":
        return VideoFolderDataset(c.path, options, num_frames, c.frame_stride)
    if c.dataset in ("folder", "shards"):
        return (FolderDataset if c.dataset == "folder" else ShardDataset)(c.path, options)
    raise ValueError(f"data.dataset: unknown dataset {c.dataset!r}")


def dataset_captions(dataset: Dataset) -> list[str]:
    """Every non-empty caption of a dataset, read without decoding images where it lists them (`captions()`)."""
    if hasattr(dataset, "captions"):
        return [c for c in dataset.captions() if c]
    return [c for i in range(len(dataset)) if (c := dataset[i]["caption"])]


class StreamSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of (position, index) pairs for one rank, starting at stream position `start`."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.rank, self.world = start, rank, world
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def index(self, position: int) -> int:
        """Dataset index read at stream `position`."""
        epoch = position // self.size
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
        return int(self._perm[position % self.size])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        q = self.start
        while True:
            first = q + self.rank * self.batch_size
            yield [(p, self.index(p)) for p in range(first, first + self.batch_size)]
            q += self.batch_size * self.world


class _Positioned(Dataset):
    """Wraps a dataset so each item also carries its stream position."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        position, index = key
        return {**self.dataset[index], "position": position}


def collate(items: list[dict]) -> dict:
    """Stack images (or clips: 'video', N C T H W), labels, motions (moving_shapes) and positions; captions stay a
    list; 'skipped' sums the unusable samples passed over."""
    pixels = "video" if "video" in items[0] else "image"
    batch = {
        "skipped": sum(it.get("skipped", 0) for it in items),
        pixels: torch.stack([it[pixels] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "caption": [it["caption"] for it in items],
        "position": torch.tensor([it["position"] for it in items], dtype=torch.long),
    }
    if "motion" in items[0]:
        batch["motion"] = torch.tensor([it["motion"] for it in items], dtype=torch.long)
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """An endless DataLoader of this rank's micro-batches from stream position `start`."""
    sampler = StreamSampler(len(dataset), batch_size, seed, start, rank, world)
    return DataLoader(
        _Positioned(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
    )
