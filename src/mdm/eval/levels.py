"""Cross-level consistency of generated pyramids: each lower level against the top level average-pooled to its size
(clips: also frame sub-sampled to its frames).

Pooling is the model's own (`build_pyramid`: avg_pool2d by the size ratio), so data pooled for per-level FID and
the top level pooled here match what the model is trained to produce. Errors are measured on [0, 1] pixels,
(x + 1) / 2, so PSNR uses peak 1.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from mdm.diffusion.process import LevelShape, Pyramid, build_pyramid


def level_shapes(pyramid: Pyramid) -> list[tuple[int, int]]:
    """(frames, side) of each level, highest first (images count one frame); an error unless every level is a
    square NCHW image batch, or every level an N C T S S clip batch, of one batch size and channel count."""
    if not pyramid:
        raise ValueError("empty pyramid")
    layout = "NCHW images" if pyramid[0].dim() == 4 else "N C T H W clips"
    for i, level in enumerate(pyramid):
        if (
            level.dim() not in (4, 5)
            or level.dim() != pyramid[0].dim()
            or level.shape[-1] != level.shape[-2]
            or level.shape[:2] != pyramid[0].shape[:2]
        ):
            raise ValueError(
                f"level {i}: expected square {layout} with batch and channels {tuple(pyramid[0].shape[:2])}, "
                f"got shape {tuple(level.shape)}"
            )
    return [(level.shape[2] if level.dim() == 5 else 1, level.shape[-1]) for level in pyramid]


def level_sizes(pyramid: Pyramid) -> list[int]:
    """The side of each level, highest first (see :func:`level_shapes`)."""
    return [side for _, side in level_shapes(pyramid)]


def pool_levels(images: torch.Tensor, sizes: list[LevelShape], temporal_downsample: str = "first") -> Pyramid:
    """Images (clips) at the first level taken to every level by the model's pyramid, highest first: `sizes` are
    sides, or (frames, side) for clips (`temporal_downsample` as the model's diffusion config)."""
    for hi, lo in pairwise(sizes):
        if isinstance(hi, int) and (lo >= hi or hi % lo):
            raise ValueError(f"level sizes must decrease and divide each other (avg pooling), got {hi} then {lo}")
    return build_pyramid(images, sizes, temporal_downsample)


def consistency_mse(pyramid: Pyramid, temporal_downsample: str = "first") -> torch.Tensor:
    """Per-sample MSE (B, L - 1) on [0, 1] pixels between level l >= 1 and the top level taken to it by the
    model's pyramid (avg-pooled; clips also frame sub-sampled)."""
    shapes = level_shapes(pyramid)
    if len(shapes) < 2:
        raise ValueError("cross-level consistency needs at least 2 levels")
    levels = [side for _, side in shapes] if pyramid[0].dim() == 4 else shapes
    pooled = pool_levels(pyramid[0].float(), levels, temporal_downsample)
    errors = [((p - g.float()) / 2).pow(2).flatten(1).mean(1) for p, g in zip(pooled[1:], pyramid[1:], strict=True)]
    return torch.stack(errors, dim=1)


def psnr(mse: torch.Tensor | float) -> torch.Tensor:
    """PSNR in dB for peak-1 signals: 10 log10(1 / MSE), infinite where MSE is 0."""
    return -10 * torch.log10(torch.as_tensor(mse, dtype=torch.float64))
