"""The multi-resolution forward process and training loss of MDM.

A clean image becomes a pyramid by average pooling; every level l is noised with its own noise and its own
noise level gamma_l(t) (the base schedule with SNR divided by s_l**p):  z^l = sqrt(gamma_l) x^l + sqrt(1 -
gamma_l) eps^l.  The loss is sum_l w_l * mean_{C,H,W} (target^l - converted prediction^l)^2 (paper eq. 4,
ml-mdm's v-output / eps-loss form by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from mdm.config import DiffusionConfig, mixed_fractions, mixed_rows
from mdm.diffusion.schedule import level_gammas
from mdm.models.conditioning import Conditioning

Pyramid = list[torch.Tensor]
Denoiser = Callable[[Pyramid, torch.Tensor, Conditioning | None], Pyramid]


def build_pyramid(x: torch.Tensor, sizes: list[int]) -> Pyramid:
    """The image at every level, highest first: level l is the box-filtered (avg-pool) level l - 1."""
    if x.shape[-1] != sizes[0] or x.shape[-2] != sizes[0]:
        raise ValueError(f"images must be {sizes[0]}x{sizes[0]}, got {tuple(x.shape[-2:])}")
    levels = [x]
    for hi, lo in pairwise(sizes):
        levels.append(F.avg_pool2d(levels[-1], kernel_size=hi // lo))
    return levels


def _b(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (B,) or scalar coefficient over an image batch, in its dtype."""
    g = torch.as_tensor(g, device=like.device).to(like.dtype)
    return g.reshape(-1, *([1] * (like.dim() - 1))) if g.dim() else g


def q_sample(x0: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(gamma) x0 + sqrt(1 - gamma) eps."""
    return _b(gamma.sqrt(), x0) * x0 + _b((1 - gamma).sqrt(), x0) * noise


def target(kind: str, x0: torch.Tensor, noise: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Regression target: eps, x0, or v = sqrt(gamma) eps - sqrt(1 - gamma) x0."""
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    return _b(gamma.sqrt(), x0) * noise - _b((1 - gamma).sqrt(), x0) * x0


def predict_x0(pred: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, kind: str) -> torch.Tensor:
    """x0 from a network output: v -> sqrt(g) z - sqrt(1-g) v;  eps -> (z - sqrt(1-g) eps) / sqrt(g)."""
    if kind == "x0":
        return pred
    sg, s1g = _b(gamma.sqrt(), z), _b((1 - gamma).sqrt(), z)
    if kind == "v":
        return sg * z - s1g * pred
    return (z - s1g * pred) / sg


def x0_to(kind: str, x0: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Express an x0 estimate as `kind`: eps = (z - sqrt(g) x0)/sqrt(1-g), v = (sqrt(g) z - x0)/sqrt(1-g)."""
    if kind == "x0":
        return x0
    sg, s1g = _b(gamma.sqrt(), z), _b((1 - gamma).sqrt(), z)
    if kind == "eps":
        return (z - sg * x0) / s1g
    return (sg * z - x0) / s1g


def convert(pred: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Convert a prediction between the eps, v and x0 parameterisations (through x0)."""
    if src == dst:
        return pred
    return x0_to(dst, predict_x0(pred, z, gamma, src), z, gamma)


@dataclass
class LossOutput:
    """Per-sample loss (B,), per-level per-sample MSE (L, B), the network time input, noise levels, and how
    many leading rows each level processed (all of them unless the batch is mixed-resolution)."""

    loss: torch.Tensor
    level_mse: torch.Tensor
    t: torch.Tensor
    gammas: torch.Tensor
    rows: list[int]


class MultiLevelDiffusion:
    """Schedules of every level and the training loss of a pyramid model."""

    def __init__(self, config: DiffusionConfig, sizes: list[int]) -> None:
        self.config = config
        self.sizes = list(sizes)
        base = config.shift_base_size or sizes[-1]
        self.scales = [s / base for s in sizes]
        self._tables: dict[torch.dtype, torch.Tensor] = {}

    @property
    def num_levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.sizes)

    @property
    def T(self) -> int:
        """Number of training timesteps."""
        return self.config.num_train_timesteps

    def gammas(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """All per-level schedules (L, T + 1) as computed in `dtype` (cached)."""
        if dtype not in self._tables:
            self._tables[dtype] = level_gammas(self.config, self.scales, dtype)
        return self._tables[dtype]

    def gamma(self, index: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """gamma_l at schedule index (B,) for every level: (L, B)."""
        return self.gammas(dtype).to(index.device)[:, index]

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device: str = "cpu") -> torch.Tensor:
        """Network time input k ~ U{0..T-1}; the sample is noised at schedule index k + 1."""
        return torch.randint(0, self.T, (batch,), generator=generator, device="cpu").to(device)

    def loss(
        self,
        model: Denoiser,
        x: torch.Tensor,
        cond: Conditioning | None = None,
        t: torch.Tensor | None = None,
        noise: Pyramid | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Multi-level denoising loss of a batch of top-level images x (B, C, H, W) in [-1, 1].

        `t` (network input, schedule index t + 1) and per-level `noise` are drawn from `generator` in that
        order (t, then noise high to low) unless given, so a run is reproducible.
        """
        cfg = self.config
        batch = x.shape[0]
        if t is None:
            t = self.sample_t(batch, generator, x.device)
        t = t.to(x.device)
        levels = build_pyramid(x, self.sizes)
        if noise is None:
            noise = [torch.randn(lv.shape, generator=generator, device="cpu").to(lv) for lv in levels]
        gam = self.gamma(t + 1, x.dtype if x.dtype == torch.float64 else torch.float32)
        zs = [q_sample(lv, g, n) for lv, g, n in zip(levels, gam, noise, strict=True)]

        fractions = mixed_fractions(cfg.mixed_ratio) if cfg.mixed_ratio else [1.0] * self.num_levels
        rows = mixed_rows(cfg.mixed_ratio, batch, self.num_levels)
        preds = model([z[:r] for z, r in zip(zs, rows, strict=True)], t, cond)
        weights = cfg.level_weights or [1.0] * self.num_levels
        level_mse, total = [], torch.zeros(batch, device=x.device, dtype=torch.float32)
        for i, (p, z, lv, n, g) in enumerate(zip(preds, zs, levels, noise, gam, strict=True)):
            if p.shape[0] < batch:
                p = torch.cat([p, p.new_zeros(batch - p.shape[0], *p.shape[1:])])
            p = p.to(z.dtype)
            est = convert(p, z, g, cfg.prediction_type, cfg.loss_target)
            mse = (est - target(cfg.loss_target, lv, n, g)).pow(2).flatten(1).mean(1)
            level_mse.append(mse)
            if i == 0 or cfg.loss_on_all_levels:
                keep = (torch.arange(batch, device=x.device) < rows[i]).to(mse.dtype)
                total = total + weights[i] * mse / fractions[i] * keep
            else:
                total = total + 0.0 * p.mean()
        return LossOutput(loss=total, level_mse=torch.stack(level_mse), t=t, gammas=gam, rows=rows)
