"""Kernel Inception Distance (Bińkowski et al. 2018): unbiased polynomial-kernel MMD^2 averaged over subsets."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def _features(f: torch.Tensor | np.ndarray, name: str, device: str | torch.device | None) -> torch.Tensor:
    """A float64 (N, D) tensor, or an error naming the argument."""
    t = torch.as_tensor(f).to(device=device, dtype=torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a feature matrix (N, D), got shape {tuple(t.shape)}")
    return t


def kid(
    f1: torch.Tensor | np.ndarray,
    f2: torch.Tensor | np.ndarray,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[float, float]:
    """KID mean and std over `num_subsets` random subsets of m = min(subset_size, N1, N2) rows of each set.

    Per subset: MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1)) - 2 mean k(x_i, y_j)
    with k(x, y) = (x.y / d + 1)^3, computed in float64 on `device` (default: f1's).
    """
    x_all = _features(f1, "f1", device)
    y_all = _features(f2, "f2", x_all.device)
    if x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"feature sizes differ: {x_all.shape[1]} vs {y_all.shape[1]}")
    m = min(subset_size, x_all.shape[0], y_all.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {x_all.shape[0]} and {y_all.shape[0]}")
    d = x_all.shape[1]
    generator = torch.Generator().manual_seed(seed)
    values = torch.empty(num_subsets, dtype=torch.float64)
    for i in tqdm(range(num_subsets), desc="KID subsets", disable=not progress):
        x = x_all[torch.randperm(x_all.shape[0], generator=generator)[:m].to(x_all.device)]
        y = y_all[torch.randperm(y_all.shape[0], generator=generator)[:m].to(y_all.device)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        same = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values[i] = (same - 2 * kxy.mean()).cpu()
    return float(values.mean()), float(values.std(correction=0))
