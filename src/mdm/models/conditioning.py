"""What a sample is conditioned on: class labels or text features, plus optional micro-conditioning values.

The network turns either into a token sequence (a class is one learned token; text is projected per token),
pools it into the time embedding and attends to it with cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """Class labels (B,) or text embeddings (B, S, D) with a mask (B, S); micro values name -> (B,) tensor."""

    labels: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    micro: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labels is not None and self.text is not None:
            raise ValueError("Conditioning: give class labels or text, not both")
        if self.labels is not None and (self.labels.dim() != 1 or self.labels.dtype not in (torch.int32, torch.int64)):
            raise ValueError(
                f"Conditioning.labels must be an integer tensor (B,), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if self.text is not None:
            if self.text.dim() != 3:
                raise ValueError(f"Conditioning.text must be (B, S, D), got shape {tuple(self.text.shape)}")
            if self.text_mask is not None:
                if self.text_mask.shape != self.text.shape[:2]:
                    raise ValueError(
                        f"Conditioning.text_mask must be (B, S) = {tuple(self.text.shape[:2])}, "
                        f"got {tuple(self.text_mask.shape)}"
                    )
                empty = (self.text_mask.sum(1) == 0).nonzero().flatten().tolist()
                if empty:
                    raise ValueError(f"Conditioning.text_mask rows {empty} have no tokens (encode '' instead)")
        elif self.text_mask is not None:
            raise ValueError("Conditioning.text_mask given without text")

    @property
    def batch_size(self) -> int | None:
        """Rows of the condition, or None for an empty condition."""
        if self.labels is not None:
            return self.labels.shape[0]
        if self.text is not None:
            return self.text.shape[0]
        return None

    def select(self, rows: torch.Tensor | slice) -> Conditioning:
        """The condition of a subset of rows."""
        return Conditioning(
            labels=None if self.labels is None else self.labels[rows],
            text=None if self.text is None else self.text[rows],
            text_mask=None if self.text_mask is None else self.text_mask[rows],
            micro={k: v[rows] for k, v in self.micro.items()},
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move tensors; `dtype` applies to the text features only."""
        return Conditioning(
            labels=None if self.labels is None else self.labels.to(device),
            text=None if self.text is None else self.text.to(device, dtype),
            text_mask=None if self.text_mask is None else self.text_mask.to(device),
            micro={k: v.to(device) for k, v in self.micro.items()},
        )


def concat(conds: list[Conditioning]) -> Conditioning:
    """Stack conditions along the batch; text sequences are zero-padded (mask 0) to the longest."""
    if all(c.labels is not None for c in conds):
        return Conditioning(labels=torch.cat([c.labels for c in conds]))
    if all(c.text is not None for c in conds):
        length = max(c.text.shape[1] for c in conds)
        texts, masks = [], []
        for c in conds:
            b, s, _ = c.text.shape
            mask = c.text_mask if c.text_mask is not None else c.text.new_ones(b, s)
            texts.append(torch.nn.functional.pad(c.text, (0, 0, 0, length - s)))
            masks.append(torch.nn.functional.pad(mask, (0, length - s)))
        return Conditioning(text=torch.cat(texts), text_mask=torch.cat(masks))
    if all(c.batch_size is None for c in conds):
        return Conditioning()
    raise ValueError("cannot batch conditions of different kinds (labels, text, none)")


def null_labels(batch: int, num_classes: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The reserved null class (index num_classes) for the unconditional branch and condition dropout."""
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


def drop(cond: Conditioning, rows: torch.Tensor, null: Conditioning) -> Conditioning:
    """Classifier-free-guidance dropout: rows where `rows` (B,) is True get the null condition instead.

    `null` is one row: the null class, or the encoded empty caption (the same the sampler feeds to the
    unconditional branch). Text is padded to the longer of the two sequences.
    """
    if cond.batch_size is None or not bool(rows.any()):
        return cond
    if null.batch_size != 1:
        raise ValueError("the null condition must be a single row")
    batch = cond.batch_size
    both = concat([cond, *[null.to(rows.device)] * batch])
    out = both.select(torch.arange(batch, device=rows.device) + batch * rows.long())
    out.micro = dict(cond.micro)
    return out
