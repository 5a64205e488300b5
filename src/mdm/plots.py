"""Plots people look at after a run: the training loss per level across progressive phases."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from mdm import io


def read_log(path: str | Path) -> list[dict]:
    """The records of a `log.jsonl`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_curve(log: str | Path, out: str | Path) -> Path:
    """Total and per-level training loss against step (log scale), one shade per phase, as a PNG."""
    records = [r for r in read_log(log) if "loss" in r]
    if not records:
        raise ValueError(f"{log}: no loss records to plot")
    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.subplots()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], color="black", lw=1.6, label="total")
    sizes = sorted({s for r in records for s in r["level_sizes"]}, reverse=True)
    for size in sizes:
        pts = [(r["step"], r["level_loss"][r["level_sizes"].index(size)]) for r in records if size in r["level_sizes"]]
        ax.plot(*zip(*pts, strict=True), lw=1.0, label=f"{size}px level")
    start = 0
    for phase in sorted({r["phase"] for r in records}):
        in_phase = [r["step"] for r in records if r["phase"] == phase]
        end = max(in_phase)
        ax.axvspan(start, end, color=f"C{phase}", alpha=0.07, lw=0)
        levels = next(r["level_sizes"] for r in records if r["phase"] == phase)
        ax.text(
            start,
            1.0,
            f" phase {phase}: {'/'.join(map(str, levels))}px",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
        )
        start = end
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig: Figure, out: str | Path) -> Path:
    """Write a figure as PNG, atomically (a pyplot-free Figure: no global backend switch)."""
    with io.atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out)
