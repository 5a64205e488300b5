"""Classifier-free guidance as a wrapper around the network, so that samplers only ever see one model output.

With guidance on, the network runs once on the batch [unconditional; conditional] and every level's output becomes
u + w_l (c - u) (Ho & Salimans 2022), on the raw output (v, eps or x0), before any conversion. A guidance interval
(Kynkäänniemi et al. 2024) restricts this to the steps where the base level's logSNR lies in [lo, hi]; elsewhere only
the conditional branch runs, at half the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mdm.diffusion.process import Denoiser, Pyramid
from mdm.models.conditioning import Conditioning, concat

IndexedNetwork = Callable[[Pyramid, int], Pyramid]
"""The network's raw output for a state at schedule index tau, with its condition (and guidance) bound."""


@dataclass(frozen=True)
class Guidance:
    """Guidance scale w, optional per-level scales (highest level first; they replace `scale`), and an optional
    interval [lo, hi] of the base level's logSNR = ln(gamma / (1 - gamma)) outside which guidance is skipped."""

    scale: float = 1.0
    level_scales: tuple[float, ...] | None = None
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        scales = [self.scale, *(self.level_scales or ())]
        if not all(math.isfinite(w) and w >= 0 for w in scales):
            raise ValueError(f"guidance scales must be finite and >= 0, got {scales}")
        if self.level_scales is not None and not self.level_scales:
            raise ValueError("Guidance.level_scales must name one scale per level")
        if self.interval is not None and not self.interval[0] <= self.interval[1]:
            raise ValueError(f"Guidance.interval must be (lo, hi) with lo <= hi, got {self.interval}")

    @property
    def requested(self) -> bool:
        """Whether any level's scale differs from 1."""
        return any(w != 1.0 for w in self.level_scales or (self.scale,))

    def scales(self, num_levels: int) -> list[float]:
        """The scale of every level, highest first."""
        if self.level_scales is None:
            return [self.scale] * num_levels
        if len(self.level_scales) != num_levels:
            raise ValueError(f"Guidance.level_scales has {len(self.level_scales)} values for {num_levels} levels")
        return list(self.level_scales)

    def applies_at(self, gamma: float) -> bool:
        """Whether the interval (if any) contains the logSNR of noise level `gamma` (+-inf at gamma 1 / 0, which a
        float32 schedule can round to)."""
        if self.interval is None:
            return True
        if not 0.0 < gamma < 1.0:
            return self.interval[0] <= (math.inf if gamma >= 1.0 else -math.inf) <= self.interval[1]
        return self.interval[0] <= math.log(gamma) - math.log1p(-gamma) <= self.interval[1]


def guidance_on(guidance: Guidance, has_uncond: bool) -> bool:
    """Whether classifier-free guidance runs at all: some scale differs from 1 and there is an unconditional branch
    (a conditional model) to contrast with."""
    return has_uncond and guidance.requested


def _call(network: Denoiser, zs: Pyramid, tau: int, cond: Conditioning | None) -> Pyramid:
    """One network evaluation at schedule index tau; the network is fed tau - 1 (ml-mdm's time convention)."""
    t = torch.full((zs[0].shape[0],), tau - 1, dtype=torch.long, device=zs[0].device)
    with torch.no_grad():
        return network(zs, t, cond)


def guide(
    network: Denoiser,
    cond: Conditioning | None,
    uncond: Conditioning | None = None,
    guidance: Guidance | None = None,
    base_gamma: torch.Tensor | None = None,
) -> IndexedNetwork:
    """Bind the condition and guidance to `network`: the result maps (state, tau) to the (guided) raw output.

    `base_gamma` (T + 1,) is the base level's schedule that a guidance interval is measured on (the lowest level,
    whose schedule is the unshifted base with the default `shift_base_size`).
    """
    guidance = guidance or Guidance()
    if guidance.requested and cond is not None and uncond is None:
        raise ValueError("guidance scale != 1 needs an unconditional condition (uncond)")
    if guidance.interval is not None and base_gamma is None:
        raise ValueError("a guidance interval needs the base schedule (base_gamma)")
    if not guidance_on(guidance, cond is not None and uncond is not None):
        return lambda zs, tau: _call(network, zs, tau, cond)
    both = concat([uncond, cond])
    table = None if guidance.interval is None else base_gamma.double().cpu()

    def guided(zs: Pyramid, tau: int) -> Pyramid:
        if table is not None and not guidance.applies_at(float(table[tau])):
            return _call(network, zs, tau, cond)
        preds = _call(network, [torch.cat([z, z]) for z in zs], tau, both)
        halves = (p.to(zs[0].dtype).chunk(2) for p in preds)
        return [u + w * (c - u) for w, (u, c) in zip(guidance.scales(len(zs)), halves, strict=True)]

    return guided
