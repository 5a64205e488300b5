"""`mdm data check`: what a folder, tar shards or an ml-mdm TSV hold and every unusable sample, before a run starts."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from tqdm.auto import tqdm

from mdm.data.folder import IMAGE_SUFFIXES, BadSample, FolderDataset, ReadOptions, load_image
from mdm.data.shards import ShardDataset

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


def is_image_folder(path: Path) -> bool:
    """A directory is read as an image folder unless it holds `.tar` shards and no images."""
    if not path.is_dir():
        return False
    has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))
    return has_images or (path / "metadata.jsonl").is_file() or not any(path.glob("*.tar"))


def check_data(path: str | Path, min_size: int = 0, max_pixels: int = 89_478_485, progress: bool = True) -> Report:
    """Open every sample of an image folder, tar shards or an ml-mdm TSV the way training would and report it.

    `path` is an image folder, or anything `data.path` accepts for shards (.tar, directory, glob, brace pattern, .tsv).
    """
    options = ReadOptions(max(1, min_size), max_pixels=max_pixels)
    ds = FolderDataset(path, options) if is_image_folder(Path(path)) else ShardDataset(str(path), options)
    report = Report(Path(path), ds.layout, samples=len(ds))
    for index in tqdm(range(len(ds)), desc="check", disable=not progress):
        name, caption, label = ds.describe(index)
        if ds.class_names and label >= 0:
            report.classes[ds.class_names[label]] += 1
        if caption:
            report.words.append(len(caption.split()))
        try:
            image = load_image(name, ds.options.smallest, max_pixels, data=ds.read(index))
        except BadSample as e:
            report.problems.append(str(e))
            continue
        report.sides[sum(min(image.size) >= b for b in SIDE_BINS)] += 1
    return report
