"""Noise schedules gamma[0..T] (signal variance, alpha-bar) with gamma[0] = 1, the per-level SNR shift, and the
sampler's timestep grids (spacings).

Schedule index t in 0..T has noise level gamma[t]; the network is fed t - 1 (ml-mdm's convention).
"""

from __future__ import annotations

import math

import torch

from mdm.config import DiffusionConfig

_F64 = torch.float64


def _gamma_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """gamma_t = prod_{i<=t} (1 - beta_i) with beta_0 = 0 prepended, so gamma_0 = 1."""
    betas = torch.cat([torch.zeros(1, dtype=_F64), betas])
    return torch.exp(torch.cumsum(torch.log1p(-betas), 0))


def cosine_gamma(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """squaredcos_cap_v2: f(u) = cos^2((u + s)/(1 + s) * pi/2), beta_i = min(1 - f(i/T)/f((i-1)/T), max_beta)."""
    u = torch.arange(T + 1, dtype=_F64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.clamp(1 - f[1:] / f[:-1], max=max_beta)
    return _gamma_from_betas(betas)


def linear_gamma(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear betas from beta_start to beta_end."""
    return _gamma_from_betas(torch.linspace(beta_start, beta_end, T, dtype=_F64))


def logsnr_cosine_gamma(T: int = 1000, logsnr_min: float = -5.0, logsnr_max: float = 5.0) -> torch.Tensor:
    """logSNR(u) = -2 ln tan(a u + b) on u = linspace(0, 1, T), spanning [logsnr_max, logsnr_min]; gamma = sigmoid."""
    b = math.atan(math.exp(-logsnr_max / 2))
    a = math.atan(math.exp(-logsnr_min / 2)) - b
    u = torch.linspace(0, 1, T, dtype=_F64)
    logsnr = -2 * torch.log(torch.tan(a * u + b))
    return torch.cat([torch.ones(1, dtype=_F64), torch.sigmoid(logsnr)])


def sigmoid_gamma(T: int = 1000, logsnr_min: float = -5.0, logsnr_max: float = 5.0) -> torch.Tensor:
    """logSNR falling linearly in t from logsnr_max to logsnr_min; gamma = sigmoid(logSNR)."""
    logsnr = torch.linspace(logsnr_max, logsnr_min, T, dtype=_F64)
    return torch.cat([torch.ones(1, dtype=_F64), torch.sigmoid(logsnr)])


def shift_gamma(gamma: torch.Tensor, scale: float, power: float) -> torch.Tensor:
    """SNR_l = SNR / scale**power, in gamma's own dtype and ml-mdm's operation order (gamma = 1 stays 1)."""
    if scale == 1:
        return gamma.clone()
    snr = gamma / (1 - gamma)
    snr = snr / scale**power
    return 1 / (1 + 1 / snr)


def base_gamma(cfg: DiffusionConfig) -> torch.Tensor:
    """The configured base schedule as float64 (T + 1,)."""
    T = cfg.num_train_timesteps
    if cfg.schedule == "cosine":
        return cosine_gamma(T)
    if cfg.schedule == "linear":
        return linear_gamma(T, cfg.beta_start, cfg.beta_end)
    if cfg.schedule == "logsnr_cosine":
        return logsnr_cosine_gamma(T, cfg.logsnr_min, cfg.logsnr_max)
    return sigmoid_gamma(T, cfg.logsnr_min, cfg.logsnr_max)


def level_gammas(cfg: DiffusionConfig, scales: list[float], dtype: torch.dtype = _F64) -> torch.Tensor:
    """Per-level schedules (L, T + 1) in `dtype`, highest level first: the base shifted by each level's scale.

    With `schedule_fp32` the base table is first rounded to float32, as ml-mdm holds it; the shift is then
    computed in `dtype`, the precision the model runs in (ml-mdm's float32 and float64 numerics alike).
    """
    gamma = base_gamma(cfg)
    if cfg.schedule_fp32:
        gamma = gamma.float()
    gamma = gamma.to(dtype)
    if cfg.snr_shift == "none":
        return torch.stack([gamma.clone() for _ in scales])
    return torch.stack([shift_gamma(gamma, s, cfg.shift_power) for s in scales])


SPACINGS = ("mlmdm", "trailing", "logsnr", "karras")


def _check_steps(num_steps: int, T: int) -> None:
    """Reject step counts outside 1..T."""
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_steps}")


def timestep_grid(num_steps: int, T: int = 1000) -> torch.Tensor:
    """Sampler grid round(k (T+1)/(N+1)) for k = N..0 (half to even, as numpy), descending to 0."""
    _check_steps(num_steps, T)
    ratio = (T + 1) / (num_steps + 1)
    grid = torch.round(torch.arange(num_steps + 1, dtype=_F64) * ratio).long()
    return grid.flip(0)


def half_logsnr(gamma: torch.Tensor) -> torch.Tensor:
    """lambda = ln(alpha / sigma) = (ln gamma - ln(1 - gamma)) / 2 in float64 (+inf where gamma = 1)."""
    g = gamma.double()
    return (g.log() - torch.log1p(-g)) / 2


def sampling_timesteps(spacing: str, num_steps: int, gamma: torch.Tensor, rho: float = 7.0) -> torch.Tensor:
    """Descending schedule indices from high noise down to 0 for `num_steps` steps over the base schedule `gamma`
    (T + 1,): mlmdm = `timestep_grid` (the reference), trailing = round(k T/N) from T, logsnr = uniform in lambda,
    karras = sigma_K = sigma/alpha spaced with rho (Karras et al. 2022, eq. 5).

    logsnr and karras points go to the index nearest in lambda; indices they share are kept once, so those grids can
    have fewer than `num_steps` steps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    T = gamma.numel() - 1
    if spacing == "mlmdm":
        return timestep_grid(num_steps, T)
    _check_steps(num_steps, T)
    if spacing == "trailing":
        return torch.round(torch.arange(num_steps, -1, -1, dtype=_F64) * (T / num_steps)).long()
    lam = half_logsnr(gamma[1:])
    ramp = torch.linspace(0, 1, num_steps, dtype=_F64)
    if spacing == "logsnr":
        target = lam[-1] + ramp * (lam[0] - lam[-1])
    else:
        hi, lo = torch.exp(-lam[-1]) ** (1 / rho), torch.exp(-lam[0]) ** (1 / rho)
        target = -rho * torch.log(hi + ramp * (lo - hi))
    index = (lam[None, :] - target[:, None]).abs().argmin(1) + 1
    return torch.cat([index.unique().flip(0), index.new_zeros(1)])
