"""Tar shards read by random access: the img2dataset / WebDataset layout, the Apple ml-mdm TSV layout, `mdm data pack`.

WebDataset: a sample is the set of members sharing a key: `key.jpg|jpeg|png|webp` (the image), `key.txt` (caption),
`key.json` (a 'caption' or 'text' field, used when there is no .txt) and `key.cls` (an integer label >= 0; when any
sample has one, a sample with a missing or malformed one is unusable). Captions are UTF-8; an undecodable one makes
its sample unusable. Shards are named by local paths, directories (every `*.tar` in them whose real path stays inside,
names starting with '.' skipped), globs, or brace patterns such as `data/{000000..000099}.tar`; a `classes.txt`
beside them (line i = the name of label i) names the classes.

ml-mdm: a shard TSV (header `tar`, `file`, `caption`) lists one image member per row with its caption; an index TSV
(header `filename`) lists shard TSVs. Relative paths resolve against the directory of the TSV naming them; a row
whose tar or member is missing is an unusable sample.

Each tar is indexed once (member offsets), so any sample can be read directly and the trainer's global shuffling
and resumable positions apply unchanged.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import BinaryIO, NamedTuple

from mdm.data.folder import (
    IMAGE_SUFFIXES,
    BadSample,
    DataError,
    FolderDataset,
    ImageDataset,
    ReadOptions,
    decode_text,
    json_object,
    parse_class_names,
    require_int,
    verify_image,
)
from mdm.io import atomic_file, write_text

log = logging.getLogger(__name__)

_COMMON = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_EXTS = _COMMON + tuple(sorted(IMAGE_SUFFIXES.difference(_COMMON)))  # a sample's image: the first one present
_BRACE = re.compile(r"\{([^{}]*)\}")
_ZERO_BLOCK = bytes(512)


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
            out.extend(_folder_tars(path))
        elif any(c in item for c in "*?["):
            out.extend(Path(p) for p in sorted(glob.glob(item)))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"data.path: shard {path} does not exist")
    if not out:
        raise FileNotFoundError(f"data.path: no .tar shards match {spec!r}")
    return out


class _Entry(NamedTuple):
    """One sample: its tar, image member and (offset, size) there, label, and where its caption is."""

    tar: Path
    name: str  # the image member (WebDataset: the key when there is no image)
    image: tuple[int, int] | None
    label: int = -1
    caption: str | None = None  # from an ml-mdm TSV row
    text: tuple[int, int] | None = None  # WebDataset .txt member
    meta: tuple[int, int] | None = None  # WebDataset .json member
    problem: str = ""  # why the image or label is unusable
    cls: str | None = None  # WebDataset .cls member


def _read_at(handle: BinaryIO, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of an open tar: every member read (index scan or sample) goes through here."""
    handle.seek(offset)
    return handle.read(size)


class _NeedsTarfile(Exception):
    """A tar header the fast reader does not parse (pax, GNU long names, links, a bad checksum): use tarfile."""


def _octal(field: bytes) -> int:
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:  # base-256 (huge) numbers or not a tar header at all
        raise _NeedsTarfile from None


def _ustar_members(handle: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of the files in a plain ustar tar, parsing only those fields of each header.

    About four times faster than tarfile, which decodes every field; raises _NeedsTarfile for any other header, and
    for an empty or truncated file (so that tarfile names the problem).
    """
    end = os.fstat(handle.fileno()).st_size
    offset = 0
    while offset < end and (block := _read_at(handle, offset, 512)) != _ZERO_BLOCK:
        kind = block[156:157]
        # The checksum counts its own 8-byte field as spaces.
        if (
            len(block) < 512
            or kind not in (b"0", b"\0", b"5")
            or sum(block) - sum(block[148:156]) + 8 * 32 != _octal(block[148:156])
        ):
            raise _NeedsTarfile
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0" and block[345]:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        size = _octal(block[124:136])
        if kind != b"5" and not name.endswith(b"/"):
            yield name.decode("utf-8", "surrogateescape"), offset + 512, size
        offset += 512 + -(-size // 512) * 512
    if end == 0 or offset > end:
        raise _NeedsTarfile


def _scan(tar: Path, read: tuple[str, ...] = ()) -> tuple[dict[str, tuple[int, int]], dict[str, bytes]]:
    """One pass over a tar: each file member -> (offset, size) in member order, and the contents of those ending in
    `read` (small metadata such as `.cls` labels, so start-up needs no second pass)."""

    def collect(found: Iterable[tuple[str, int, int]]) -> tuple[dict[str, tuple[int, int]], dict[str, bytes]]:
        members, contents = {}, {}
        for name, offset, size in found:
            members[name] = (offset, size)
            if read and name.lower().endswith(read):
                contents[name] = _read_at(handle, offset, size)
        return members, contents

    try:
        with open(tar, "rb") as handle:
            try:
                return collect(_ustar_members(handle))
            except _NeedsTarfile:
                handle.seek(0)
                with tarfile.open(fileobj=handle, mode="r:") as archive:
                    return collect((m.name, m.offset_data, m.size) for m in archive if m.isfile())
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{tar}: not a readable tar shard ({e}; expected an uncompressed tar)") from None


def _label(raw: bytes, where: str) -> tuple[int, str]:
    """(label, '') from the text of a `.cls` member, or (-1, why it is not an integer >= 0)."""
    text = raw.decode("utf-8", "replace").strip()
    if re.fullmatch(r"[0-9]+", text):
        return int(text), ""
    return -1, f"{where}: expected a class index (an integer >= 0), got {text!r:.40}"


def _webdataset(shard: Path) -> list[_Entry]:
    """Samples of one WebDataset shard in member order, labels read during the index scan."""
    members, contents = _scan(shard, read=(".cls",))
    groups: dict[str, dict[str, str]] = {}
    for name in members:
        key, ext = os.path.splitext(name)
        groups.setdefault(key, {})[ext.lower()] = name
    entries = []
    for key, exts in groups.items():
        image = next((exts[e] for e in IMAGE_EXTS if e in exts), None)
        text, meta, cls = exts.get(".txt"), exts.get(".json"), exts.get(".cls")
        label, problem = _label(contents[cls], f"{shard}:{cls}") if cls else (-1, "")
        entries.append(
            _Entry(
                shard,
                image or key,
                members[image] if image else None,
                label=label,
                text=members[text] if text else None,
                meta=members[meta] if meta else None,
                problem=problem if image else f"{shard}:{key}: no image member ({'/'.join(IMAGE_EXTS)})",
                cls=cls,
            )
        )
    return entries


def _folder_tars(folder: Path) -> list[Path]:
    """The `*.tar` files of a shard folder, sorted; names starting with '.' are skipped, and DataError is raised for
    one whose real path leaves the folder."""
    real = Path(os.path.realpath(folder))
    tars = sorted(p for p in folder.glob("*.tar") if not p.name.startswith("."))
    for tar in tars:
        target = Path(os.path.realpath(tar))
        if not target.is_relative_to(real):
            raise DataError(f"{tar}: a symlink to {target}, outside the shard folder {folder}; name it explicitly")
    return tars


def _labelled(entries: list[_Entry]) -> list[_Entry]:
    """`entries`, where any has a `.cls` label, with those lacking one marked unusable."""
    if not any(e.cls for e in entries):
        return entries
    why = "no .cls label, though other samples have one"
    return [e if e.cls or e.problem else e._replace(problem=f"{e.tar}:{e.name}: {why}") for e in entries]


def _class_names(shards: list[Path], labels: list[int]) -> list[str]:
    """Names from the `classes.txt` beside the shards when present, else '0'..'K-1' up to the largest label."""
    top = max(labels, default=-1)
    files = [f for f in sorted({p.parent / "classes.txt" for p in shards}) if f.is_file()]
    if not files:
        return [str(i) for i in range(top + 1)]
    names, *others = (parse_class_names(decode_text(f.read_bytes(), str(f)), str(f)) for f in files)
    for other, listed in zip(files[1:], others, strict=True):
        if listed != names:
            raise DataError(f"{other}: lists other classes than {files[0]}; the shards must share one classes.txt")
    if top >= len(names):
        raise DataError(f"{files[0]}: names {len(names)} classes but the shards hold label {top} (line i: label i)")
    return names


_SHARD_COLUMNS = ("tar", "file", "caption")


def _tsv(path: Path, columns: tuple[str, ...] = ()) -> tuple[list[str], list[tuple[int, ...]]]:
    """Header and (line, *values of `columns`) rows of a TSV with '"' quoting, as ml-mdm reads it.

    A header without `columns`, or a row too short for them, is an error naming the file (and line)."""
    rows: list[tuple[int, ...]] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quotechar='"')
            header = [h.strip() for h in next(reader, [])]
            if not columns:
                return header, rows
            if not set(columns) <= set(header):
                raise ValueError(f"{path}: expected a header row with the columns {', '.join(columns)}; found {header}")
            at = [header.index(c) for c in columns]
            for row in reader:
                if not row:
                    continue
                if len(row) <= max(at):
                    raise ValueError(f"{path}:{reader.line_num}: expected the tab-separated fields {', '.join(header)}")
                rows.append((reader.line_num, *(row[i] for i in at)))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable TSV ({e})") from None
    return header, rows


def _ml_mdm(path: Path) -> tuple[list[_Entry], str]:
    """Samples of an ml-mdm index or shard TSV in row order (each tar indexed once), and the layout in words."""
    header = _tsv(path)[0]
    if "filename" in header:
        tsvs = [
            (Path(os.path.normpath(path.parent / name)), f"{path}:{line}")
            for line, name in _tsv(path, ("filename",))[1]
        ]
        what = f"index TSV ({len(tsvs)} shard TSVs, "
    elif set(_SHARD_COLUMNS) <= set(header):
        tsvs, what = [(path, str(path))], "shard TSV ("
    else:
        raise ValueError(
            f"{path}: expected a header row with the column 'filename' (an ml-mdm index TSV) or the columns "
            f"{', '.join(_SHARD_COLUMNS)} (a shard TSV); found {header}"
        )
    indexed: dict[Path, dict[str, tuple[int, int]] | str] = {}
    entries = []
    for tsv, listed in tsvs:
        if not tsv.is_file():
            raise FileNotFoundError(f"{listed}: shard TSV {tsv} does not exist")
        tars: dict[str, Path] = {}
        for line, tar_name, file, caption in _tsv(tsv, _SHARD_COLUMNS)[1]:
            tar = tars.get(tar_name)
            if tar is None:
                tar = tars[tar_name] = Path(os.path.normpath(tsv.parent / tar_name))
            if tar not in indexed:
                try:
                    indexed[tar] = _scan(tar)[0]
                except ValueError as e:
                    indexed[tar] = str(e)
            members = indexed[tar]
            if isinstance(members, str):
                image, problem = None, f"{tsv}:{line}: {members}"
            else:
                image = members.get(file)
                problem = "" if image else f"{tsv}:{line}: {tar} has no member {file!r}"
            entries.append(_Entry(tar, file, image, caption=caption, problem=problem))
    return entries, f"ml-mdm {what}{len(indexed)} tars)"


class ShardDataset(ImageDataset):
    """Images with captions and labels from tar shards or ml-mdm TSVs; unusable samples are replaced and counted."""

    def __init__(self, spec: str | Path, options: ReadOptions) -> None:
        self.options = options
        spec = str(spec)
        if spec.lower().endswith(".tsv"):
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"data.path: {path} does not exist")
            self.items, self.layout = _ml_mdm(path)
            self.class_names: list[str] = []
        else:
            shards = shard_paths(spec)
            self.items = _labelled([e for shard in shards for e in _webdataset(shard)])
            self.layout = f"WebDataset tar shards ({len(shards)} shards)"
            self.class_names = _class_names(shards, [e.label for e in self.items])
        if not self.items:
            raise DataError(f"data.path: {spec!r} holds no samples")
        self._files: dict[Path, BinaryIO] = {}

    def _bytes(self, tar: Path, where: tuple[int, int]) -> bytes:
        handle = self._files.get(tar)
        if handle is None:
            handle = self._files[tar] = open(tar, "rb")  # noqa: SIM115 (kept open per worker)
        return _read_at(handle, *where)

    def describe(self, index: int) -> tuple[str, str | None, int]:
        """('tar:member', caption or None, label or -1) of sample `index`; the caption is read here when stored, and
        BadSample names its member when it cannot be."""
        e = self.items[index]
        return f"{e.tar}:{e.name}", self._caption(e), e.label

    def _caption(self, e: _Entry) -> str | None:
        """The TSV caption, the .txt member, or the 'caption' (else 'text') string of the .json member of `e`."""
        if e.caption is not None or (e.text is None and e.meta is None):
            return e.caption
        ext, where = (".txt", e.text) if e.text is not None else (".json", e.meta)
        name = f"{e.tar}:{os.path.splitext(e.name)[0] if e.image else e.name}{ext}"
        try:
            text = decode_text(self._bytes(e.tar, where), name)
            row = None if ext == ".txt" else json_object(text, name)
        except DataError as err:
            raise BadSample(str(err)) from None
        if row is None:
            return text.strip()
        caption = row.get("caption") or row.get("text")
        if caption is not None and not isinstance(caption, str):
            raise BadSample(f"{name}: 'caption' / 'text' must be a string, got {caption!r:.60}")
        return caption

    def read(self, index: int) -> bytes:
        """The image bytes of sample `index`; BadSample when its tar, image member or label is unusable."""
        e = self.items[index]
        if e.problem:
            raise BadSample(e.problem)
        return self._bytes(e.tar, e.image)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}


# Member suffixes for images named without an image suffix (any of them reads back: PIL goes by content).
_FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def _packable(ds: FolderDataset) -> Iterator[tuple[str, bytes, str | None, int]]:
    """(member suffix, bytes, caption, label) of every sample whose file is inside the folder and is an image; the
    others are logged as warnings and left out."""
    for i, item in enumerate(ds.items):
        try:
            name, caption, label = ds.describe(i)
            data = ds.read(i)
            fmt = verify_image(name, data, ds.options.max_pixels)
        except BadSample as e:
            log.warning("data pack: left out %s", e)
            continue
        suffix = item.path.suffix.lower()
        yield suffix if suffix in IMAGE_SUFFIXES else _FORMAT_SUFFIX.get(fmt, ".png"), data, caption, label


def pack(folder: str | Path, out: str | Path, shard_size: int = 1000) -> list[Path]:
    """Write the usable images of a folder as WebDataset shards `out/shard-NNNNNN.tar` (original bytes, .txt, .cls)
    and `out/classes.txt` when the folder names its classes; a stale classes.txt or higher-numbered shard is removed.

    Files that are not images or lie outside the folder are left out (each logged); DataError when none is left.
    """
    require_int(shard_size, "shard_size", 1)
    ds = FolderDataset(folder, ReadOptions(1))
    out = Path(out)
    samples = _packable(ds)
    written: list[Path] = []
    while (head := next(samples, None)) is not None:
        path = out / f"shard-{len(written):06d}.tar"
        with atomic_file(path) as tmp, tarfile.open(tmp, "w") as tar:
            first = len(written) * shard_size
            for n, (suffix, data, caption, label) in enumerate(chain([head], islice(samples, shard_size - 1)), first):
                members = [(suffix, data)]
                if caption:
                    members.append((".txt", caption.encode()))
                if label >= 0:
                    members.append((".cls", str(label).encode()))
                for ext, blob in members:
                    info = tarfile.TarInfo(f"{n:09d}{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        written.append(path)
    if not written:
        raise DataError(f"{folder}: none of its {len(ds)} images can be packed (see the warnings above)")
    classes = out / "classes.txt"
    if ds.class_names:
        write_text(classes, "".join(f"{name}\n" for name in ds.class_names))
    else:
        classes.unlink(missing_ok=True)
    for stale in out.glob("shard-*.tar"):
        if re.fullmatch(r"shard-\d{6}\.tar", stale.name) and stale not in written:
            stale.unlink()
    return written
