"""The one interface every text encoder (and the feature cache) implements, and the padding they share.

Features at padded positions are zero and the mask is 1 on the tokens, 0 on the padding (ml-mdm's
convention); batches are padded to their longest prompt.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TextEncoder(Protocol):
    """Turns prompts into features and a mask; `name` identifies the features (for caches), `dim` their width."""

    name: str
    dim: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def to(self, device: str | torch.device) -> TextEncoder: ...


def lengths_mask(lengths: list[int]) -> torch.Tensor:
    """(B, max length) float mask: 1 on the first `lengths[i]` positions of row i."""
    return (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).float()


def pad_ids(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows padded to the longest: (ids (B, S) long, mask (B, S) float)."""
    mask = lengths_mask([len(r) for r in rows])
    ids = torch.full(mask.shape, pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, mask


def pad_features(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt features (S_i, D) padded with zeros to the longest: (features (B, S, D), mask (B, S))."""
    mask = lengths_mask([r.shape[0] for r in rows])
    feats = torch.zeros(*mask.shape, rows[0].shape[1], dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        feats[i, : r.shape[0]] = r
    return feats, mask
