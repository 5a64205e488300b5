"""Training throughput and peak memory per preset on this machine, printed as a markdown table.

Run from the repository root:

    .venv/bin/python benchmarks/train_speed.py [--presets demo imagenet64 ...] [--batch N] [--steps N]
        [--device cuda] [--precision auto|bf16|fp32] [--checkpointing] [--compile]

Each preset trains all of its levels with the real `Trainer` step (loss, backward, clipping, AdamW, EMA)
on synthetic images, so the numbers exclude image decoding. Text presets get random 77-token features of
the right width in place of a text encoder (encoder cost excluded). Two untimed warm-up steps, then the
median step time over `--steps` steps. Peak memory: CUDA's max allocated bytes; on CPU the process-wide
resident high-water mark (it includes everything the process did before).
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.data import Dataset

from mdm.config import load_preset
from mdm.train.step import train_step
from mdm.train.trainer import Trainer

PRESETS = ("demo", "imagenet64", "imagenet256", "cc12m-64", "cc12m-256", "cc12m-1024")
CPU_BATCH = {"demo": 32, "imagenet64": 4, "imagenet256": 2, "cc12m-64": 4, "cc12m-256": 2, "cc12m-1024": 1}
GPU_BATCH = {"demo": 256, "imagenet64": 32, "imagenet256": 8, "cc12m-64": 32, "cc12m-256": 8, "cc12m-1024": 4}
TOKENS = 77


class SyntheticImages(Dataset):
    """Random images at `size` with labels and a caption, deterministic per index."""

    def __init__(self, size: int, num_classes: int) -> None:
        self.size, self.num_classes = size, num_classes
        self.class_names = [f"class {i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        image = torch.rand(3, self.size, self.size, generator=g) * 2 - 1
        return {"image": image, "label": index % max(1, self.num_classes), "caption": "a photo"}


class RandomText:
    """Stands in for a text encoder: random features of the model's text width."""

    name = "random"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def to(self, device: str | torch.device) -> RandomText:
        return self

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(len(prompts), TOKENS, self.dim), torch.ones(len(prompts), TOKENS)


def peak_mb(device: torch.device) -> float:
    """Peak memory in MB since the last reset (CUDA) or the process high-water mark (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name: str, args: argparse.Namespace) -> list[str]:
    """One table row: train the preset's full model for a few steps and time them."""
    sets = [
        "train.phases=[]",
        f"train.steps={args.steps + 2}",
        f"train.mixed_precision={args.precision}",
        f"train.compile={str(args.compile).lower()}",
        f"model.gradient_checkpointing={str(args.checkpointing).lower()}",
        "train.checkpoint_every=0",
        "train.warmup_steps=0",
    ]
    cfg = load_preset(name, sets)
    device = torch.device(args.device)
    batch = args.batch or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)[name]
    cfg.train.batch_size = batch
    m = cfg.model
    data = SyntheticImages(m.image_size, m.num_classes)
    text = RandomText(m.text_dim) if m.text_dim else None
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, device=args.device, text_encoder=text, dataset=data, progress=False)
        phase = trainer.grow(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            train_step(phase, trainer.state, trainer.env, trainer.conditioner, cfg.train.lr, trainer.bf16)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        params = sum(p.numel() for p in phase.net.parameters()) / 1e6
        sizes = "/".join(map(str, m.level_sizes()))
        step = statistics.median(times)
        precision = "bf16" if trainer.bf16 else "fp32"
        row = [name, sizes, f"{params:.1f}", str(batch), precision, f"{step:.3f}", f"{batch / step:.1f}"]
        row.append(f"{peak_mb(device):.0f}")
        del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    """Print the table for the chosen presets."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["demo", "imagenet64", "cc12m-64"], choices=PRESETS)
    p.add_argument("--batch", type=int, default=None, help="per-step batch (default: per preset and device)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    args = p.parse_args(argv)
    header = ["preset", "levels", "params (M)", "batch", "precision", "step s", "images/s", "peak MB"]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"# train_speed on {dev}, torch {torch.__version__}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.presets:
        try:
            row = bench(name, args)
        except torch.OutOfMemoryError:
            row = [name, "-", "-", str(args.batch or "-"), args.precision, "OOM", "-", "-"]
        print("| " + " | ".join(row) + " |", flush=True)
    if not args.device.startswith("cuda"):
        print("\npeak MB on CPU is the process-wide resident high-water mark, so it only grows down the table.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
