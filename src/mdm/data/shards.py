"""Tar shards in the img2dataset / WebDataset layout, read by random access, and `mdm data pack`.

A sample is the set of members sharing a key: `key.jpg|jpeg|png|webp` (the image), `key.txt` (caption),
`key.json` (a 'caption' or 'text' field, used when there is no .txt) and `key.cls` (an integer label).
Shards are named by local paths, directories (every `*.tar` in them), globs, or brace patterns such as
`data/{000000..000099}.tar`. Each shard is indexed once (member offsets), so any sample can be read
directly and the trainer's global shuffling and resumable positions apply unchanged.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from pathlib import Path

from mdm.data.folder import BadSample, FolderDataset, ImageDataset, ReadOptions

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a{1..3}b` -> a1b a2b a3b (zero padding kept), `{x,y}` -> x y; nested and repeated braces expand."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    if ".." in body:
        lo, hi = body.split("..", 1)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [expanded for opt in options for expanded in expand_braces(head + opt + tail)]


def shard_paths(spec: str) -> list[Path]:
    """The shard files named by a path, directory, glob or brace pattern (sorted, each existing)."""
    out: list[Path] = []
    for item in expand_braces(spec):
        path = Path(item)
        if path.is_dir():
            out.extend(sorted(path.glob("*.tar")))
        elif any(c in item for c in "*?["):
            out.extend(Path(p) for p in sorted(glob.glob(item)))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"data.path: shard {path} does not exist")
    if not out:
        raise FileNotFoundError(f"data.path: no .tar shards match {spec!r}")
    return out


def _index(shard: Path) -> list[dict]:
    """Samples of one shard: key -> {ext: (offset, size)}, in member order."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = os.path.splitext(member.name)
                samples.setdefault(key, {"key": key, "shard": shard})[ext.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{shard}: not a readable tar shard ({e})") from None
    return list(samples.values())


class ShardDataset(ImageDataset):
    """Images with captions and labels from tar shards; unusable samples are replaced and counted as in folders."""

    def __init__(self, spec: str, options: ReadOptions) -> None:
        self.shards = shard_paths(spec)
        self.options = options
        self.items = [s for shard in self.shards for s in _index(shard)]
        if not self.items:
            raise ValueError(f"data.path: the shards {spec!r} hold no samples")
        self._files: dict[Path, object] = {}
        labels = [self._read_label(s) for s in self.items]
        top = max(labels)
        self.class_names = [str(i) for i in range(top + 1)] if top >= 0 else []

    def _bytes(self, sample: dict, ext: str) -> bytes | None:
        if ext not in sample:
            return None
        handle = self._files.get(sample["shard"])
        if handle is None:
            handle = self._files[sample["shard"]] = open(sample["shard"], "rb")  # noqa: SIM115 (kept open per worker)
        offset, size = sample[ext]
        handle.seek(offset)
        return handle.read(size)

    def _read_label(self, sample: dict) -> int:
        raw = self._bytes(sample, ".cls")
        try:
            return int(raw.decode().strip()) if raw else -1
        except ValueError:
            return -1

    def _caption(self, sample: dict) -> str | None:
        text = self._bytes(sample, ".txt")
        if text is not None:
            return text.decode("utf-8", errors="replace").strip()
        meta = self._bytes(sample, ".json")
        if meta is not None:
            try:
                row = json.loads(meta)
                return row.get("caption") or row.get("text")
            except (ValueError, AttributeError):
                return None
        return None

    @property
    def num_classes(self) -> int:
        """Number of classes found in `.cls` members (0 without labels)."""
        return len(self.class_names)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def load(self, index: int) -> dict:
        """Sample `index` or BadSample."""
        sample = self.items[index]
        name = f"{sample['shard']}:{sample['key']}"
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BadSample(f"{name}: no image member ({'/'.join(IMAGE_EXTS)})")
        data = self._bytes(sample, ext)
        return self.sample(name + ext, self._caption(sample), self._read_label(sample), index, data=data)


def pack(folder: str | Path, out: str | Path, shard_size: int = 1000) -> list[Path]:
    """Write an image folder as WebDataset shards `out/shard-NNNNNN.tar` (original bytes, .txt, .cls)."""
    ds = FolderDataset(folder, ReadOptions(1))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for first in range(0, len(ds.items), shard_size):
        path = out / f"shard-{first // shard_size:06d}.tar"
        tmp = path.with_name(f".{path.name}.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i, (src, caption, label) in enumerate(ds.items[first : first + shard_size], start=first):
                key = f"{i:09d}"
                members = [(src.suffix.lower(), src.read_bytes())]
                if caption:
                    members.append((".txt", caption.encode()))
                if label >= 0:
                    members.append((".cls", str(label).encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(key + ext)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.replace(path)
        written.append(path)
    return written
