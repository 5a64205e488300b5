"""Cross-level consistency of generated pyramids: each lower level against the top level average-pooled to its size.

Pooling is the model's own (`build_pyramid`: avg_pool2d by the size ratio), so data pooled for per-level FID and
the top level pooled here match what the model is trained to produce. Errors are measured on [0, 1] pixels,
(x + 1) / 2, so PSNR uses peak 1.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from mdm.diffusion.process import Pyramid, build_pyramid


def level_sizes(pyramid: Pyramid) -> list[int]:
    """The side of each level, highest first; an error unless every level is a square NCHW batch of one size."""
    if not pyramid:
        raise ValueError("empty pyramid")
    for i, level in enumerate(pyramid):
        if level.dim() != 4 or level.shape[-1] != level.shape[-2] or level.shape[:2] != pyramid[0].shape[:2]:
            raise ValueError(
                f"level {i}: expected square NCHW images with batch and channels {tuple(pyramid[0].shape[:2])}, "
                f"got shape {tuple(level.shape)}"
            )
    return [level.shape[-1] for level in pyramid]


def pool_levels(images: torch.Tensor, sizes: list[int]) -> Pyramid:
    """Images at sizes[0] average-pooled to every level size (the model's pyramid), highest first."""
    for hi, lo in pairwise(sizes):
        if lo >= hi or hi % lo:
            raise ValueError(f"level sizes must decrease and divide each other (avg pooling), got {hi} then {lo}")
    return build_pyramid(images, sizes)


def consistency_mse(pyramid: Pyramid) -> torch.Tensor:
    """Per-sample MSE (B, L - 1) on [0, 1] pixels between level l >= 1 and the top level avg-pooled to its size."""
    sizes = level_sizes(pyramid)
    if len(sizes) < 2:
        raise ValueError("cross-level consistency needs at least 2 levels")
    pooled = pool_levels(pyramid[0].float(), sizes)
    errors = [((p - g.float()) / 2).pow(2).flatten(1).mean(1) for p, g in zip(pooled[1:], pyramid[1:], strict=True)]
    return torch.stack(errors, dim=1)


def psnr(mse: torch.Tensor | float) -> torch.Tensor:
    """PSNR in dB for peak-1 signals: 10 log10(1 / MSE), infinite where MSE is 0."""
    return -10 * torch.log10(torch.as_tensor(mse, dtype=torch.float64))
