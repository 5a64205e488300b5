"""Precomputed text features: each distinct caption encoded once, read back instead of running the encoder.

A cache is a directory of safetensors parts. Each part holds `features` (tokens of all its captions
concatenated, (T, D)), `offsets` (N + 1) and `keys` (N, 20: SHA-1 of each caption); the metadata names
the encoder, so features of one encoder are never fed to a model trained on another. Parts are memory
mapped and only the rows a batch needs are read. The empty caption (the unconditional branch) is always
included.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mdm import io
from mdm.text.base import TextEncoder, pad_features

log = logging.getLogger(__name__)
FORMAT = "mdm-text-cache/1"
STORE_DTYPES = ("float32", "float16", "bfloat16")


def caption_key(caption: str) -> bytes:
    """The 20-byte key of a caption."""
    return hashlib.sha1(caption.encode("utf-8")).digest()


def write_cache(
    encoder: TextEncoder,
    captions: Iterable[str],
    path: str | Path,
    batch_size: int = 64,
    dtype: str = "float16",
    part_size: int = 100_000,
    progress: bool = True,
) -> Path:
    """Encode every distinct caption (and '') into a cache directory at `path` (replaced atomically)."""
    store = io.dtype(dtype, STORE_DTYPES, "cache dtype")
    unique = list(dict.fromkeys(["", *captions]))
    meta = {"format": FORMAT, "encoder": encoder.name, "dim": str(encoder.dim)}
    bar = tqdm(total=len(unique), desc="encode captions", disable=not progress)
    with io.atomic_dir(path) as tmp:
        for part, first in enumerate(range(0, len(unique), part_size)):
            chunk = unique[first : first + part_size]
            feats, offsets = [], [0]
            for i in range(0, len(chunk), batch_size):
                emb, mask = encoder.encode(chunk[i : i + batch_size])
                for row, n in zip(emb, mask.sum(1).long().tolist(), strict=True):
                    feats.append(row[:n].to("cpu", store))
                    offsets.append(offsets[-1] + n)
                bar.update(min(batch_size, len(chunk) - i))
            keys = torch.frombuffer(bytearray(b"".join(caption_key(c) for c in chunk)), dtype=torch.uint8)
            tensors = {"features": torch.cat(feats), "offsets": torch.tensor(offsets), "keys": keys.view(-1, 20)}
            save_file(tensors, str(tmp / f"part-{part:05d}.safetensors"), metadata=meta)
    bar.close()
    return Path(path)


class EmbeddingCache:
    """Read access to a cache directory: `get(caption)` -> features (n, D) float32, or None when absent."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        parts = sorted(self.path.glob("part-*.safetensors"))
        if not parts:
            raise FileNotFoundError(
                f"text.cache = {self.path}: no cache there (build it with `mdm data embed --config CONFIG`)"
            )
        self.parts = []
        self.index: dict[bytes, tuple[int, int]] = {}
        self.name = self.dim = None
        for p, file in enumerate(parts):
            handle = safe_open(str(file), framework="pt")
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT or set(handle.keys()) != {"features", "offsets", "keys"}:
                raise ValueError(f"{file}: not an mdm text cache (expected format {FORMAT})")
            if self.name is not None and (meta["encoder"], int(meta["dim"])) != (self.name, self.dim):
                raise ValueError(f"{file}: made by encoder {meta['encoder']!r}, other parts by {self.name!r}")
            self.name, self.dim = meta["encoder"], int(meta["dim"])
            offsets = handle.get_tensor("offsets").tolist()
            self.parts.append((handle, offsets))
            for row, key in enumerate(handle.get_tensor("keys").numpy()):
                self.index[key.tobytes()] = (p, row)

    def __len__(self) -> int:
        return len(self.index)

    def get(self, caption: str) -> torch.Tensor | None:
        """The caption's features (n, D) as float32, or None if the cache does not hold it."""
        hit = self.index.get(caption_key(caption))
        if hit is None:
            return None
        handle, offsets = self.parts[hit[0]]
        return handle.get_slice("features")[offsets[hit[1]] : offsets[hit[1] + 1]].float()


class CachedEncoder:
    """A TextEncoder that reads features from a cache and calls the real encoder (loaded on first need) for
    captions the cache lacks."""

    def __init__(self, path: str | Path, name: str, load: Callable[[], TextEncoder]) -> None:
        self.cache = EmbeddingCache(path)
        if self.cache.name != name:
            raise ValueError(
                f"text.cache = {path}: made by encoder {self.cache.name!r}, but the config names {name!r}; "
                f"rebuild it with `mdm data embed`"
            )
        self.name, self.dim = name, self.cache.dim
        self._load, self._encoder = load, None
        self.device = torch.device("cpu")
        self.misses = 0

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, S, D) padded with zeros to the longest prompt, and the mask (B, S)."""
        rows = [self.cache.get(p) for p in prompts]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            if self._encoder is None:
                log.info("text cache %s lacks %d caption(s); loading the encoder", self.cache.path, len(missing))
                self._encoder = self._load().to(self.device)
            self.misses += len(missing)
            emb, mask = self._encoder.encode([prompts[i] for i in missing])
            for i, row, n in zip(missing, emb, mask.sum(1).long().tolist(), strict=True):
                rows[i] = row[:n].float().cpu()
        feats, mask = pad_features([r.float() for r in rows])
        return feats.to(self.device), mask.to(self.device)

    def to(self, device: str | torch.device) -> CachedEncoder:
        """Where `encode` puts its tensors (and where the encoder runs if it is needed)."""
        self.device = torch.device(device)
        if self._encoder is not None:
            self._encoder.to(device)
        return self
