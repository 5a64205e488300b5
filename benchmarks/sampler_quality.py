"""How many network calls does a shapes model need? Oracle FD and class accuracy against NFE per sampler and spacing.

Run from the repository root on a quiet machine (after `make demo`, or with --train to train the demo preset first):

    .venv/bin/python benchmarks/sampler_quality.py [--model runs/demo/final] [--num 96] [--nfe 5 10 15 20 25 50]
        [--samplers ...] [--spacings ...] [--spaced-samplers ...] [--out runs/sampler_quality] [--quick]

Every sampler runs on every spacing at each NFE (Heun at N steps makes 2N - 1 calls, so it gets (NFE + 1) / 2
steps; the logsnr and karras grids can merge steps of the capped cosine schedule, so their real NFE is recorded).
The reference is DDPM with 250 steps on the reference grid. All runs share the model's guidance scale
(train.sample_guidance), the class round-robin and the noise of sample i (seeded by i), and are scored by the
cached 32 px shapes oracle. Prints a markdown table and writes `results.json` and `sampler_quality.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure

from mdm import MDMPipeline
from mdm.config import load_preset
from mdm.diffusion.samplers import SAMPLERS
from mdm.diffusion.schedule import SPACINGS
from mdm.eval import evaluate_model, load_or_train_oracle
from mdm.plots import save_figure
from mdm.train.trainer import Trainer


def score(pipe: MDMPipeline, oracle: object, args: argparse.Namespace, sampler: str, spacing: str, steps: int) -> dict:
    """Oracle FD, accuracy and the real NFE of `args.num` samples."""
    start = time.perf_counter()
    report = evaluate_model(
        pipe,
        args.num,
        oracle=oracle,
        steps=steps,
        sampler=sampler,
        spacing=spacing,
        batch_size=args.batch_size,
        progress=False,
    )
    o = report.oracle
    return {
        "sampler": sampler,
        "spacing": spacing,
        "steps": steps,
        "nfe": report.settings["nfe"],
        "fd": o.fd,
        "accuracy": o.accuracy,
        "floor": o.floor,
        "seconds": time.perf_counter() - start,
    }


def table(rows: list[dict], reference: dict, nfes: list[int]) -> str:
    """Markdown: one row per sampler and spacing, one column per NFE, 'FD (accuracy)' in each cell."""
    lines = [
        "| sampler | spacing | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|---|" + "---:|" * len(nfes),
        f"| ddpm (reference) | mlmdm | {reference['fd']:.2f} ({100 * reference['accuracy']:.0f}%) "
        f"at NFE {reference['nfe']} |" + " |" * (len(nfes) - 1),
    ]
    for sampler, spacing in dict.fromkeys((r["sampler"], r["spacing"]) for r in rows):
        cells = {r["nfe_target"]: r for r in rows if (r["sampler"], r["spacing"]) == (sampler, spacing)}
        text = [
            f"{cells[n]['fd']:.2f} ({100 * cells[n]['accuracy']:.0f}%)"
            + ("" if cells[n]["nfe"] == n else f" [{cells[n]['nfe']}]")
            if n in cells
            else "-"
            for n in nfes
        ]
        lines.append(f"| {sampler} | {spacing} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], reference: dict, path: Path) -> Path:
    """Oracle FD against NFE: a line per sampler (colour) and spacing (style), the DDPM-250 reference and floor."""
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.subplots()
    styles = dict(zip(SPACINGS, ["-", "--", ":", "-."], strict=True))
    for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
        for spacing in dict.fromkeys(r["spacing"] for r in rows if r["sampler"] == sampler):
            pts = sorted((r["nfe"], r["fd"]) for r in rows if (r["sampler"], r["spacing"]) == (sampler, spacing))
            ax.plot(
                *zip(*pts, strict=True),
                color=f"C{i % 10}",
                ls=styles[spacing],
                marker=".",
                lw=1.2,
                label=f"{sampler} / {spacing}",
            )
    ax.axhline(reference["fd"], color="black", lw=1.5, label=f"ddpm {reference['nfe']} steps")
    ax.axhline(1.1 * reference["fd"], color="black", lw=0.8, ls=":", label="+10 %")
    ax.axhline(reference["floor"], color="gray", lw=1, ls="--", label="real vs real floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network calls (NFE)")
    ax.set_ylabel("oracle Fréchet distance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/demo/final", help="a trained shapes model directory")
    p.add_argument("--train", action="store_true", help="train the demo preset into runs/sampler_quality/model first")
    p.add_argument("--num", type=int, default=96, help="samples per point")
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 15, 20, 25, 50, 100])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--spacings", nargs="+", default=list(SPACINGS), choices=list(SPACINGS))
    p.add_argument(
        "--spaced-samplers",
        nargs="+",
        default=None,
        choices=list(SAMPLERS),
        help="only these samplers get the spacings past the first two (default: every sampler)",
    )
    p.add_argument("--reference-steps", type=int, default=250)
    p.add_argument("--out", default="runs/sampler_quality")
    p.add_argument("--quick", action="store_true", help="smoke test: 16 samples, NFE 4 and 8, two samplers")
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.batch_size, args.nfe, args.reference_steps = 16, 16, [4, 8], 20
        args.samplers, args.spacings = ["ddim", "dpmpp_2m"], ["mlmdm", "trailing"]
    out = Path(args.out)
    model = Path(args.model)
    if args.train:
        model = Trainer(load_preset("demo"), out / "train").fit()
    pipe = MDMPipeline.from_pretrained(model)
    m, d = pipe.config.model, pipe.config.data
    oracle = load_or_train_oracle(m.image_size, d.shapes, d.colors)
    print(f"model {model} ({'/'.join(map(str, m.level_sizes()))} px); oracle accuracy {100 * oracle.accuracy:.2f}%")

    reference = score(pipe, oracle, args, "ddpm", "mlmdm", args.reference_steps)
    print(
        f"reference ddpm {args.reference_steps} steps: FD {reference['fd']:.3f}, accuracy {reference['accuracy']:.3f}"
    )
    rows = []
    spaced = set(args.spaced_samplers or args.samplers)
    for sampler in args.samplers:
        for spacing in [s for i, s in enumerate(args.spacings) if i < 2 or sampler in spaced]:
            for nfe in args.nfe:
                steps = (nfe + 1) // 2 if sampler == "heun" else nfe
                row = {**score(pipe, oracle, args, sampler, spacing, steps), "nfe_target": nfe}
                rows.append(row)
                print(
                    f"  {sampler:13s} {spacing:9s} NFE {row['nfe']:4d}: FD {row['fd']:.3f}, acc {row['accuracy']:.3f}"
                )
    print(table(rows, reference, args.nfe))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"reference": reference, "rows": rows, "args": vars(args)}, indent=1))
    print(f"plot: {plot(rows, reference, out / 'sampler_quality.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
