"""The training log: averages since the last record written to `log.jsonl` (and TensorBoard when installed),
and the repair a resumed run needs (records past its checkpoint dropped). Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from mdm import io


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; a line torn by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def level_label(level: int | list[int]) -> str:
    """A level as logs and plots name it: '16px', or '8x16px' (frames x side) in a video run."""
    return f"{level}px" if isinstance(level, int) else f"{level[0]}x{level[1]}px"


def level_labels(record: dict) -> list[str]:
    """A log record's levels, highest first (its 'level_shapes' in a video run, else its 'level_sizes')."""
    return [level_label(lv) for lv in record.get("level_shapes", record["level_sizes"])]


class TrainLog:
    """Accumulates per-step statistics and writes one averaged record every `write` call."""

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.path = run_dir / "log.jsonl"
        self.run_dir, self.is_main = run_dir, is_main
        self._tensorboard: object | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new averaging window (and its clock)."""
        self._t0 = time.perf_counter()
        self._n, self._loss, self._norm, self._levels = 0, 0.0, 0.0, None
        self._images, self._lr = 0, 0.0

    def add(self, stats: torch.Tensor | None, images: int, lr: float) -> None:
        """One step: `stats` = [loss, per-level losses..., grad norm] averaged over ranks, or None if skipped."""
        self._images += images
        self._lr = lr
        if stats is not None:
            self._n += 1
            self._loss += float(stats[0])
            self._norm += float(stats[-1])
            levels = stats[1:-1].cpu()
            self._levels = levels if self._levels is None else self._levels + levels

    def write(self, step: int, phase: int, levels: list, nonfinite: int, bad_samples: int) -> dict:
        """Append the window's averages as one record; returns it (every rank, only rank 0 writes). `levels` as
        `phases.level_record` gives them: sides, or [frames, side] in a video run (then also 'level_shapes')."""
        elapsed = time.perf_counter() - self._t0
        video = bool(levels) and isinstance(levels[0], list)
        record = {
            "step": step,
            "phase": phase,
            "level_sizes": [lv[1] for lv in levels] if video else levels,
            **({"level_shapes": levels} if video else {}),
            "lr": self._lr,
            "images_per_s": self._images / elapsed if elapsed > 0 else 0.0,
            "nonfinite_skipped": nonfinite,
            "bad_samples": bad_samples,
        }
        if self._n:
            record["loss"] = self._loss / self._n
            record["level_loss"] = (self._levels / self._n).tolist()
            record["grad_norm"] = self._norm / self._n
        self.reset()
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self._to_tensorboard(record)
        return record

    def _to_tensorboard(self, record: dict) -> None:
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self._tensorboard = False
        if self._tensorboard:
            for key in ("loss", "lr", "images_per_s", "grad_norm"):
                if key in record:
                    self._tensorboard.add_scalar(f"train/{key}", record[key], record["step"])

    def truncate(self, step: int) -> None:
        """Drop records written after `step` (a crash after the checkpoint being resumed leaves them behind)."""
        if self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= step]
            io.write_text(self.path, "".join(line + "\n" for line in keep))

    def remove(self) -> None:
        """A fresh run starts a new log."""
        self.path.unlink(missing_ok=True)
