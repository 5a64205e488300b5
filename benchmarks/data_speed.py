"""Data-loading throughput from tar shards against what the trainer consumes, printed as a markdown table.

Run from the repository root:

    .venv/bin/python benchmarks/data_speed.py [--images 512] [--source-size 512] [--size 64] [--workers 0 2 4]

Writes `--images` random JPEGs of `--source-size` pixels into four class folders, packs them with `mdm data pack`,
times the start-up index of the shards (member offsets and `.cls` labels), then times the training loader (decode,
resize, crop, collate) at `--size` for each worker count. Compare the images/s with the trainer's images/s
(benchmarks/train_speed.py) for the same size: the loader must be faster or training waits for data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mdm.data.folder import ReadOptions
from mdm.data.loader import make_loader
from mdm.data.shards import ShardDataset, pack


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--source-size", type=int, default=512, help="side of the stored JPEGs")
    p.add_argument("--size", type=int, default=64, help="training image size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"# data_speed: {args.images} JPEGs of {args.source_size}px -> {args.size}px, batch {args.batch}\n")
    print("| workers | images/s | s per batch |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        for i in range(args.images):
            path = folder / f"class-{i % 4}" / f"{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (args.source_size, args.source_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            path.with_suffix(".txt").write_text("a random image")
        pack(folder, Path(tmp) / "shards", shard_size=128)
        start = time.perf_counter()
        dataset = ShardDataset(str(Path(tmp) / "shards"), ReadOptions(args.size, crop="random", flip=True))
        index_s = time.perf_counter() - start
        batches = max(2, args.images // args.batch)
        for workers in args.workers:
            loader = iter(make_loader(dataset, args.batch, seed=0, num_workers=workers))
            next(loader)
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            elapsed = time.perf_counter() - start
            print(f"| {workers} | {batches * args.batch / elapsed:.0f} | {elapsed / batches:.3f} |", flush=True)
    print(f"\nstart-up index: {index_s * 1e3:.1f} ms for {len(dataset)} samples ({dataset.num_classes} classes)")
    print(f"torch threads {torch.get_num_threads()}; images are re-read across epochs (page cache warm).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
