"""NestedUNet speed and memory on this machine, printed as a markdown table.

Run from the repository root:

    .venv/bin/python benchmarks/unet_speed.py [--skip-released] [--only NAME] [--repeats N] [--device cuda]

Tiny configs: one untimed warm-up, then forward (no grad) and a training step (`MultiLevelDiffusion.loss`
plus backward, no optimizer) at batch 8. Released shapes: forward only, batch 1, 16 random text tokens.
Times are medians over the timed repeats.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

from mdm.config import MDMConfig, ModelConfig, UNetConfig, load_preset
from mdm.diffusion.process import MultiLevelDiffusion
from mdm.models.conditioning import Conditioning
from mdm.models.unet import NestedUNet

TINY_BATCH = 8
TEXT_TOKENS = 16
RELEASED = ("cc12m-64", "cc12m-256", "cc12m-1024")
Row = list[str]
HEADER = ("config", "levels", "params (M)", "batch", "fwd s", "fwd+bwd s", "peak MB")


def tiny_text_unet() -> UNetConfig:
    """The 16px text UNet: a one-level model on its own and the innermost level of the nested one."""
    return UNetConfig(
        channels=[32, 32, 32],
        attention_levels=[1, 2],
        temb_dim=128,
        text_proj_dim=64,
        micro_conditioning={"scale": 16},
        mid_blocks=True,
    )


def tiny_configs() -> dict[str, MDMConfig]:
    """The demo preset, a one-level 16px text UNet and a 64/32/16 nested text model."""
    middle = UNetConfig(channels=[32, 32], num_res_blocks=[1], temb_dim=128, inner=tiny_text_unet())
    outer = UNetConfig(channels=[32, 32], num_res_blocks=[1], temb_dim=128, inner=middle)
    text_16 = ModelConfig(image_size=16, text_dim=48, unet=tiny_text_unet())
    nested_64 = ModelConfig(image_size=64, text_dim=48, unet=outer)
    return {
        "demo": load_preset("demo"),
        "tiny-text-16": MDMConfig(model=text_16).validate(),
        "tiny-nested-64": MDMConfig(model=nested_64).validate(),
    }


def make_cond(model: ModelConfig, batch: int, device: torch.device) -> Conditioning:
    """Random class labels or random text features with an all-ones mask."""
    if model.num_classes > 0:
        return Conditioning(labels=torch.randint(0, model.num_classes, (batch,), device=device))
    text = torch.randn(batch, TEXT_TOKENS, model.text_dim, device=device)
    return Conditioning(text=text, text_mask=torch.ones(batch, TEXT_TOKENS, device=device))


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall-clock seconds of `fn` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_mark(device: torch.device) -> float:
    """Start a peak-memory window: the baseline in MB (CUDA: allocated now; CPU: the RSS high-water mark)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_peak(device: torch.device, base: float) -> float:
    """Peak MB above `base` since `memory_mark`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def bench(name: str, cfg: MDMConfig, batch: int, repeats: int, train: bool, device: torch.device) -> Row:
    """Build `cfg`'s NestedUNet, time it and return one table row (memory includes the weights)."""
    print(f"measuring {name} ...", file=sys.stderr, flush=True)
    base = memory_mark(device)
    torch.manual_seed(0)
    unet = NestedUNet(cfg.model).to(device)
    sizes = cfg.model.level_sizes()
    zs = [torch.randn(batch, 3, s, s, device=device) for s in sizes]
    t = torch.randint(0, 1000, (batch,), device=device)
    x = torch.rand(batch, 3, sizes[0], sizes[0], device=device) * 2 - 1
    cond = make_cond(cfg.model, batch, device)
    proc = MultiLevelDiffusion(cfg.diffusion, sizes)

    def forward() -> None:
        with torch.no_grad():
            unet(zs, t, cond)

    def train_step() -> None:
        unet.zero_grad(set_to_none=True)
        proc.loss(unet, x, cond).loss.mean().backward()

    if train:
        forward()
        train_step()
    fwd = timed(forward, repeats, device)
    step = f"{timed(train_step, repeats, device):.4f}" if train else "-"
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    levels = "/".join(str(s) for s in sizes)
    return [name, levels, f"{params:.2f}", str(batch), f"{fwd:.4f}", step, f"{memory_peak(device, base):.0f}"]


def format_table(rows: list[Row]) -> str:
    """A markdown table with every column padded to its widest cell."""
    table = [list(HEADER), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    """Parse flags, measure the selected configs (tiny first) and print the table."""
    names = [*tiny_configs(), *RELEASED]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=int, help="timed runs per number (default: tiny 5, released 1)")
    parser.add_argument("--skip-released", action="store_true", help="only the tiny configs")
    parser.add_argument("--only", choices=names, help="measure this config only")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"torch: {torch.__version__}, threads: {torch.get_num_threads()}\n")
    rows: list[Row] = []
    for name, cfg in tiny_configs().items():
        if args.only in (None, name):
            rows.append(bench(name, cfg, TINY_BATCH, args.repeats or 5, True, device))
    for name in RELEASED:
        if not args.skip_released and args.only in (None, name):
            rows.append(bench(name, load_preset(name), 1, args.repeats or 1, False, device))
            gc.collect()
    print(format_table(rows))
    peak = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
    print(f"\npeak MB: growth of {peak} while building and running the row (weights included).")
    if device.type == "cpu":
        print("CPU peak is the process-wide RSS high-water mark: a row below an earlier row's peak shows ~0.")


if __name__ == "__main__":
    main()
