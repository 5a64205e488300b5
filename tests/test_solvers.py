"""Solver accuracy: convergence order on an exactly solvable pyramid, and agreement with diffusers' schedulers."""

import math

import pytest
import torch

from mdm.diffusion.process import Pyramid, x0_to
from mdm.diffusion.samplers import SAMPLERS, Grid, gaussian_noise, run
from mdm.diffusion.schedule import cosine_gamma, sampling_timesteps

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers on numpy 2

# Per-level Gaussian data x0 ~ N(mu_l, s_l^2 I), independent across levels, under a continuous VP schedule with the
# MDM shift lambda_l = lambda_0 - c_l. Then E[x0 | z] = mu + alpha s^2 (z - alpha mu) / (alpha^2 s^2 + sigma^2), and
# the probability-flow ODE keeps (z - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) constant.
MU = (0.3, -0.2, 0.1)
STD = (0.5, 0.7, 0.9)
SHIFT = torch.tensor([math.log(4.0), math.log(2.0), 0.0], dtype=F64)
SIDES = (4, 2, 1)


def analytic_grid(steps: int) -> Grid:
    """`steps` steps uniform in the base lambda from -3 to 3, then a last point at sigma = 0."""
    lam = torch.linspace(-3.0, 3.0, steps + 1, dtype=F64)[None] - SHIFT[:, None]
    gamma = torch.cat([torch.sigmoid(2 * lam), torch.ones(3, 1, dtype=F64)], 1)
    return Grid(torch.arange(steps + 1, -1, -1), gamma)


def _spread(lvl: int, grid: Grid, i: int) -> float:
    """Standard deviation of z at a level and grid point: sqrt(alpha^2 s^2 + sigma^2)."""
    return math.hypot(grid.alpha[lvl, i].item() * STD[lvl], grid.sigma[lvl, i].item())


def posterior_mean(grid: Grid):
    """The exact denoiser E[x0 | z] of every level."""

    def denoise(x: Pyramid, i: int) -> Pyramid:
        alpha = grid.alpha[:, i].tolist()
        return [
            MU[lvl] + alpha[lvl] * STD[lvl] ** 2 / _spread(lvl, grid, i) ** 2 * (z - alpha[lvl] * MU[lvl])
            for lvl, z in enumerate(x)
        ]

    return denoise


def flow(x: Pyramid, grid: Grid, i: int) -> Pyramid:
    """The exact probability-flow solution at grid point i from the state x at point 0."""
    alpha = grid.alpha.tolist()
    return [
        alpha[lvl][i] * MU[lvl] + _spread(lvl, grid, i) / _spread(lvl, grid, 0) * (z - alpha[lvl][0] * MU[lvl])
        for lvl, z in enumerate(x)
    ]


def solve_error(sampler: str, steps: int) -> float:
    """Max error at the last noisy point (after steps steps; the step into sigma = 0 would return x0)."""
    grid = analytic_grid(steps)
    generator = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 1, n, n, generator=generator, dtype=F64) for n in SIDES]
    states = list(SAMPLERS[sampler](posterior_mean(grid), x, grid, gaussian_noise()))
    return max((a - b).abs().max().item() for a, b in zip(states[steps - 1], flow(x, grid, steps), strict=True))


STEPS = (16, 32, 64, 128)


@pytest.mark.parametrize(
    ("sampler", "bound"),
    [("ddim", -0.8), ("heun", -1.7), ("dpmpp_2m", -1.7), ("dpmpp_3m", -2.5), ("unipc", -2.5), ("unipc_3", -2.5)],
)
def test_error_falls_at_the_solver_order(sampler, bound):
    errors = torch.tensor([solve_error(sampler, n) for n in STEPS], dtype=F64)
    x = torch.tensor(STEPS, dtype=F64).log()
    y = errors.log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert slope < bound, (slope.item(), errors.tolist())


def test_dpmpp_2m_beats_ddim_at_equal_nfe():
    for n in STEPS:
        assert solve_error("dpmpp_2m", n) < solve_error("ddim", n) / 3, n


def _gaussian_like_network(table: torch.Tensor, kind: str):
    """A single-level 'network' at diffusers' time t: a smooth nonlinear x0 estimate, expressed as v or eps."""
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)) * 0.5

    def network(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = table[t + 1].to(z).view(-1, 1, 1, 1)
        mix = torch.einsum("ij,bjhw->bihw", weight.to(z), z) + (t.to(z) / 1000).view(-1, 1, 1, 1)
        x0 = 0.25 * g.sqrt() * z / (1 - 0.75 * g) + 0.3 * torch.tanh(mix)
        return x0_to(kind, x0, z, g)

    return network


@pytest.mark.parametrize("kind", ["v", "eps"])
@pytest.mark.parametrize("steps", [6, 25])
@pytest.mark.parametrize(("sampler", "order"), [("dpmpp_2m", 2), ("unipc", 2), ("unipc_3", 3)])
def test_multistep_solvers_match_diffusers(kind, steps, sampler, order):
    """Same cosine schedule (our betas through `trained_betas`) and the same integer times.

    diffusers' alphas_cumprod[t] = prod_{i<=t}(1 - betas[i]) is our gamma[t + 1] (our table starts at gamma[0] = 1),
    and its model is called at t where ours is fed tau - 1: so diffusers' timesteps t are our grid tau = t + 1,
    followed by tau = 0 (diffusers' final sigma 0). Our table is diffusers' float32 alphas_cumprod with 1 prepended,
    so only the solvers' arithmetic differs (ours float64, theirs float32). eps runs on the 'leading' spacing: at
    diffusers' first 'linspace' time, 999, x0 = (z - sigma eps)/alpha magnifies float32 rounding by sigma/alpha ~ 2e4.
    """
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    gamma = cosine_gamma()
    common = dict(
        trained_betas=(1 - gamma[1:] / gamma[:-1]).tolist(),
        prediction_type={"v": "v_prediction", "eps": "epsilon"}[kind],
        solver_order=order,
        timestep_spacing="linspace" if kind == "v" else "leading",
    )
    if sampler == "dpmpp_2m":
        scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    else:
        scheduler = diffusers.UniPCMultistepScheduler(solver_type="bh2", **common)
    scheduler.set_timesteps(steps)
    table = torch.cat([torch.ones(1, dtype=F64), scheduler.alphas_cumprod.double()])
    network = _gaussian_like_network(table, kind)
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = start.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(network(theirs, t.expand(2)), t, theirs).prev_sample
    grid = torch.cat([scheduler.timesteps + 1, torch.zeros(1, dtype=torch.long)])
    states = []
    out = run(
        lambda zs, t, cond: [network(zs[0], t)],
        [start.double()],
        table[None],
        grid,
        sampler=sampler,
        prediction_type=kind,
        thresholding="none",
        progress=False,
        callback=lambda i, tau, state: states.append(state[0]),
    )
    assert out.nfe == steps
    assert (states[-1] - theirs.double()).abs().max() <= 1e-5


def test_trailing_spacing_matches_diffusers():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    gamma = cosine_gamma()
    scheduler = diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing")
    for steps in (1, 7, 10, 50, 1000):
        scheduler.set_timesteps(steps)
        assert torch.equal(sampling_timesteps("trailing", steps, gamma)[:-1] - 1, scheduler.timesteps), steps
