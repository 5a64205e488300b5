"""`mdm data check`: what a folder, a video folder, tar shards or an ml-mdm TSV hold and every unusable sample, before
a run starts."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from tqdm.auto import tqdm

from mdm.data.folder import BadSample, FolderDataset, ReadOptions, image_files, load_image, require_int
from mdm.data.shards import ShardDataset
from mdm.data.video import VideoFolderDataset

SIDE_BINS = (64, 128, 256, 512, 1024)


@dataclass
class Report:
    """Counts, the shorter-side histogram, caption word counts, frames per clip (video folders) and the problems of
    a dataset.

    `class_names` are the dataset's classes (what training uses); `classes` counts the samples of each."""

    root: Path
    layout: str
    samples: int = 0
    class_names: list[str] = field(default_factory=list)
    classes: Counter = field(default_factory=Counter)
    sides: Counter = field(default_factory=Counter)
    words: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as printable lines."""
        usable = self.samples - len(self.problems)
        out = [
            f"{self.root}: {self.layout}",
            f"samples: {self.samples}, usable: {usable}, problems: {len(self.problems)}",
        ]
        if self.class_names:
            counts = ", ".join(f"{name}: {self.classes[name]}" for name in self.class_names)
            out.append(f"classes ({len(self.class_names)}): {counts}")
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
        if self.frames:
            out.append(
                f"frames per usable clip: min {min(self.frames)} / median {statistics.median(self.frames):g} / "
                f"max {max(self.frames)}"
            )
        out.extend(f"problem: {p}" for p in self.problems)
        return out


def is_image_folder(path: Path) -> bool:
    """A directory is read as an image folder unless it holds `.tar` shards and no images."""
    if not path.is_dir():
        return False
    return (path / "metadata.jsonl").is_file() or not any(path.glob("*.tar")) or bool(image_files(path))


def check_data(
    path: str | Path,
    min_size: int = 0,
    max_pixels: int = 89_478_485,
    progress: bool = True,
    num_frames: int | None = None,
    frame_stride: int = 1,
) -> Report:
    """Open every sample of an image folder, tar shards, an ml-mdm TSV or (with `num_frames`) a video folder the way
    training would and report it.

    `path` is an image folder, or anything `data.path` accepts for shards (.tar, directory, glob, brace pattern, .tsv);
    with `num_frames` it is a video folder whose clips must give `num_frames` frames `frame_stride` apart (shorter
    clips are problems). A malformed dataset raises DataError (a ValueError) naming the file; unusable samples are
    the report's problems.
    """
    options = ReadOptions(
        max(1, require_int(min_size, "min_size", 0)), max_pixels=require_int(max_pixels, "max_pixels", 1)
    )
    if num_frames is not None:
        ds = VideoFolderDataset(path, options, num_frames, frame_stride)
    elif is_image_folder(Path(path)):
        ds = FolderDataset(path, options)
    else:
        ds = ShardDataset(str(path), options)
    report = Report(Path(path), ds.layout, samples=len(ds), class_names=list(ds.class_names))
    for index in tqdm(range(len(ds)), desc="check", disable=not progress):
        try:
            name, caption, label = ds.describe(index)
            if label >= 0:
                report.classes[ds.class_names[label]] += 1
            if caption:
                report.words.append(len(caption.split()))
            if isinstance(ds, VideoFolderDataset):
                frames, count = ds.frames(index)
                report.frames.append(count)
                image = frames[0]
            else:
                image = load_image(name, ds.options.smallest, max_pixels, ds.read(index))
        except BadSample as e:
            report.problems.append(str(e))
            continue
        report.sides[sum(min(image.size) >= b for b in SIDE_BINS)] += 1
    return report
