"""DDP-aware accumulation over batches: each rank's share of the work, feature moments and kept features, means.

Every rank calls the collective methods (`statistics`, `features`, `total`, `compute`) in the same order; with
torch.distributed not initialised they are local, so a single process runs the same code.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from mdm.distributed import gather_rows, rank_world, reduce_to_cpu
from mdm.eval.features import FeatureExtractor
from mdm.eval.frechet import Statistics


def rank_batches(total: int, batch_size: int, desc: str = "", progress: bool = True) -> Iterator[range]:
    """This rank's share of `total` items as global index ranges of at most `batch_size`, with a progress bar on
    rank 0 (unless `progress` is False). Rank r owns a contiguous block of total // world (+1 for r < total % world)
    items."""
    if total < 0 or batch_size < 1:
        raise ValueError(f"need total >= 0 and batch_size >= 1, got total={total}, batch_size={batch_size}")
    rank, world = rank_world()
    start = rank * (total // world) + min(rank, total % world)
    stop = start + total // world + int(rank < total % world)
    with tqdm(total=stop - start, desc=desc, unit="img", disable=rank != 0 or not progress) as bar:
        for lo in range(start, stop, batch_size):
            batch = range(lo, min(lo + batch_size, stop))
            yield batch
            bar.update(len(batch))


class FeatureAccumulator:
    """Features of every image this rank sees: float64 running sums for (mu, sigma) and, if kept, the rows for KID."""

    def __init__(self, extractor: FeatureExtractor, keep_features: bool = True) -> None:
        self.extractor = extractor
        self.keep_features = keep_features
        self.count = 0
        self.device = torch.device("cpu")
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self._kept: list[torch.Tensor] = []

    def update(self, images: torch.Tensor) -> torch.Tensor:
        """Extract one batch of [-1, 1] images and add it; returns its features."""
        features = self.extractor(images)
        f = features.detach().double()
        if self._sum is None:
            self._sum = f.new_zeros(f.shape[1])
            self._outer = f.new_zeros(f.shape[1], f.shape[1])
            self.device = f.device
        self._sum += f.sum(0)
        self._outer += f.T @ f
        self.count += f.shape[0]
        if self.keep_features:
            self._kept.append(features.detach().float().cpu())
        return features

    def _dim(self) -> int:
        """The feature size, agreed over ranks (a rank that saw no images does not know it)."""
        return int(reduce_to_cpu(torch.tensor([0 if self._sum is None else self._sum.shape[0]]), "max"))

    def total(self) -> int:
        """Images seen over all ranks (collective)."""
        return int(reduce_to_cpu(torch.tensor([self.count])))

    def statistics(self) -> Statistics:
        """(mu, sigma) over all ranks' images (collective), from the float64 moments n, sum f, sum f f^T."""
        dim = self._dim()
        total = self._sum if self._sum is not None else torch.zeros(dim, dtype=torch.float64)
        outer = self._outer if self._outer is not None else torch.zeros(dim, dim, dtype=torch.float64)
        return Statistics.from_moments(self.total(), reduce_to_cpu(total).numpy(), reduce_to_cpu(outer).numpy())

    def features(self) -> torch.Tensor:
        """All ranks' kept features (N, D) float32 on the CPU, in rank order (collective)."""
        if not self.keep_features:
            raise RuntimeError("features were not kept (keep_features=False); KID needs them")
        dim = self._dim()
        local = torch.cat(self._kept) if self._kept else torch.zeros(0, dim)
        return gather_rows(local)


class RunningMean:
    """Mean over all ranks' samples of per-sample values of shape (B, *shape), accumulated in float64."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.count = 0
        self._sum = torch.zeros(shape, dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        """Add a batch of per-sample values (B, *shape)."""
        if tuple(values.shape[1:]) != tuple(self._sum.shape):
            raise ValueError(f"expected per-sample values of shape (B, {tuple(self._sum.shape)}), got {values.shape}")
        self._sum += values.detach().double().sum(0).cpu()
        self.count += values.shape[0]

    def compute(self) -> torch.Tensor:
        """The mean over all ranks (collective); NaN when nothing was added anywhere."""
        n = int(reduce_to_cpu(torch.tensor([self.count])))
        return reduce_to_cpu(self._sum) / n if n else torch.full_like(self._sum, float("nan"))
