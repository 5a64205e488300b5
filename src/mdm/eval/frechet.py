"""Gaussian feature statistics (saved and reused as .npz with `mu`, `sigma`) and the Fréchet distance (FID)."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Statistics:
    """Mean `mu` (D,) and covariance `sigma` (D, D) of a feature set, float64, from `n` samples (None: unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1:
            raise ValueError(f"mu must be a vector (D,), got shape {mu.shape}")
        if sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"sigma must be ({mu.shape[0]}, {mu.shape[0]}) to match mu, got shape {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError("mu and sigma must be finite")
        if self.n is not None and self.n < 2:
            raise ValueError(f"n must be at least 2 samples, got {self.n}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @classmethod
    def from_moments(cls, n: int, total: np.ndarray, outer: np.ndarray) -> Statistics:
        """From n, sum f and sum f f^T: mu = sum f / n, sigma = (sum f f^T - n mu mu^T) / (n - 1) (unbiased)."""
        if n < 2:
            raise ValueError(f"feature statistics need at least 2 samples, got {n}")
        mu = np.asarray(total, dtype=np.float64) / n
        return cls(mu, (np.asarray(outer, dtype=np.float64) - n * np.outer(mu, mu)) / (n - 1), n)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `mu`, `sigma` (and `n` when known) to an .npz file at exactly `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma} | ({} if self.n is None else {"n": np.int64(self.n)})
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        """Read an .npz with `mu` (D,) and `sigma` (D, D), optionally `n` (EDM's reference files have no `n`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such statistics file (expected an .npz with 'mu' and 'sigma')")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from e
        missing = sorted({"mu", "sigma"} - arrays.keys())
        if missing:
            raise ValueError(f"{path}: missing {missing}; expected arrays 'mu' (D,) and 'sigma' (D, D)")
        n = arrays.get("n")
        try:
            return cls(arrays["mu"], arrays["sigma"], None if n is None else int(n))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


def frechet_distance(s1: Statistics, s2: Statistics) -> float:
    """FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017) in float64.

    Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric PSD matrix similar to S1 S2, so two symmetric
    eigendecompositions replace the general sqrtm; eigenvalues below 0 are rounding and count as 0.
    """
    if s1.mu.shape != s2.mu.shape:
        raise ValueError(f"feature sizes differ: {s1.mu.shape[0]} vs {s2.mu.shape[0]}")
    w, v = np.linalg.eigh(s1.sigma)
    root = (v * np.sqrt(w.clip(min=0))) @ v.T
    inner = root @ s2.sigma @ root
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum()
    diff = s1.mu - s2.mu
    fd = diff @ diff + np.trace(s1.sigma) + np.trace(s2.sigma) - 2 * trace_sqrt
    return max(float(fd), 0.0)
