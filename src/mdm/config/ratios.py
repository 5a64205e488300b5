"""Mixed-resolution batches: which leading rows of a batch train which level (the loss and validation use it)."""

from __future__ import annotations


def mixed_fractions(ratio: list[float]) -> list[float]:
    """'a:b:c' (highest first) -> cumulative fractions [a/s, (a+b)/s, 1]: level l trains on that share of rows."""
    total = sum(ratio)
    out, acc = [], 0.0
    for r in ratio:
        acc += r
        out.append(acc / total)
    return out


def mixed_rows(ratio: list[float] | None, batch: int, levels: int) -> list[int]:
    """Leading rows of a batch that each of `levels` levels trains on under a mixed ratio (every row without one)."""
    if ratio is None:
        return [batch] * levels
    return [int(f * batch) for f in mixed_fractions(ratio)]
