"""Temporal layers of video levels: self-attention over frames at every pixel, and resampling in time.

Inside a level a clip travels as (N T) C H W, its frames folded into the batch so that the 2-D layers run per
frame; these layers unfold it. Attention is residual with a zero-initialised output projection, so a new video
level starts as the identity on every frame; frame order enters as rotary q/k or added sinusoids.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mdm.models.blocks import MLP, attention, sinusoidal_embedding, timestep_frequencies, zero_

FRAME_POSITIONS = ("rotary", "sinusoidal")
SEQUENCES_PER_CALL = 2**15  # CUDA's fused SDPA kernels before torch 2.8 fail on a batch of 2**16 or more sequences


def fold(x: torch.Tensor) -> torch.Tensor:
    """N C T H W clips -> (N T) C H W frames, frame-major within each sample."""
    return rearrange(x, "n c t h w -> (n t) c h w")


def unfold(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(N T) C H W frames -> N C T H W clips: the inverse of :func:`fold`."""
    return rearrange(x, "(n t) c h w -> n c t h w", t=frames)


def _frequencies(width: int, like: torch.Tensor) -> torch.Tensor:
    """The width / 2 frequencies of frame positions (the time embedding's table), float32 (float64 for float64)."""
    fp32 = like.dtype != torch.float64
    return timestep_frequencies(4 * width, fp32).to(like.device)


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of (..., T, d) queries or keys by frame index x frequency (RoFormer, Su et al. 2021)."""
    freqs = _frequencies(x.shape[-1], x)
    angle = torch.arange(x.shape[-2], device=x.device, dtype=freqs.dtype)[:, None] * freqs
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def frame_embedding(frames: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """[sin, cos] of the frame index 0..T-1 at width / 2 frequencies: (T, width) in `like`'s dtype."""
    positions = torch.arange(frames, device=like.device)
    return sinusoidal_embedding(positions, _frequencies(width, like)).to(like.dtype)


class TemporalAttention(nn.Module):
    """Pre-LayerNorm self-attention over the frames at each pixel ((N H W), T, C), with a zero-init output projection.

    `positions`: rotary q and k, or sinusoids of the frame index added to the normalised input. With `ffn`, a
    zero-initialised residual MLP follows. Heads are contiguous channel blocks, as in the 2-D attention.
    """

    def __init__(self, channels: int, heads: int, frames: int, positions: str, ffn: bool, fp32_softmax: bool) -> None:
        super().__init__()
        if positions not in FRAME_POSITIONS:
            raise ValueError(f"frame positions must be one of {', '.join(FRAME_POSITIONS)}, got {positions!r}")
        self.heads = heads
        self.frames = frames
        self.positions = positions
        self.fp32_islands = fp32_softmax
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_(nn.Linear(channels, channels))
        self.mlp = MLP(channels) if ffn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hgt, wid = x.shape[-2:]
        seq = rearrange(x, "(n t) c h w -> (n h w) t c", t=self.frames)
        tokens = self.norm(seq)
        if self.positions == "sinusoidal":
            tokens = tokens + frame_embedding(self.frames, tokens.shape[-1], tokens)
        q, k, v = (rearrange(t, "b s (h d) -> b h s d", h=self.heads) for t in self.qkv(tokens).chunk(3, dim=-1))
        if self.positions == "rotary":
            q, k = rotary(q), rotary(k)
        chunks = zip(*(t.split(SEQUENCES_PER_CALL) for t in (q, k, v)), strict=True)
        out = torch.cat([attention(qc, kc, vc, None, self.fp32_islands, not self.training) for qc, kc, vc in chunks])
        out = rearrange(out, "b h s d -> b s (h d)")
        seq = seq + self.proj_out(out)
        if self.mlp is not None:
            seq = self.mlp(seq)
        return rearrange(seq, "(n h w) t c -> (n t) c h w", h=hgt, w=wid)


def temporal_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """`conv` over N C T H W clips. Under CPU autocast it runs in float32: oneDNN's bf16 Conv3d backward (PyTorch
    2.13) returns NaN weight gradients for some inputs, which stopped every bf16 video run a few steps in."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return conv(x)
    with torch.autocast("cpu", enabled=False):
        return conv(x.to(conv.weight.dtype))


class TemporalDownsample(nn.Module):
    """Halve the frames: a kernel-3, stride-2 convolution over time at every pixel (T -> ceil(T / 2))."""

    def __init__(self, channels: int, frames: int) -> None:
        super().__init__()
        self.frames = frames
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fold(temporal_conv(self.conv, unfold(x, self.frames)))


class TemporalUpsample(nn.Module):
    """Double the frames: nearest x2 in time (every frame repeated), then a kernel-3 convolution over time."""

    def __init__(self, channels: int, frames: int) -> None:
        super().__init__()
        self.frames = frames
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fold(temporal_conv(self.conv, unfold(x, self.frames).repeat_interleave(2, dim=2)))
