"""Latency of generating one image (one clip for the video presets) with classifier-free guidance, per preset,
sampler and mode, as a markdown table.

Run from the repository root:

    .venv/bin/python benchmarks/sample_speed.py [--presets cc12m-1024 demo-video webvid-256] [--device cuda]
        [--runs ddim:50 dpmpp_2m:15 ...] [--modes bf16 bf16+cl bf16+compile] [--repeats 3]

The network has random weights (timing does not depend on them) and text presets get random 77-token prompt
features, so the text encoder is excluded. A run is `sampler:steps` (the trailing grid for every sampler but DDIM,
which uses the config's); guidance 7.5 doubles the batch of every network call. A mode is a dtype (fp32 or bf16
weights) joined by `+` with `cl` (channels-last) and `compile` (torch.compile of the network; its compile time is in
the untimed warm-up call). The time is the median of `--repeats` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mdm.config import load_preset
from mdm.models.unet import NestedUNet
from mdm.pipeline import MDMPipeline
from train_speed import parse_mode  # benchmarks/ is on the path when run as a script

TOKENS = 77
GUIDANCE = 7.5


def pipeline(name: str, mode: str, device: str) -> MDMPipeline:
    """The preset's network with random weights on `device`, in `mode` (dtype, memory format, compile)."""
    dtype, options = parse_mode(mode, ("fp32", "bf16"))
    cfg = load_preset(name)
    torch.manual_seed(0)
    net = NestedUNet(cfg.model).to(device, torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    if "cl" in options:
        net.to(memory_format=torch.channels_last)
    if "compile" in options:
        net.compile()
    pipe = MDMPipeline(net, cfg)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def request(pipe: MDMPipeline) -> dict:
    """One sample's condition: random prompt features, a class, or nothing."""
    m = pipe.config.model
    if m.text_dim:  # the unconditional branch too, so no text encoder is ever loaded
        text, mask = torch.randn(2, TOKENS, m.text_dim), torch.ones(2, TOKENS)
        return {"prompt_embeds": text[:1], "prompt_mask": mask[:1]} | {
            "negative_prompt_embeds": text[1:],
            "negative_prompt_mask": mask[1:],
        }
    if m.num_classes:
        return {"class_labels": [0]}
    return {"batch_size": 1}


def latency(pipe: MDMPipeline, sampler: str, steps: int, repeats: int) -> tuple[float, int]:
    """Median seconds of one guided sample after a warm-up call, and the network calls it made."""
    spacing = None if sampler == "ddim" else "trailing"
    times, nfe = [], 0
    for i in range(repeats + 1):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = pipe(
                **request(pipe),
                num_inference_steps=steps,
                guidance_scale=GUIDANCE,
                sampler=sampler,
                spacing=spacing,
                generator=torch.Generator().manual_seed(i),
                output_type="pt",
            )
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        if i:
            times.append(time.perf_counter() - start)
        nfe = out.nfe
    return statistics.median(times), nfe


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=None, help="default: cc12m-1024 on a GPU, demo on the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", nargs="+", default=["ddim:50", "dpmpp_2m:15"], help="sampler:steps")
    p.add_argument("--modes", nargs="+", default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    presets = args.presets or (["cc12m-1024"] if gpu else ["demo"])
    modes = args.modes or (["bf16"] if gpu else ["fp32"])
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs]
    dev = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# sample_speed on {dev}, torch {torch.__version__}, guidance {GUIDANCE}, batch 1\n")
    header = ["preset", "levels", "mode", "sampler", "steps", "network calls", "s / image"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in presets:
        for mode in modes:
            pipe = pipeline(name, mode, args.device)
            m = pipe.config.model
            sizes = "/".join(f"{f}x{s}" if m.is_video() else str(s) for f, s in m.level_shapes())
            for sampler, steps in runs:
                seconds, nfe = latency(pipe, sampler, steps, args.repeats)
                row = [name, sizes, mode, sampler, str(steps), str(nfe), f"{seconds:.3f}"]
                print("| " + " | ".join(row) + " |", flush=True)
            del pipe
    return 0


if __name__ == "__main__":
    sys.exit(main())
