"""The multi-resolution forward process and training loss of MDM.

A clean image becomes a pyramid by average pooling; every level l is noised with its own noise and its own
noise level gamma_l(t) (the base schedule with SNR divided by s_l**p):  z^l = sqrt(gamma_l) x^l + sqrt(1 -
gamma_l) eps^l.  The loss is sum_l w_l * mean_{C,H,W} (target^l - converted prediction^l)^2 (paper eq. 4,
ml-mdm's v-output / eps-loss form by default).

A clip (N C T H W) becomes a pyramid of (frames, side) levels: a space step pools every frame, a time step
sub-samples the frames. Its shift scale is the square root of the level's pixels x frames over the base's.
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
from mdm.models.temporal import fold, unfold

Pyramid = list[torch.Tensor]
Denoiser = Callable[[Pyramid, torch.Tensor, Conditioning | None], Pyramid]


LevelShape = int | tuple[int, int]
"""A pyramid level: its side (images), or (frames, side)."""
TEMPORAL_DOWNSAMPLES = ("first", "middle", "mean")


def _shapes(sizes: list[LevelShape]) -> list[tuple[int, int]]:
    """Every level as (frames, side); a bare side is a one-frame level."""
    return [(1, s) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in sizes]


def subsample_frames(x: torch.Tensor, factor: int, how: str = "first") -> torch.Tensor:
    """Every `factor`-th frame of N C T H W clips: frames 0, k, 2k.. ("first"), k//2 + i k ("middle"), or the mean
    of each group of k frames ("mean")."""
    if how not in TEMPORAL_DOWNSAMPLES:
        raise ValueError(f"temporal_downsample must be one of {', '.join(TEMPORAL_DOWNSAMPLES)}, got {how!r}")
    if x.shape[2] % factor:
        raise ValueError(f"{x.shape[2]} frames do not split into groups of {factor}")
    if how == "mean":
        return x.unflatten(2, (-1, factor)).mean(3)
    return x[:, :, (factor // 2 if how == "middle" else 0) :: factor]


def build_pyramid(x: torch.Tensor, sizes: list[LevelShape], temporal_downsample: str = "first") -> Pyramid:
    """The image or clip at every level, highest first: level l is the box-filtered (avg-pool) level l - 1.

    Clips (N C T H W) take (frames, side) levels: a step that lowers the frames sub-samples them by the ratio to
    the level above (`temporal_downsample`, see :func:`subsample_frames`); one that lowers the side pools every
    frame. Images (N C H W) take sides, or (1, side)."""
    shapes = _shapes(sizes)
    side = shapes[0][1]
    if x.shape[-1] != side or x.shape[-2] != side:
        raise ValueError(f"images must be {side}x{side}, got {tuple(x.shape[-2:])}")
    if x.dim() == 5 and x.shape[2] != shapes[0][0]:
        raise ValueError(f"clips must have {shapes[0][0]} frames, got {x.shape[2]}")
    if x.dim() != 5 and any(f != 1 for f, _ in shapes):
        raise ValueError(f"levels of several frames {shapes} need clips (N, C, T, H, W), got {tuple(x.shape)}")
    levels = [x]
    for (f_hi, hi), (f_lo, lo) in pairwise(shapes):
        level = levels[-1]
        if f_lo != f_hi:
            level = subsample_frames(level, f_hi // f_lo, temporal_downsample)
        if lo != hi and level.dim() == 5:
            level = unfold(F.avg_pool2d(fold(level), kernel_size=hi // lo), level.shape[2])
        elif lo != hi:
            level = F.avg_pool2d(level, kernel_size=hi // lo)
        levels.append(level)
    return levels


def _level_shape(level: torch.Tensor) -> LevelShape:
    """A level's side (N C H W images) or (frames, side) (N C T H W clips)."""
    return (level.shape[2], level.shape[-1]) if level.dim() == 5 else level.shape[-1]


def project_levels(x0: Pyramid, temporal_downsample: str = "first") -> Pyramid:
    """Every level corrected, from the lowest up, so that the model's pyramid of it is the level below:
    x^l + U(x^(l+1) - D(x^l)), D one pyramid step, U repeating each lower pixel (frame) over the block (group) it
    stands for, so that D(U(a)) = a. The lowest level is kept.

    The exact denoiser's x0 estimates already agree this way (the pyramid is linear and the data's levels are
    pyramids of the top level), so the correction removes only the network's disagreement between its levels."""
    out = list(x0)
    for i in range(len(out) - 2, -1, -1):
        hi, lo = out[i], out[i + 1]
        gap = lo - build_pyramid(hi, [_level_shape(hi), _level_shape(lo)], temporal_downsample)[1]
        if hi.dim() == 5:
            gap = gap.repeat_interleave(hi.shape[2] // lo.shape[2], dim=2)
        side = hi.shape[-1] // lo.shape[-1]
        out[i] = hi + gap.repeat_interleave(side, dim=-2).repeat_interleave(side, dim=-1)
    return out


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
    """Schedules of every level and the training loss of a pyramid model.

    `sizes` lists every level's side (images) or (frames, side) (`ModelConfig.level_shapes()`; clips when the top
    level has several frames). Level l's shift scale is s_l = (side_l / base) * sqrt(frames_l / base frames), the
    square root of its pixels x frames over the base's: the side ratio for images, exactly as before.
    """

    def __init__(self, config: DiffusionConfig, sizes: list[LevelShape]) -> None:
        self.config = config
        self.shapes = _shapes(sizes)
        self.sizes = [side for _, side in self.shapes]
        self.video = self.shapes[0][0] > 1
        base, base_frames = config.shift_base_size or self.sizes[-1], self.shapes[-1][0]
        self.scales = [s / base * (f / base_frames) ** 0.5 for f, s in self.shapes]
        self._tables: dict[torch.dtype, torch.Tensor] = {}

    def item_shapes(self, channels: int) -> list[tuple[int, ...]]:
        """One sample's shape at every level, highest first: (C, H, W), or (C, T, H, W) for clips."""
        return [(channels, f, s, s) if self.video else (channels, s, s) for f, s in self.shapes]

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
        """Multi-level denoising loss of a batch of top-level images x (B, C, H, W) or clips (B, C, T, H, W) in
        [-1, 1] (every level's MSE is a mean over C, (T,) H, W).

        `t` (network input, schedule index t + 1) and per-level `noise` are drawn from `generator` in that
        order (t, then noise high to low) unless given, so a run is reproducible.
        """
        cfg = self.config
        batch = x.shape[0]
        if t is None:
            t = self.sample_t(batch, generator, x.device)
        t = t.to(x.device)
        levels = build_pyramid(x, self.shapes if self.video else self.sizes, cfg.temporal_downsample)
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
