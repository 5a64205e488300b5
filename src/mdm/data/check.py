"""`mdm data check`: what a training folder holds and every sample that cannot be used, before a run starts."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from tqdm.auto import tqdm

from mdm.data.folder import BadSample, FolderDataset, ReadOptions, load_image

SIDE_BINS = (64, 128, 256, 512, 1024)


@dataclass
class Report:
    """Counts, the shorter-side histogram, caption word counts and the problems of a dataset."""

    root: Path
    layout: str
    samples: int = 0
    classes: Counter = field(default_factory=Counter)
    sides: Counter = field(default_factory=Counter)
    words: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as printable lines."""
        usable = self.samples - len(self.problems)
        out = [
            f"{self.root}: {self.layout}",
            f"samples: {self.samples}, usable: {usable}, problems: {len(self.problems)}",
        ]
        if self.classes:
            out.append(
                f"classes ({len(self.classes)}): " + ", ".join(f"{k}: {v}" for k, v in sorted(self.classes.items()))
            )
        labels = [f"<{SIDE_BINS[0]}"] + [f"{a}-{b - 1}" for a, b in pairwise(SIDE_BINS)]
        labels.append(f">={SIDE_BINS[-1]}")
        out.append("shorter side: " + ", ".join(f"{lab}: {self.sides.get(i, 0)}" for i, lab in enumerate(labels)))
        if self.words:
            out.append(
                f"captions: {len(self.words)} with text, words min {min(self.words)} / median "
                f"{statistics.median(self.words):g} / max {max(self.words)}"
            )
        else:
            out.append("captions: none")
        out.extend(f"problem: {p}" for p in self.problems)
        return out


def check_folder(root: str | Path, min_size: int = 0, max_pixels: int = 89_478_485, progress: bool = True) -> Report:
    """Open every sample of an image folder the way training would and report what is there."""
    ds = FolderDataset(root, ReadOptions(max(1, min_size), max_pixels=max_pixels))
    layout = (
        "metadata.jsonl"
        if (ds.root / "metadata.jsonl").is_file()
        else f"class folders ({ds.num_classes} classes)"
        if ds.class_names
        else "flat folder with sidecar captions"
    )
    report = Report(ds.root, layout, samples=len(ds))
    for path, caption, label in tqdm(ds.items, desc="check", disable=not progress):
        if ds.class_names and label >= 0:
            report.classes[ds.class_names[label]] += 1
        if caption:
            report.words.append(len(caption.split()))
        try:
            image = load_image(path, ds.options.smallest, max_pixels)
        except BadSample as e:
            report.problems.append(str(e))
            continue
        except FileNotFoundError:
            report.problems.append(f"{path}: listed but missing")
            continue
        report.sides[sum(min(image.size) >= b for b in SIDE_BINS)] += 1
    return report
