"""Building blocks of the UNet: ResNet, 2-D self/cross attention, text transformer blocks and the sinusoidal
embedding. Parameter names follow ml-mdm's so checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (output layers, so new blocks start as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_frequencies(dim: int, fp32: bool) -> torch.Tensor:
    """f_k = exp(-k ln(10^4) / (dim/8)), k < dim/8: the frequency table of a time width `dim`."""
    half = dim // 8
    dtype = torch.float32 if fp32 else torch.float64
    return torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000) / half))


def sinusoidal_embedding(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """[sin(t f), cos(t f)] with sin first; t is the raw (integer) time input, not normalised."""
    arg = t.reshape(-1, 1).to(freqs.dtype) * freqs
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    fp32_softmax: bool,
    sampling: bool = False,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, H, N, d) tensors; `mask` (B, S) keeps keys where True.

    Runs through SDPA with two explicit exceptions. Float64 inputs with `fp32_softmax` round the softmax to float32,
    which is what ml-mdm computes when its model is cast to float64. When `sampling` (the module in eval mode),
    bfloat16 / float16 inputs on the CPU are computed in float32, the arithmetic of SDPA's CPU path for these
    (strided) heads without its per-call bookkeeping: 30-50 % less time at the demos' sizes
    (benchmarks/attention_speed.py). Training keeps PyTorch's kernel: in training this path sped up only the video
    demo, whose runs spread too widely to show it harmless (README, Speed).
    """
    key_mask = None if mask is None else mask[:, None, None, :].bool()
    if q.dtype == torch.float64 and fp32_softmax:
        return _explicit_attention(q, k, v, key_mask)
    if sampling and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            return _explicit_attention(q.float(), k.float(), v.float(), key_mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def _explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention with the softmax in float32 (or wider); a query whose keys are all masked gets 0, as from SDPA."""
    s = q.shape[-1] ** -0.25
    logits = (q * s) @ (k * s).transpose(-1, -2)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    weights = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    if key_mask is not None:
        weights = weights.masked_fill(~key_mask.any(-1, keepdim=True), 0)
    return weights @ v


def position_code(channels: int, side: int) -> torch.Tensor:
    """A (channels, side, side) 2-D sinusoidal position code: [sin, cos] of the column at channels // 4 frequencies
    (the time embedding's table) in the first half, of the row in the second; any channels left over are 0."""
    d, out = channels // 4, torch.zeros(channels, side, side)
    if d:
        code = sinusoidal_embedding(torch.arange(side), timestep_frequencies(8 * d, fp32=True)).T  # (2 d, side)
        out[: 2 * d] = code[:, None, :].expand(-1, side, -1)
        out[2 * d : 4 * d] = code[:, :, None].expand(-1, -1, side)
    return out


class ResNet(nn.Module):
    """GN-SiLU-conv, then GN * (1 + scale) + shift from the time embedding, SiLU, dropout, zero-init conv."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_layer = nn.Linear(temb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.conv3 = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_layer(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return h + (x if self.conv3 is None else self.conv3(x))


class Attention2D(nn.Module):
    """Self-attention over pixels plus, with a context, cross-attention of the same queries to the text tokens.

    The two attentions use separate softmaxes and are summed before `proj_out`; heads are contiguous channel
    blocks of q, k and v. An optional feed-forward (GN, 1x1 conv to 4C, GELU, zero-init 1x1 conv) follows.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, ffn: bool, fp32_softmax: bool) -> None:
        super().__init__()
        self.heads = heads
        self.fp32_islands = fp32_softmax
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.norm_cond = nn.LayerNorm(context_dim) if context_dim > 0 else None  # cross-attention (optional)
        self.kv_cond = nn.Linear(context_dim, 2 * channels) if context_dim > 0 else None
        self.proj_out = zero_(nn.Conv2d(channels, channels, 1))
        self.ffn = (
            nn.Sequential(
                nn.GroupNorm(32, channels),
                nn.Conv2d(channels, 4 * channels, 1),
                nn.GELU(),
                zero_(nn.Conv2d(4 * channels, channels, 1)),
            )
            if ffn
            else None
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        hgt, wid = x.shape[-2:]
        q, k, v = (
            rearrange(t, "b (h d) n -> b h n d", h=self.heads)
            for t in self.qkv(self.norm(x)).flatten(2).chunk(3, dim=1)
        )
        out = attention(q, k, v, None, self.fp32_islands, not self.training)
        if self.kv_cond is not None:
            if context is None:
                raise ValueError("this network has cross-attention: a conditioning context is required")
            kc, vc = (
                rearrange(t, "b s (h d) -> b h s d", h=self.heads)
                for t in self.kv_cond(self.norm_cond(context)).chunk(2, dim=-1)
            )
            out = out + attention(q, kc, vc, mask, self.fp32_islands, not self.training)
        out = rearrange(out, "b h (y x) d -> b (h d) y x", y=hgt, x=wid)
        x = x + self.proj_out(out)
        if self.ffn is not None:
            x = x + self.ffn(x)
        return x


class Attention1D(nn.Module):
    """Pre-LayerNorm self-attention over a token sequence with a zero-init output projection."""

    def __init__(self, channels: int, heads: int, fp32_softmax: bool) -> None:
        super().__init__()
        self.heads = heads
        self.fp32_islands = fp32_softmax
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (rearrange(t, "b s (h d) -> b h s d", h=self.heads) for t in self.qkv(self.norm(x)).chunk(3, -1))
        out = rearrange(attention(q, k, v, mask, self.fp32_islands, not self.training), "b h s d -> b s (h d)")
        return x + self.proj_out(out)


class MLP(nn.Module):
    """Residual LayerNorm, Linear to 4C, GELU, zero-init Linear."""

    def __init__(self, channels: int, mult: int = 4) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.LayerNorm(channels),
            nn.Linear(channels, mult * channels),
            nn.GELU(),
            zero_(nn.Linear(mult * channels, channels)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class TextBlock(nn.Module):
    """One `lm_head` transformer block over the text tokens: attention then MLP."""

    def __init__(self, channels: int, heads: int, fp32_softmax: bool) -> None:
        super().__init__()
        self.attn = Attention1D(channels, heads, fp32_softmax)
        self.mlp = MLP(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(self.attn(x, mask))
