"""Video metrics that need no model: temporal consistency (PSNR between consecutive frames) and per-frame features,
so FID / KID of frames reuse the image machinery (`FeatureAccumulator` over an Inception).

Clips are (N, C, T, H, W) in [-1, 1]; errors are measured on [0, 1] pixels as in `mdm.eval.levels`.
"""

from __future__ import annotations

import torch

from mdm.eval.features import FeatureExtractor
from mdm.eval.levels import psnr

MIN_MSE = 1e-10  # consecutive frames closer than this count as this close (100 dB), so frozen clips stay finite


def _check(videos: torch.Tensor) -> torch.Tensor:
    if videos.dim() != 5:
        raise ValueError(f"expected (N, C, T, H, W) clips, got shape {tuple(videos.shape)}")
    return videos


def fold_frames(videos: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) clips -> (N T, C, H, W) frames, clip-major (frame t of clip n is row n T + t)."""
    n, c, t, h, w = _check(videos).shape
    return videos.transpose(1, 2).reshape(n * t, c, h, w)


def temporal_psnr(videos: torch.Tensor) -> torch.Tensor:
    """Per clip (N,): the mean over consecutive frame pairs of their PSNR in dB (peak 1 on [0, 1] pixels), MSE
    floored at MIN_MSE. Higher is smoother; compare generated clips with the data's (a still clip is 100 dB)."""
    videos = _check(videos)
    if videos.shape[2] < 2:
        raise ValueError(f"temporal PSNR needs at least 2 frames, got {videos.shape[2]}")
    step = (videos[:, :, 1:].double() - videos[:, :, :-1].double()) / 2
    mse = step.pow(2).mean(dim=(1, 3, 4)).clamp(min=MIN_MSE)
    return psnr(mse).mean(dim=1)


class PerFrame:
    """An image feature extractor applied to every frame of (N, C, T, H, W) clips: (N T, D) features, so a
    `FeatureAccumulator(PerFrame(inception))` gives frame FID / KID statistics; NCHW images pass through."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor

    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        return self.extractor(fold_frames(videos) if videos.dim() == 5 else videos)
