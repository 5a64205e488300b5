"""The resumable, rank-sharded data stream."""

from __future__ import annotations

from itertools import islice

import torch

from mdm.data.loader import StreamSampler, make_loader
from mdm.data.shapes import ShapesDataset


def _take(sampler: StreamSampler, n: int) -> list[list[tuple[int, int]]]:
    return list(islice(iter(sampler), n))


def test_epochs_are_permutations_and_positions_are_contiguous() -> None:
    batches = _take(StreamSampler(10, 5, seed=1), 4)
    flat = [pair for b in batches for pair in b]
    assert [p for p, _ in flat] == list(range(20))
    first, second = [i for _, i in flat[:10]], [i for _, i in flat[10:]]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second and first != list(range(10))


def test_ranks_split_the_global_batch() -> None:
    one = _take(StreamSampler(50, 4, seed=0), 3)
    r0 = _take(StreamSampler(50, 2, seed=0, rank=0, world=2), 3)
    r1 = _take(StreamSampler(50, 2, seed=0, rank=1, world=2), 3)
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one


def test_resume_from_position_continues_the_stream() -> None:
    full = _take(StreamSampler(30, 4, seed=2), 6)
    resumed = _take(StreamSampler(30, 4, seed=2, start=12), 3)
    assert resumed == full[3:]


def test_loader_yields_positions_images_labels_captions() -> None:
    ds = ShapesDataset(16, num_samples=20)
    batch = next(iter(make_loader(ds, 3, seed=0, start=5)))
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["position"].tolist() == [5, 6, 7]
    idx = StreamSampler(20, 3, seed=0).index(5)
    assert torch.equal(batch["image"][0], ds[idx]["image"]) and batch["label"][0] == ds[idx]["label"]
    assert batch["caption"][0] == ds[idx]["caption"]


def test_two_ranks_read_disjoint_folder_samples_and_resume_in_place(tmp_path) -> None:
    from PIL import Image

    from mdm.data.folder import FolderDataset, ReadOptions

    for i in range(10):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    ds = FolderDataset(tmp_path, ReadOptions(8))
    ranks = [iter(make_loader(ds, 2, seed=1, rank=r, world=2)) for r in range(2)]
    seen = [[c for _ in range(2) for c in next(it)["caption"]] for it in ranks]
    assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
    resumed = iter(make_loader(ds, 2, seed=1, start=8, rank=0, world=2))
    assert next(resumed)["caption"] == next(ranks[0])["caption"]
