"""Plots people look at after a run: the training loss per level across progressive phases."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from mdm import io
from mdm.train.log import level_labels


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
    labels = [level_labels(r) for r in records]
    for label in dict.fromkeys(lv for ls in sorted(labels, key=len, reverse=True) for lv in ls):
        pts = [
            (r["step"], r["level_loss"][ls.index(label)]) for r, ls in zip(records, labels, strict=True) if label in ls
        ]
        ax.plot(*zip(*pts, strict=True), lw=1.0, label=f"{label} level")
    start = 0
    for phase in sorted({r["phase"] for r in records}):
        in_phase = [r["step"] for r in records if r["phase"] == phase]
        end = max(in_phase)
        ax.axvspan(start, end, color=f"C{phase}", alpha=0.07, lw=0)
        levels = next(ls for r, ls in zip(records, labels, strict=True) if r["phase"] == phase)
        ax.text(
            start,
            1.0,
            f" phase {phase}: {'/'.join(lv.removesuffix('px') for lv in levels)}px",
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
