"""The Inception feature extractor behind FID and KID: the standard TorchScript Inception-v3 from a local file.

The file is NVIDIA's TorchScript translation of TensorFlow's inception-2015-12-05 (StyleGAN2-ADA, EDM, clean-fid,
k-diffusion). It takes RGB pixel values 0..255 (NCHW, any size: it resizes to 299 itself) and, called as
`net(x, return_features=True)`, returns the 2048-d pool features. It is never downloaded implicitly.
"""

from __future__ import annotations

import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Protocol

import torch

from mdm import io
from mdm.io import to_pixels

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_ENV = "MDM_INCEPTION_PATH"
WHERE_TO_GET = (
    f"download {INCEPTION_URL} (about 96 MB, sha256 {INCEPTION_SHA256}) "
    f"and pass it with --inception PATH or set {INCEPTION_ENV}"
)


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Check for NCHW with 1 or 3 channels and repeat a grey channel to RGB."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected NCHW images with 1 or 3 channels, got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class FeatureExtractor(Protocol):
    """Maps a batch of [-1, 1] NCHW images (any size, 1 or 3 channels) to one feature row per image (B, D)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionFeatures:
    """The TorchScript Inception called as StyleGAN2-ADA / EDM call it: 0..255 RGB in, pool features out."""

    def __init__(self, net: torch.jit.ScriptModule, path: Path, device: torch.device) -> None:
        self.net = net.eval()
        self.path = path
        self.device = device

    def to(self, device: str | torch.device) -> InceptionFeatures:
        """Move the network."""
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    @cached_property
    def sha256(self) -> str:
        """The file's sha256, to record which network produced a result."""
        return io.sha256(self.path)

    @property
    def is_standard(self) -> bool:
        """Whether this is the published file, so FIDs are comparable with other papers' numbers."""
        return self.sha256 == INCEPTION_SHA256

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, D) of [-1, 1] images, on the network's device."""
        features = self.net(to_pixels(as_rgb(images.to(self.device))), return_features=True)
        if features.dim() != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(
                f"{self.path}: net(x, return_features=True) returned shape {tuple(features.shape)} for "
                f"{images.shape[0]} images; expected (batch, features) as the TorchScript Inception returns"
            )
        return features


def inception_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception file: `path` (--inception), else $MDM_INCEPTION_PATH; an error saying where to get it."""
    chosen = path or os.environ.get(INCEPTION_ENV)
    if not chosen:
        raise FileNotFoundError(f"no Inception network given: {WHERE_TO_GET}")
    p = Path(chosen).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: Inception network not found; {WHERE_TO_GET}")
    return p


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Load the TorchScript Inception from `path` or $MDM_INCEPTION_PATH (never downloaded)."""
    p = inception_path(path)
    device = torch.device(device)
    try:
        with warnings.catch_warnings():
            # The published network exists only as TorchScript; the deprecation is not the user's to act on.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")
            net = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{p}: not a TorchScript archive ({reason}); expected the TorchScript Inception "
            f"inception-2015-12-05.pt (not EDM's pickled .pkl): {WHERE_TO_GET}"
        ) from e
    return InceptionFeatures(net, p, device)
