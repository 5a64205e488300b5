"""Nested progressive MDM against a single-level UNet at equal wall-clock, scored by the shapes oracle.

Run from the repository root on a quiet machine:

    .venv/bin/python benchmarks/study_nesting.py [--minutes 3] [--seeds 0 1 2] [--evals 6] [--num 240]
        [--out runs/study_nesting] [--threads N] [--quick]

For each seed it trains (a) the demo preset's MDM (a 16 px base phase, then the 32/16 nested phase) and (b) a
single-level 32 px UNet of about the same size and step cost (same conditioning, optimiser and EMA), each for the
same training time, stopped on the clock (`Trainer.fit(max_seconds=...)`). A short calibration measures seconds per
step of every phase, which sets each phase's length (the MDM keeps the preset's step ratio; the last phase is planned
half again longer than the budget, so the clock ends it; a run that ends on its step count instead is marked in the
tables). At `--evals` equally spaced points of the budget the clock stops and
`--num` EMA samples (round-robin classes, the preset's sampling settings) are scored by the oracle: Fréchet
distance in its feature space and class accuracy. MDM points that fall in its base phase are skipped (it has no
32 px model yet). Prints a markdown table (then mean ± std over seeds at the end) and writes `results.json` and
`study.png` (oracle FD against training time) under `--out`.

The single-level baseline gets the schedule MDM's 32 px level has: the cosine SNR shifted as if relative to a 16 px
base (`diffusion.shift_base_size=16`: SNR / 2 with the preset's shift_power 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from mdm.config import MDMConfig, load_preset, to_dict
from mdm.eval import evaluate_model, load_or_train_oracle, train_oracle
from mdm.eval.oracle import Oracle
from mdm.plots import save_figure
from mdm.train.trainer import Trainer

SINGLE_UNET = (
    "{channels: [32, 64, 96, 128], num_res_blocks: [1], attention_levels: [3], num_attention_layers: [1], "
    "attention_ffn: true, temb_dim: 256, mid_blocks: true, text_proj_dim: 128, masked_cross_attention: true, "
    "micro_conditioning: {scale: 32}}"
)
MODELS = {"mdm": "MDM 32/16 (nested, progressive)", "single": "single-level 32 px UNet (shifted schedule)"}
CALIBRATION_STEPS = 20
OVERRUN = 1.5  # the last phase's planned length over the calibrated one: the clock ends it first


@dataclass(frozen=True)
class Point:
    """Evaluation point k of a model and seed, after `seconds` of training (`steps` optimizer steps)."""

    model: str
    seed: int
    k: int
    seconds: float
    steps: int
    fd: float
    accuracy: float
    floor: float
    on_clock: bool  # the clock stopped training here, not the end of the last phase


def base_config(model: str, seed: int, quick: bool) -> MDMConfig:
    """The demo preset (MDM) or its single-level 32 px counterpart, seeded; quick runs use batch 4 and 2 DDIM steps."""
    overrides = [f"train.seed={seed}", f"data.seed={seed}", "train.sample_count=0", "train.checkpoint_every=0"]
    if quick:
        overrides += ["train.batch_size=4", "train.sample_steps=2"]
    if model == "single":
        overrides += [
            f"model.unet={SINGLE_UNET}",
            "train.phases=[{levels: 1, steps: 850}]",
            "diffusion.shift_base_size=16",
        ]
    return load_preset("demo", overrides)


def seconds_per_step(cfg: MDMConfig, workdir: Path) -> list[float]:
    """Training seconds per step of every phase: one untimed step entering the phase, then CALIBRATION_STEPS."""
    probe = copy.deepcopy(cfg)
    n = CALIBRATION_STEPS + 2
    # A phase frozen whole steps faster (its inner is fixed: no backward through it), so it is calibrated frozen.
    probe.train.phases = [
        replace(ph, steps=n, freeze_inner_steps=n if ph.freeze_inner_steps == ph.steps else 0)
        for ph in probe.train.phases
    ]
    shutil.rmtree(workdir, ignore_errors=True)
    trainer = Trainer(probe, workdir, progress=False)
    times, end = [], 0
    for _ in probe.train.phases:
        trainer.fit(end + 1)
        start = time.perf_counter()
        trainer.fit(end + 1 + CALIBRATION_STEPS)
        times.append((time.perf_counter() - start) / CALIBRATION_STEPS)
        end += n
    shutil.rmtree(workdir)
    return times


def plan(cfg: MDMConfig, budget: float, per_step: list[float]) -> MDMConfig:
    """Phase lengths that fill `budget` seconds at the measured step costs, keeping the phases' step ratio; the
    last phase is planned OVERRUN times longer so that the clock, not the step count, ends the run."""
    phases = cfg.train.phases
    scale = budget / sum(ph.steps * s for ph, s in zip(phases, per_step, strict=True))
    for i, ph in enumerate(phases):
        steps = max(2, round(ph.steps * scale * (OVERRUN if i == len(phases) - 1 else 1)))
        ph.freeze_inner_steps = min(steps, round(ph.freeze_inner_steps * steps / ph.steps))
        ph.steps = steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, min(ph.steps for ph in phases) // 4))
    return cfg.validate("study plan")


def train_and_score(
    model: str, seed: int, args: argparse.Namespace, oracle: Oracle, out: Path
) -> tuple[list[Point], dict]:
    """Calibrate, plan and train one model on the clock, pausing at each evaluation time to score N EMA samples.

    Evaluation point k stops the clock at k / evals of the budget; points that fall in the MDM's base phase
    are skipped (it has no top-level output yet). Sampling and scoring are not counted as training time."""
    cfg = base_config(model, seed, args.quick)
    per_step = seconds_per_step(cfg, out / f"calibrate-{model}-{seed}")
    budget = args.minutes * 60
    cfg = plan(cfg, budget, per_step)
    trainer = Trainer(cfg, out / f"{model}-seed{seed}", progress=False)
    points, seconds = [], 0.0
    for k in range(1, args.evals + 1):
        start = time.perf_counter()
        trainer.fit(max_seconds=budget * k / args.evals - seconds)
        seconds += time.perf_counter() - start
        if trainer.phase.index < len(cfg.train.phases) - 1:
            continue
        pipe = trainer.ema_pipeline()
        report = evaluate_model(
            pipe,
            args.num,
            oracle=oracle,
            steps=cfg.train.sample_steps,
            guidance=cfg.train.sample_guidance,
            batch_size=args.batch_size,
            progress=not args.quick,
        )
        o, step = report.oracle, trainer.state.step
        on_clock = step < trainer.total_steps
        points.append(Point(model, seed, k, seconds, step, o.fd, o.accuracy, o.floor, on_clock))
        ended = "" if on_clock else " (ended on its step count, before the clock)"
        print(
            f"  {model} seed {seed}: {seconds:7.1f} s, step {step}{ended}: "
            f"oracle FD {o.fd:.4f}, accuracy {o.accuracy:.3f}"
        )
    params = sum(p.numel() for p in trainer.phase.net.parameters())
    info = {"params": params, "seconds_per_step": per_step, "phases": to_dict(cfg.train)["phases"]}
    return points, info


def mean_std(values: list[float], digits: int = 4) -> str:
    """'mean ± std' (population std; 0 for one value)."""
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def table(points: list[Point]) -> str:
    """Every evaluation as a markdown row, then each model's final points as mean ± std over seeds."""
    rows = [
        "| model | seed | time (s) | steps | on the clock | oracle FD | accuracy |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    rows += [
        f"| {p.model} | {p.seed} | {p.seconds:.1f} | {p.steps} | {'yes' if p.on_clock else 'no'} | {p.fd:.4f} | "
        f"{100 * p.accuracy:.1f}% |"
        for p in points
    ]
    rows += [
        "",
        "| model (final) | seeds | on the clock | time (s) | steps | oracle FD | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in MODELS:
        last = [
            max((p for p in points if p.model == model and p.seed == s), key=lambda p: p.steps) for s in seeds(points)
        ]
        rows.append(
            f"| {model} | {len(last)} | {sum(p.on_clock for p in last)} | "
            f"{statistics.fmean(p.seconds for p in last):.1f} | "
            f"{statistics.fmean(p.steps for p in last):.0f} | {mean_std([p.fd for p in last])} | "
            f"{mean_std([100 * p.accuracy for p in last], 1)} % |"
        )
    floor = statistics.fmean(p.floor for p in points)
    rows.append(f"\nreal-versus-real floor (oracle FD of two real sets of the same size): {floor:.4f}")
    return "\n".join(rows)


def seeds(points: list[Point]) -> list[int]:
    """The seeds present, in order."""
    return sorted({p.seed for p in points})


def plot(points: list[Point], path: Path, title: str) -> Path:
    """Oracle FD against training minutes: a thin line per seed and the mean over seeds per model; the floor."""
    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    ax = fig.subplots()
    for i, (model, label) in enumerate(MODELS.items()):
        runs = [
            sorted((p for p in points if p.model == model and p.seed == s), key=lambda p: p.steps)
            for s in seeds(points)
        ]
        for run in runs:
            ax.plot([p.seconds / 60 for p in run], [p.fd for p in run], color=f"C{i}", lw=0.8, alpha=0.4, marker=".")
        shared = sorted(set.intersection(*({p.k for p in run} for run in runs)))
        at = [[p for run in runs for p in run if p.k == k] for k in shared]
        mean_t = [statistics.fmean(p.seconds for p in group) / 60 for group in at]
        mean_fd = [statistics.fmean(p.fd for p in group) for group in at]
        ax.plot(mean_t, mean_fd, color=f"C{i}", lw=2.2, marker="o", label=f"{label}, mean of {len(runs)}")
    ax.axhline(statistics.fmean(p.floor for p in points), color="gray", ls="--", lw=1, label="real vs real floor")
    ax.set_yscale("log")
    ax.set_xlabel("training time (min, evaluation excluded)")
    ax.set_ylabel("oracle Fréchet distance")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0, help="training time per model and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--evals", type=int, default=6, help="evaluation points, equally spaced over the budget")
    p.add_argument("--num", type=int, default=240, help="samples per evaluation (20 per class)")
    p.add_argument("--batch-size", type=int, default=60, help="samples per sampling call")
    p.add_argument("--out", default="runs/study_nesting", help="output folder (must not hold an earlier study)")
    p.add_argument("--oracle-cache", default=None, help="oracle cache folder (default: $MDM_ORACLE_CACHE or ~/.cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="everything tiny, to check the script in seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.seeds, args.evals, args.num, args.batch_size = 0.05, args.seeds[:2], 2, 12, 12
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "results.json").exists() or any(out.glob("*-seed*")):
        sys.exit(f"{out} already holds a study: remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    size = load_preset("demo").model.image_size
    if args.quick:
        oracle = train_oracle(size, steps=20, progress=False, check_samples=24)
    else:
        oracle = load_or_train_oracle(size, cache_dir=args.oracle_cache)
    print(f"oracle: {size} px, accuracy {100 * oracle.accuracy:.2f}% on held-out real scenes")
    points, runs = [], {}
    for seed in args.seeds:
        for model in MODELS:
            found, runs[f"{model}-seed{seed}"] = train_and_score(model, seed, args, oracle, out)
            points += found
    info = {m: runs[f"{m}-seed{args.seeds[0]}"] for m in MODELS}
    header = ", ".join(
        f"{m}: {info[m]['params'] / 1e6:.2f}M params, "
        + "/".join(f"{s:.3f}" for s in info[m]["seconds_per_step"])
        + " s/step"
        for m in MODELS
    )
    print(f"\n{args.minutes:g} min per run on {torch.get_num_threads()} threads; {header}\n")
    print(table(points))
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "runs": runs, "points": [asdict(p) for p in points]}, indent=2) + "\n"
    )
    title = f"oracle FD, {args.num} samples, {args.minutes:g} min per run, seeds {args.seeds}"
    print(f"\nplot: {plot(points, out / 'study.png', title)}\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
