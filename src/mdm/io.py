"""The mechanisms every room needs, each written once: atomic file and directory writes, file hashing,
state-dict key checks, dtype names and the [-1, 1] <-> 8-bit pixel conventions.

Atomic writes build the result under a hidden temporary name beside the target (`.NAME.tmp-PID`) and rename
it into place, so a crash never leaves a torn file; :func:`remove_stale` clears what a killed writer left.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ModelFileError(ValueError):
    """A weights or state file that cannot be read: missing, truncated, corrupt or of another format."""


class KeyMismatchError(ValueError):
    """A state dict does not fit the module it is loaded into; the message lists the offending keys."""


def dtype(name: str, allowed: tuple[str, ...] | None = None, what: str = "dtype") -> torch.dtype:
    """The torch dtype called `name` (float32, bfloat16, ...); names outside `allowed` are refused."""
    names = allowed or tuple(DTYPES)
    if name not in names:
        raise ValueError(f"{what}: expected one of {', '.join(names)}, got {name!r}")
    return DTYPES[name]


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def remove_stale(path: str | os.PathLike) -> None:
    """Delete temporary files or directories that a killed writer of `path` left beside it."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.*-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on success it replaces the directory `path`.

    An existing `path` is moved aside before the rename and deleted after, so at every moment either the
    old or the new directory is complete under its name (or, between two renames, under the aside name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            aside = _temp_name(path, "old")
            os.replace(path, aside)
            os.replace(tmp, path)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_keys(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    what: str,
    shapes: bool = True,
    limit: int | None = 8,
    error: type[ValueError] = KeyMismatchError,
) -> None:
    """Raise `error` naming the missing, unexpected and (with `shapes`) mis-shaped keys of `given` (the first
    `limit` of each kind; None: all)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(given[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if shapes and k in given and tuple(given[k].shape) != tuple(v.shape)
    )
    parts = [
        f"{title} ({len(keys)}): {keys[:limit]}" + (" ..." if len(keys) > len(keys[:limit]) else "")
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
        if keys
    ]
    if parts:
        raise error(f"{what}: " + "; ".join(parts))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; any unreadable file is one ModelFileError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file (expected a safetensors weights file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as e:  # the reader raises several unrelated types for broken files
        raise ModelFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] N C H W floats -> uint8 N H W C via p = x * 128 + 127 (ml-mdm's output convention)."""
    arr = (x.detach().float().cpu() * 128 + 127).round().clamp(0, 255).to(torch.uint8)
    return arr.permute(0, 2, 3, 1).numpy()


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """uint8 H W C pixels -> a C H W float tensor in [-1, 1] via x = p / 127.5 - 1 (how training data is read)."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 127.5 - 1.0


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> float 8-bit pixel values round((x + 1) * 127.5): the exact inverse of :func:`from_uint8`."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255)
