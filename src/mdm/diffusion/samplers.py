"""Samplers that step every level of the pyramid jointly, each with its own shifted noise level.

One step from grid time tau to tau' < tau, per level with g = gamma_l(tau), g' = gamma_l(tau'):
  x0 = threshold(x0_hat(z, pred)),  alpha = g/g',  beta = 1 - alpha,  beta~ = beta (1 - g') / (1 - g)
  DDPM (Ho et al. 2020, eq. 7):  z' = x0 beta sqrt(g') / (1 - g) + z sqrt(alpha) (1 - g') / (1 - g) + sqrt(beta~) n
  DDIM (Song et al. 2021, eq. 12): eps = (z - sqrt(g) x0) / sqrt(1 - g),
                                   z' = sqrt(g') x0 + sqrt(1 - g' - eta^2 beta~) eps + eta sqrt(beta~) n
The network is fed tau - 1. Classifier-free guidance runs [unconditional; conditional] as one batch and
combines every level's output as u + w (c - u).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from mdm.diffusion.process import Denoiser, Pyramid, _b, predict_x0
from mdm.models.conditioning import Conditioning, concat

StepCallback = Callable[[int, int, Pyramid], None]


def threshold(x0: torch.Tensor, kind: str) -> torch.Tensor:
    """Clip to [-1, 1], or dynamic thresholding: q = per-sample quantile of |x0| (Imagen: 0.995 clamped to
    [1, 100]; DeepFloyd `dynamic_if`: 0.95 clamped to [1, 1.5]), then clamp to [-q, q] and divide by q.

    The quantile is taken in float32 (float64 inputs stay float64)."""
    if kind == "none":
        return x0
    if kind == "clip":
        return x0.clamp(-1, 1)
    level, high = (0.995, 100.0) if kind == "dynamic" else (0.95, 1.5)
    flat = x0.abs().flatten(1)
    q = torch.quantile(flat if flat.dtype == torch.float64 else flat.float(), level, dim=1).clamp(1.0, high)
    q = _b(q, x0)
    return torch.maximum(torch.minimum(x0, q), -q) / q


def step(
    z: torch.Tensor,
    x0: torch.Tensor,
    g: torch.Tensor,
    g_next: torch.Tensor,
    sampler: str,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """One DDPM or DDIM(eta) update of a level from its thresholded x0 estimate (see module docstring)."""
    alpha = g / g_next
    beta = 1 - alpha
    var = (beta * (1 - g_next) / (1 - g)).clamp(min=0)
    if sampler == "ddpm":
        out = x0 * (beta * g_next.sqrt() / (1 - g)) + z * (alpha.sqrt() * (1 - g_next) / (1 - g))
    else:
        eps = (z - g.sqrt() * x0) / (1 - g).sqrt()
        var = eta**2 * var
        out = g_next.sqrt() * x0 + (1 - g_next - var).clamp(min=0).sqrt() * eps
    if noise is not None:
        out = out + var.sqrt() * noise
    return out


def sample(
    model: Denoiser,
    noise: Pyramid,
    gammas: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning | None,
    uncond: Conditioning | None = None,
    *,
    prediction_type: str = "v",
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    thresholding: str = "clip",
    generator: torch.Generator | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
) -> Pyramid:
    """Run the reverse process from `noise` (one tensor per level) over the descending grid `timesteps`.

    `gammas` is the (L, T + 1) per-level schedule in the state's dtype. With guidance_scale != 1 the model
    sees [uncond; cond]. Step noise is drawn from `generator` level by level, high to low. `callback(i, tau,
    state)` runs after each step. Returns the final pyramid (level 0 clipped to [-1, 1]).
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if thresholding not in ("clip", "dynamic", "dynamic_if", "none"):
        raise ValueError(f"unknown thresholding {thresholding!r}")
    guided = guidance_scale != 1.0
    if guided and uncond is None:
        raise ValueError("guidance_scale != 1 needs an unconditional condition")
    both = concat([uncond, cond]) if guided else cond
    state = [n.clone() for n in noise]
    batch = state[0].shape[0]
    stochastic = sampler == "ddpm" or eta > 0
    pairs = list(zip(timesteps[:-1].tolist(), timesteps[1:].tolist(), strict=True))
    for i, (tau, tau_next) in enumerate(tqdm(pairs, desc="sampling", disable=not progress, leave=False)):
        t_in = torch.full((batch * (2 if guided else 1),), tau - 1, dtype=torch.long, device=state[0].device)
        inputs = [torch.cat([z, z]) for z in state] if guided else state
        with torch.no_grad():
            preds = model(inputs, t_in, both)
        if guided:
            preds = [u + guidance_scale * (c - u) for u, c in (p.to(state[0].dtype).chunk(2) for p in preds)]
        new_state = []
        for lvl, (z, p) in enumerate(zip(state, preds, strict=True)):
            g, g_next = gammas[lvl, tau].to(z), gammas[lvl, tau_next].to(z)
            x0 = threshold(predict_x0(p.to(z.dtype), z, g, prediction_type), thresholding)
            n = None
            if stochastic and tau_next > 0:
                n = torch.randn(z.shape, generator=generator, device="cpu").to(z)
            new_state.append(step(z, x0, g, g_next, sampler, eta, n))
        state = new_state
        if callback is not None:
            callback(i, tau, state)
    state[0] = state[0].clamp(-1, 1)
    return state
