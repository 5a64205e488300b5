"""Do a shapes model's levels show one image, how grainy is each level's flat background, and how often is the
sample what was asked for, under each of the sampling settings that shape this?

Run from the repository root on a quiet machine, on any image model of the built-in `shapes` (class or text):

    .venv/bin/python benchmarks/level_agreement.py --model runs/demo/final [--num 96] [--steps 25] [--guidance G]
        [--guidance-interval LO HI] [--rows 6 7]

One row per setting, each adding one choice to the row above: deterministic DDIM guiding every level, then level
projection, then guidance on the lowest level only (`guided_levels`), then DDIM with fresh noise per step (`eta` 1),
then the grid uniform in logSNR (`spacing`) in place of the reference grid, then DDIM's noise at its cap
(`renoise`: every step re-noises the x0 estimate afresh), then no guidance where the lowest level's logSNR is above 5
(`guidance_interval`, t < ~50 on the cosine schedule; `--guidance-interval LO HI` sets another). The rows before
it guide every step, whatever the model's default interval.
Columns: the shapes oracle's accuracy at the top level (`mdm eval --oracle`'s), the cross-level PSNR (every lower
level against the top level taken down by the model's pyramid, as `mdm eval` reports it), and per level the grain:
the standard deviation of the pixels inside each corner patch of an eighth of the side (the shapes' background
there is flat), on [0, 1], averaged over corners and samples, next to the same for the data's images at that level.
"""

from __future__ import annotations

import argparse
import math

import torch

from mdm import MDMPipeline
from mdm.data.shapes import ShapesDataset
from mdm.eval.levels import consistency_mse, pool_levels, psnr
from mdm.eval.oracle import accuracy, load_or_train_oracle

EVAL_SEED = 12345  # held-out scenes
EVERY_STEP = (-math.inf, math.inf)
SETTINGS = [
    (
        "ddim, every level guided",
        dict(sampler="ddim", eta=0.0, level_projection=False, guided_levels="all", spacing="mlmdm"),
    ),
    ("+ level projection", dict(sampler="ddim", eta=0.0, level_projection=True, guided_levels="all", spacing="mlmdm")),
    (
        "+ lowest level guided",
        dict(sampler="ddim", eta=0.0, level_projection=True, guided_levels="lowest", spacing="mlmdm"),
    ),
    ("+ eta 1", dict(sampler="ddim", eta=1.0, level_projection=True, guided_levels="lowest", spacing="mlmdm")),
    (
        "+ logsnr spacing",
        dict(sampler="ddim", eta=1.0, level_projection=True, guided_levels="lowest", spacing="logsnr"),
    ),
    (
        "+ renoise (eta at its cap)",
        dict(sampler="renoise", eta=0.0, level_projection=True, guided_levels="lowest", spacing="logsnr"),
    ),
]
SETTINGS = [(name, dict(choice, guidance_interval=EVERY_STEP)) for name, choice in SETTINGS]
SETTINGS.append(("+ no guidance at logSNR > 5", dict(SETTINGS[-1][1], guidance_interval=(-math.inf, 5.0))))
SETTING = 28  # width of the setting column


def grain(images: torch.Tensor) -> float:
    """Mean standard deviation (on [0, 1]) in the four corner patches of side // 8 (at least 2) of N C S S images."""
    k = max(2, images.shape[-1] // 8)
    corners = [images[..., :k, :k], images[..., :k, -k:], images[..., -k:, :k], images[..., -k:, -k:]]
    return float(torch.stack([c.flatten(-2).std(-1).mean() for c in corners]).mean() / 2)


def main() -> None:
    """Sample the model under every setting and print one row each, after the data's row."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory of a shapes model")
    p.add_argument("--num", type=int, default=96, help="samples per setting (the classes round-robin)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: train.sample_guidance)")
    p.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="the last row's interval of the lowest level's logSNR where guidance applies (default: -inf 5)",
    )
    p.add_argument("--threads", type=int, default=2)
    rows = range(1, len(SETTINGS) + 1)
    p.add_argument("--rows", type=int, nargs="+", default=list(rows), choices=rows, help="settings rows, 1 = first")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pipe = MDMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    sizes = pipe.config.model.level_sizes()
    d = pipe.config.data
    data = ShapesDataset(sizes[0], shapes=d.shapes, colors=d.colors, seed=EVAL_SEED)
    scenes = [data[i] for i in range(args.num)]
    request = (
        {"prompt": [s["caption"] for s in scenes]}
        if pipe.config.model.text_dim
        else {"class_labels": [i % len(data.class_names) for i in range(args.num)]}
    )
    real = pool_levels(torch.stack([s["image"] for s in scenes]).float(), sizes)

    oracle = load_or_train_oracle(sizes[0], d.shapes, d.colors)
    labels = torch.tensor([s["label"] for s in scenes] if pipe.config.model.text_dim else request["class_labels"])

    head = (
        "setting".ljust(SETTING)
        + f" {'accuracy':>9} {'level PSNR dB':>13}"
        + "".join(f" {f'grain {s}px':>11}" for s in sizes)
    )
    print(head)
    print("data".ljust(SETTING) + f" {'':>9} {'inf':>13}" + "".join(f" {grain(level):>11.4f}" for level in real))
    for r in args.rows:
        name, choice = SETTINGS[r - 1]
        if r == len(SETTINGS) and args.guidance_interval is not None:
            choice = dict(choice, guidance_interval=tuple(args.guidance_interval))
        out = pipe(
            **request,
            **choice,
            num_inference_steps=args.steps,
            guidance_scale=pipe.config.train.sample_guidance if args.guidance is None else args.guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
        hits = accuracy(oracle, out.levels[0], labels)
        agreement = psnr(consistency_mse(out.levels).mean()).item()
        cells = f" {100 * hits:>8.1f}% {agreement:>13.2f}" + "".join(
            f" {grain(lv.float()):>11.4f}" for lv in out.levels
        )
        print(name.ljust(SETTING) + cells)


if __name__ == "__main__":
    main()
