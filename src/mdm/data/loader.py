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
from mdm.data.shapes import ShapesDataset
from mdm.data.shards import ShardDataset


def build_dataset(config: DataConfig, image_size: int, need_captions: bool = False) -> Dataset:
    """The dataset named by `config.dataset` at `image_size`."""
    if config.dataset == "shapes":
        return ShapesDataset(image_size, config.num_samples, config.shapes, config.colors, config.seed)
    if config.dataset in ("folder", "shards"):
        kind = FolderDataset if config.dataset == "folder" else ShardDataset
        c = config
        options = ReadOptions(image_size, c.crop, c.flip, c.seed, c.min_size, c.max_pixels, need_captions)
        return kind(config.path, options)
    raise ValueError(f"data.dataset: unknown dataset {config.dataset!r}")


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
    """Stack images, labels and positions; captions stay a list; 'skipped' sums the unusable samples passed over."""
    return {
        "skipped": sum(it.get("skipped", 0) for it in items),
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "caption": [it["caption"] for it in items],
        "position": torch.tensor([it["position"] for it in items], dtype=torch.long),
    }


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
