"""Does a text-to-video model of the built-in moving shapes move the shape the way its caption says, and why not?

Run from the repository root on a quiet machine, on any video model of `moving_shapes` (a phase's model too), or
on its image base (a one-frame phase model: where it puts the first frame, next to the first frame of the data's
`--frames`-frame clips; no travel):

    .venv/bin/python benchmarks/motion_probe.py --model runs/demo-video/final [--scenes 12] [--steps 25]
        [--guidance 3] [--threads 2] [--frames 4]

Table 1, per requested motion: where the shape is in the first frame (centre x, y as fractions of the side), how far
it travels to the last frame (dx, dy) and how its area changes, in generated clips and in the data's clips of that
motion. Every motion is asked of the same scenes ("a red circle moving left on a gray background", then "... moving
right ...") with the same noise per scene, so a row that equals the others means the motion words change nothing.
Table 2: how far the top level's x0 moves (RMS over pixels) when only the motion word (left -> right, grow ->
shrink) or only the colour word of the caption changes, same noisy input, at several noise levels. The shape is
found as the pixels far from the frame's median colour (the background).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch

from mdm import MDMPipeline
from mdm.data.moving_shapes import MovingShapesDataset
from mdm.diffusion.process import predict_x0

SHAPE_DISTANCE = 0.3  # a pixel this far (RGB distance, [-1, 1] units) from the frame's median colour is the shape
EVAL_SEED = 12345  # held-out scenes


def track(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre x, y (fractions of the side) and area fraction of the shape in every frame of (N, 3, T, H, W) clips."""
    background = clips.flatten(-2).median(-1).values[..., None, None]
    distance = (clips - background).norm(dim=1)
    weight = (distance - SHAPE_DISTANCE).clamp(min=0)
    side = clips.shape[-1]
    coords = (torch.arange(side, dtype=clips.dtype) + 0.5) / side
    mass = weight.sum((-1, -2)).clamp(min=1e-6)
    cx = (weight.sum(-2) * coords).sum(-1) / mass
    cy = (weight.sum(-1) * coords).sum(-1) / mass
    return cx, cy, (distance > SHAPE_DISTANCE).to(clips.dtype).mean((-1, -2))


def row(name: str, clips: torch.Tensor) -> str:
    """One table row of mean first-frame centre, travel and area ratio."""
    cx, cy, area = track(clips.float())
    ratio = (area[:, -1] + 1e-3) / (area[:, 0] + 1e-3)
    cells = [
        cx[:, 0].mean(),
        cy[:, 0].mean(),
        (cx[:, -1] - cx[:, 0]).mean(),
        (cy[:, -1] - cy[:, 0]).mean(),
        ratio.mean(),
    ]
    return f"| {name} | " + " | ".join(f"{float(v):+.3f}" for v in cells) + " |"


def captions(data: MovingShapesDataset, scenes: int, motion: str) -> list[str]:
    """The captions of the first `scenes` held-out scenes with their motion replaced by `motion`."""
    return [dataclasses.replace(data.scene(i), motion=motion).caption for i in range(scenes)]


def generate(pipe: MDMPipeline, prompts: list[str], args: argparse.Namespace) -> torch.Tensor:
    """The top level of one clip per prompt (an image model's as one-frame clips), the noise of scene i drawn from a
    generator seeded by i."""
    clips = []
    for i, prompt in enumerate(prompts):
        out = pipe(
            prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(i),
            output_type="pt",
        )
        clips.append(out.videos[0] if out.videos is not None else out.levels[0][:, :, None])
    return torch.cat(clips)


def motion_table(pipe: MDMPipeline, data: MovingShapesDataset, args: argparse.Namespace) -> None:
    """Table 1: generated against real clips, per motion."""
    print("| motion | x first | y first | dx | dy | area last/first |\n|---|---:|---:|---:|---:|---:|")
    for motion in data.motions:
        print(row(f"{motion} (generated)", generate(pipe, captions(data, args.scenes, motion), args)), flush=True)
        real = (data.render(i)[:, : args.model_frames] for i in range(len(data)) if data.scene(i).motion == motion)
        print(row(f"{motion} (data)", torch.stack(list(itertools.islice(real, args.scenes)))), flush=True)


def sensitivity_table(pipe: MDMPipeline, data: MovingShapesDataset, args: argparse.Namespace) -> None:
    """Table 2: RMS change of the top level's x0 when one word of the caption changes."""
    n = args.scenes
    other = {c: data.colors[(k + 1) % len(data.colors)] for k, c in enumerate(data.colors)}
    scenes = [data.scene(i) for i in range(n)]
    recolored = [dataclasses.replace(c, scene=dataclasses.replace(c.scene, color=other[c.scene.color])) for c in scenes]
    pairs = [(a, b) for a, b in (("left", "right"), ("grow", "shrink")) if {a, b} <= set(data.motions)]
    swaps = {f"{a} -> {b}": (captions(data, n, a), captions(data, n, b)) for a, b in pairs}
    swaps["colour word"] = ([c.caption for c in scenes], [c.caption for c in recolored])
    shapes = pipe.diffusion.item_shapes(pipe.config.model.in_channels)
    kind = pipe.config.diffusion.prediction_type
    print("\n| schedule index | " + " | ".join(swaps) + " |\n|---:|" + "---:|" * len(swaps))
    g = torch.Generator().manual_seed(0)
    for t in args.timesteps:
        zs = [torch.randn(n, *s, generator=g) for s in shapes]
        gamma = pipe.diffusion.gamma(torch.tensor([t + 1]))[0, 0]
        cells = []
        for a, b in swaps.values():
            x0 = []
            for prompts in (a, b):
                with torch.no_grad():
                    top = pipe.unet(zs, torch.full((n,), t), pipe.conditioner.text(prompts))[0]
                x0.append(predict_x0(top.double(), zs[0].double(), gamma.expand(n), kind))
            cells.append(f"{float((x0[0] - x0[1]).pow(2).mean().sqrt()):.4f}")
        print(f"| {t} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained text-to-video model directory of moving_shapes")
    p.add_argument("--scenes", type=int, default=12, help="held-out scenes, each asked with every motion")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--timesteps", type=int, nargs="+", default=[999, 900, 750, 500, 250])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frames", type=int, default=4, help="an image model's: the frames of the clips it starts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = MDMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    m, d = pipe.config.model, pipe.config.data
    if d.dataset != "moving_shapes":
        raise SystemExit(f"{args.model}: needs a model trained on moving_shapes (data.dataset = {d.dataset})")
    args.model_frames = m.num_frames
    frames = m.num_frames if m.is_video() else args.frames
    data = MovingShapesDataset(m.image_size, frames, 10_000, d.shapes, d.colors, d.motions, seed=EVAL_SEED)
    motion_table(pipe, data, args)
    sensitivity_table(pipe, data, args)


if __name__ == "__main__":
    main()
