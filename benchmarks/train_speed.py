"""Training throughput and peak memory per preset on this machine, printed as a markdown table.

Run from the repository root:

    .venv/bin/python benchmarks/train_speed.py [--presets demo imagenet64 ...] [--batch N] [--steps N]
        [--device cuda] [--modes fp32 bf16 bf16+cl bf16+compile ...] [--threads 1 2] [--checkpointing]

A mode is a precision (fp32 or bf16 autocast) joined by `+` with options: `cl` (channels-last memory format),
`compile` (torch.compile; its compile time is in the warm-up, not the timed steps). Every preset x mode x thread
count is a row. `--mfu` adds the model FLOPs per step (matmuls, convolutions and attention of forward and backward,
counted once per preset by `torch.utils.flop_counter` on an eager step), the achieved TFLOP/s and, on a GPU whose
bf16 dense peak is known (or given by `--peak-tflops`), the model FLOPs utilisation. Each preset trains all of
its levels with the real `Trainer` step (loss, backward, clipping, AdamW, EMA) on synthetic images (clips of the
model's frames for the video presets, where images/s counts clips), so the numbers exclude decoding. Presets with
the built-in byte encoder encode a shapes-style caption with it; the others get random 77-token features of the
right width in place of their text encoder (encoder cost excluded). Two untimed
warm-up steps, then the median step time over `--steps` steps. Peak memory: CUDA's max allocated bytes; on CPU the
process-wide resident high-water mark (it includes everything the process did before).
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
from torch.utils.flop_counter import FlopCounterMode

from mdm.config import load_preset
from mdm.train.step import train_step
from mdm.train.trainer import Trainer

PRESETS = ("demo", "demo-text", "imagenet64", "imagenet256", "cc12m-64", "cc12m-256", "cc12m-1024", "demo-video")
PRESETS += ("webvid-256",)
CPU_BATCH = {"demo": 32, "imagenet64": 4, "imagenet256": 2, "cc12m-64": 4, "cc12m-256": 2, "cc12m-1024": 1}
CPU_BATCH |= {"demo-text": 32, "demo-video": 16, "webvid-256": 1}
GPU_BATCH = {"demo": 256, "imagenet64": 32, "imagenet256": 8, "cc12m-64": 32, "cc12m-256": 8, "cc12m-1024": 4}
GPU_BATCH |= {"demo-text": 256, "demo-video": 128, "webvid-256": 2}
TOKENS = 77
CAPTION = "a small red circle at the top left on a light gray background"  # the built-in shapes' kind
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}  # dense, no sparsity


class SyntheticImages(Dataset):
    """Random images at `size` (clips of `frames` frames, 'video' items, when frames > 1) with labels and a caption,
    deterministic per index."""

    def __init__(self, size: int, num_classes: int, frames: int = 1) -> None:
        self.size, self.num_classes, self.frames = size, num_classes, frames
        self.class_names = [f"class {i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        shape = (3, self.frames, self.size, self.size) if self.frames > 1 else (3, self.size, self.size)
        pixels = torch.rand(shape, generator=g) * 2 - 1
        key = "video" if self.frames > 1 else "image"
        return {key: pixels, "label": index % max(1, self.num_classes), "caption": CAPTION}


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


def parse_mode(mode: str, precisions: tuple[str, ...]) -> tuple[str, list[str]]:
    """A mode such as 'bf16+cl+compile' as (precision, options); unknown parts end the script with a message."""
    precision, *options = mode.split("+")
    if precision not in precisions or any(o not in ("cl", "compile") for o in options):
        raise SystemExit(f"--modes: {mode!r} is not {'|'.join(precisions)} joined by +cl / +compile")
    return precision, options


def mode_overrides(mode: str) -> list[str]:
    """`--set` overrides of a training mode."""
    precision, options = parse_mode(mode, ("fp32", "bf16", "auto"))
    return [
        f"train.mixed_precision={precision}",
        f"train.channels_last={str('cl' in options).lower()}",
        f"train.compile={str('compile' in options).lower()}",
    ]


def make_trainer(name: str, mode: str, args: argparse.Namespace, out: str) -> Trainer:
    """A trainer of the preset's full model on synthetic data, in `mode`, at the benchmark's batch."""
    sets = [
        "train.phases=[]",
        f"train.steps={args.steps + 2}",
        f"train.batch_size={batch_size(name, args)}",
        f"model.gradient_checkpointing={str(args.checkpointing).lower()}",
        "train.checkpoint_every=0",
        "train.warmup_steps=0",
        *mode_overrides(mode),
    ]
    cfg = load_preset(name, sets)
    m = cfg.model
    data = SyntheticImages(m.image_size, m.num_classes, m.num_frames)
    text = RandomText(m.text_dim) if m.text_dim and cfg.text.encoder != "bytes" else None  # None: the config's
    return Trainer(cfg, out, device=args.device, text_encoder=text, dataset=data, progress=False)


def batch_size(name: str, args: argparse.Namespace) -> int:
    """`--batch`, else the preset's default for the device type."""
    return args.batch or (GPU_BATCH if args.device.startswith("cuda") else CPU_BATCH)[name]


def step_flops(name: str, args: argparse.Namespace) -> int:
    """Model FLOPs of one training step of the preset (forward and backward), counted on an eager fp32 step."""
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(name, "fp32", args, out)
        phase = trainer.grow(0)
        counter = FlopCounterMode(display=False)
        with counter:
            train_step(phase, trainer.state, trainer.env, trainer.conditioner, trainer.cfg.train.lr, False)
        del trainer, phase
    gc.collect()
    return counter.get_total_flops()


def bench(name: str, mode: str, args: argparse.Namespace, flops: int | None, peak: float | None) -> list[str]:
    """One table row: train the preset's full model in `mode` for a few steps and time them."""
    device = torch.device(args.device)
    batch = batch_size(name, args)
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(name, mode, args, out)
        cfg, m = trainer.cfg, trainer.cfg.model
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
        sizes = "/".join(f"{f}x{s}" if m.is_video() else str(s) for f, s in m.level_shapes())
        step = statistics.median(times)
        threads = "-" if device.type == "cuda" else str(torch.get_num_threads())
        row = [name, sizes, f"{params:.1f}", str(batch), mode, threads, f"{step:.3f}", f"{batch / step:.1f}"]
        row.append(f"{peak_mb(device):.0f}")
        if flops is not None:
            achieved = flops / step / 1e12
            row += [f"{flops / 1e12:.3f}", f"{achieved:.2f}", f"{100 * achieved / peak:.1f}%" if peak else "-"]
        del trainer, phase
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
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"], help="rows: fp32|bf16|auto [+cl] [+compile]")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="CPU thread counts (default: torch's)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--mfu", action="store_true", help="count model FLOPs: TFLOP/s and utilisation columns")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 dense peak (default: known GPUs)")
    args = p.parse_args(argv)
    for mode in args.modes:
        mode_overrides(mode)
    header = ["preset", "levels", "params (M)", "batch", "mode", "threads", "step s", "images/s", "peak MB"]
    if args.mfu:
        header += ["TFLOP/step", "TFLOP/s", "MFU"]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    known = [v for k, v in PEAK_BF16_TFLOPS.items() if k in dev]
    peak = args.peak_tflops or (known[0] if known else None)
    flops = {name: step_flops(name, args) for name in args.presets} if args.mfu else {}
    print(f"# train_speed on {dev}, torch {torch.__version__}" + (f", bf16 peak {peak} TFLOP/s" if peak else ""))
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for name in args.presets:
            for mode in args.modes:
                try:
                    row = bench(name, mode, args, flops.get(name), peak)
                except torch.OutOfMemoryError:
                    row = [name, "-", "-", str(args.batch or "-"), mode, str(threads), "OOM", "-", "-"]
                    row += ["-"] * (len(header) - len(row))
                print("| " + " | ".join(row) + " |", flush=True)
    if not args.device.startswith("cuda"):
        print("\npeak MB on CPU is the process-wide resident high-water mark, so it only grows down the table.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
