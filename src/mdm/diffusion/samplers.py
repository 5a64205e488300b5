"""Samplers that step every level of the pyramid jointly over one integer grid, each level at its own noise level.

A sampler is a generator over (denoise, state, grid, noise) that yields the pyramid after every step; `denoise(z, i)`
returns each level's thresholded x0 estimate at grid point i. Per level, alpha = sqrt(gamma_l), sigma =
sqrt(1 - gamma_l) and lambda = ln(alpha / sigma); a step i -> i + 1 has h = lambda_{i+1} - lambda_i, which the SNR
shift (lambda_l = lambda_0 - (p/2) ln s_l) makes the same at every level, while each level keeps its own x0 history.

  DDPM (Ho et al. 2020, eq. 7), g = gamma(tau), g' = gamma(tau'), beta~ = (1 - g/g') (1 - g') / (1 - g):
      z' = x0 (1 - g/g') sqrt(g') / (1 - g) + z sqrt(g/g') (1 - g') / (1 - g) + sqrt(beta~) n
  DDIM (Song et al. 2021, eq. 12): z' = sqrt(g') x0 + sqrt(1 - g' - eta^2 beta~) eps + eta sqrt(beta~) n, with
      eta^2 beta~ capped at 1 - g'; at the cap (`renoise`, eta = inf) z' = sqrt(g') x0 + sqrt(1 - g') n re-noises
      the x0 estimate afresh and keeps none of the state's noise (the multistep sampling of consistency models,
      Song et al. 2023, Alg. 1)
  Exponential integrator in data prediction (DPM-Solver++, Lu et al. 2022), x0 expanded in lambda around point i:
      z' = (sigma'/sigma) z + alpha' [(1 - e^-h) x0 + sum_{n>=1} h^{n+1} phi_{n+1}(-h) x0^(n)],
      phi_k(x) = sum_j x^j / (j + k)!; holding x0 constant (order 1) is DDIM with eta = 0.
  EDM (Karras et al. 2022) in x~ = z/alpha over sigma_K = sigma/alpha: dx~/dsigma_K = (x~ - x0)/sigma_K = eps.

Multistep solvers start at order 1 and drop back to lower order for the last steps; the step into tau = 0
(sigma = 0) returns x0.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import torch
from tqdm.auto import tqdm

from mdm.diffusion.guidance import Guidance, IndexedNetwork, guide
from mdm.diffusion.process import Denoiser, Pyramid, _b, predict_x0, project_levels, x0_to
from mdm.diffusion.schedule import half_logsnr
from mdm.models.conditioning import Conditioning

X0Fn = Callable[[Pyramid, int], Pyramid]
StepNoise = Callable[[Pyramid], Pyramid]
StepCallback = Callable[[int, int, Pyramid], None]
X0Callback = Callable[[int, Pyramid], None]
Generators = torch.Generator | list[torch.Generator] | None
"""One generator for the whole batch, or one per sample (a sample's noise is then the same in any batch)."""
THRESHOLDS = ("clip", "dynamic", "dynamic_if", "none")
PREDICTIONS = ("v", "eps", "x0")


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


@dataclass(frozen=True)
class Grid:
    """The sampling grid: schedule indices tau (N + 1,), strictly descending, and every level's gamma there (L, N + 1).

    gamma keeps its table's dtype (DDPM and DDIM use it as ml-mdm does); alpha, sigma and lambda are float64."""

    tau: torch.Tensor
    gamma: torch.Tensor

    def __post_init__(self) -> None:
        if self.tau.dim() != 1 or self.tau.numel() < 2:
            raise ValueError("a sampling grid needs at least two timesteps")
        if self.gamma.dim() != 2 or self.gamma.shape[1] != self.tau.numel():
            raise ValueError(f"gamma must be (levels, {self.tau.numel()}), got {tuple(self.gamma.shape)}")
        if not bool((self.tau[1:] < self.tau[:-1]).all()):
            raise ValueError(f"timesteps must be strictly descending, got {self.tau.tolist()}")

    @classmethod
    def from_table(cls, gammas: torch.Tensor, timesteps: torch.Tensor) -> Grid:
        """The grid at integer indices `timesteps` of the per-level schedule table `gammas` (L, T + 1)."""
        timesteps = timesteps.long().cpu()
        return cls(timesteps, gammas.cpu()[:, timesteps])

    @property
    def steps(self) -> int:
        """Number of steps N."""
        return self.tau.numel() - 1

    @cached_property
    def alpha(self) -> torch.Tensor:
        """sqrt(gamma) per level and point (L, N + 1)."""
        return self.gamma.double().sqrt()

    @cached_property
    def sigma(self) -> torch.Tensor:
        """sqrt(1 - gamma) per level and point (L, N + 1)."""
        return (1 - self.gamma.double()).sqrt()

    @cached_property
    def lam(self) -> torch.Tensor:
        """lambda = ln(alpha / sigma) per level and point (L, N + 1); +inf at tau = 0."""
        return half_logsnr(self.gamma)

    def h(self, i: int) -> torch.Tensor:
        """Step size in lambda from point i to i + 1, per level (L,)."""
        return self.lam[:, i + 1] - self.lam[:, i]

    def noisy(self, i: int) -> bool:
        """Whether point i still has noise (sigma > 0), so that a step into it draws noise or is corrected."""
        return bool((self.gamma[:, i] < 1).all())


@dataclass
class X0Denoiser:
    """What the samplers call: every level's x0 from the raw network output (v, eps or x0), thresholded before any
    solver history sees it. Counts network evaluations (nfe); a guided batch is one."""

    network: IndexedNetwork
    grid: Grid
    prediction_type: str = "v"
    thresholding: str = "clip"
    nfe: int = 0
    observe: X0Callback | None = None  # sees (i, x0) after every call: the estimates a viewer shows
    project: Callable[[Pyramid], Pyramid] | None = None  # makes the levels agree before thresholding

    def __call__(self, x: Pyramid, i: int) -> Pyramid:
        """x0 of every level of state `x` at grid point i."""
        self.nfe += 1
        preds = self.network(x, int(self.grid.tau[i]))
        x0 = [
            predict_x0(p.to(z.dtype), z, g.to(z), self.prediction_type)
            for z, p, g in zip(x, preds, self.grid.gamma[:, i], strict=True)
        ]
        if self.project is not None:
            x0 = self.project(x0)
        x0 = [threshold(level, self.thresholding) for level in x0]
        if self.observe is not None:
            self.observe(i, x0)
        return x0


def draw(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """N(0, I) of `shape` on the CPU (results do not depend on the device): from one generator, or with one
    generator per sample, each sample (row) from its own."""
    if not isinstance(generator, list):
        return torch.randn(shape, generator=generator, device="cpu")
    check_generators(generator, shape[0])
    return torch.stack([torch.randn(shape[1:], generator=g, device="cpu") for g in generator])


def check_generators(generators: list[torch.Generator], n: int) -> None:
    """A list of generators must hold one per sample of the batch of `n`."""
    if len(generators) != n:
        raise ValueError(f"got {len(generators)} generators for a batch of {n} samples: give one per sample")


def per_sample_noise(generators: list[torch.Generator], shapes: list[tuple[int, ...]]) -> Pyramid:
    """Starting noise of one sample per generator for levels of one-sample `shapes`, highest first: each sample
    draws all its levels in turn from its own generator."""
    levels = [[torch.randn(shape, generator=g) for shape in shapes] for g in generators]
    return [torch.stack(level) for level in zip(*levels, strict=True)]


def gaussian_noise(generator: Generators = None) -> StepNoise:
    """Fresh N(0, I) for every level, high to low, drawn by `draw`."""
    return lambda like: [draw(tuple(z.shape), generator).to(z) for z in like]


def _lin(*terms: tuple[torch.Tensor | float, Pyramid]) -> Pyramid:
    """sum_k c_k x_k at every level; a coefficient is one value per level (L,) or one value for all levels."""

    def at(c: torch.Tensor | float, lvl: int) -> float:
        return float(c[lvl]) if isinstance(c, torch.Tensor) else c

    return [sum(at(c, lvl) * x[lvl] for c, x in terms) for lvl in range(len(terms[0][1]))]


def _order(i: int, steps: int, order: int) -> int:
    """Multistep order at step i: warm up from 1 while the history is short, and wind down to 1 over the last steps
    (diffusers' lower_order_final), where the final step into sigma = 0 returns x0."""
    return min(order, i + 1, steps - i)


def _phi(k: int, x: torch.Tensor) -> torch.Tensor:
    """phi_k(x) = sum_j x^j / (j + k)!, by its series for |x| < 1 and by phi_{k+1} = (phi_k - 1/k!) / x, phi_0 = e^x,
    elsewhere (the recursion cancels badly near 0)."""
    series = sum(x**j / float(math.factorial(j + k)) for j in range(20))
    recursion = torch.exp(x)
    for j in range(k):
        recursion = (recursion - 1 / math.factorial(j)) / x
    return torch.where(x.abs() < 1, series, recursion)


def _exp_step(x: Pyramid, derivatives: list[Pyramid], grid: Grid, i: int) -> Pyramid:
    """Exponential integrator from point i to i + 1 with x0 and its lambda-derivatives at point i (see module)."""
    h, alpha = grid.h(i), grid.alpha[:, i + 1]
    terms = [(grid.sigma[:, i + 1] / grid.sigma[:, i], x), (-alpha * torch.expm1(-h), derivatives[0])]
    terms += [(alpha * h ** (n + 1) * _phi(n + 1, -h), d) for n, d in enumerate(derivatives[1:], 1)]
    return _lin(*terms)


def _taylor(history: list[Pyramid], grid: Grid, i: int) -> list[Pyramid]:
    """x0 and its first and second lambda-derivatives at point i from the polynomial through the history (newest
    first, at points i, i - 1, i - 2), by Newton's divided differences."""
    if len(history) == 1:
        return history
    h0 = grid.h(i - 1)
    d0 = _lin((1 / h0, history[0]), (-1 / h0, history[1]))
    if len(history) == 2:
        return [history[0], d0]
    h1 = grid.h(i - 2)
    d1 = _lin((1 / h1, history[1]), (-1 / h1, history[2]))
    d01 = _lin((1 / (h0 + h1), d0), (-1 / (h0 + h1), d1))
    return [history[0], _lin((1, d0), (h0, d01)), _lin((2, d01))]


def _dpm2(history: list[Pyramid], grid: Grid, i: int) -> Pyramid:
    """DPM-Solver++(2M)'s x0 for the step from point i (Lu et al. 2022, Alg. 2): x0_i + (x0_i - x0_{i-1}) / (2r)
    with r = h_{i-1} / h_i; x0_i alone at order 1."""
    if len(history) == 1:
        return history[0]
    r = grid.h(i - 1) / grid.h(i)
    return _lin((1 + 1 / (2 * r), history[0]), (-1 / (2 * r), history[1]))


def _unipc(x: Pyramid, history: list[Pyramid], grid: Grid, i: int, new: Pyramid | None = None) -> Pyramid:
    """UniPC-bh2 (Zhao et al. 2023) from point i: the exponential step with x0_i + sum_k rho_k D_k, D_k = (x0_k -
    x0_i) / r_k, over the older estimates (r_k = (lambda_k - lambda_i) / h) and, as corrector, the estimate `new` at
    point i + 1 (r = 1); rho solves sum_k rho_k r_k^(j-1) = j! phi_{j+1}(-h) / phi_1(-h), j = 1..K, or is 1/2 for a
    single difference."""
    h = grid.h(i)
    rs = [(grid.lam[:, i - k] - grid.lam[:, i]) / h for k in range(1, len(history))]
    diffs = [_lin((1 / r, m), (-1 / r, history[0])) for r, m in zip(rs, history[1:], strict=True)]
    if new is not None:
        rs.append(torch.ones_like(h))
        diffs.append(_lin((1, new), (-1, history[0])))
    rho: list[torch.Tensor | float] = [0.5] * len(diffs)
    if len(diffs) > 1:
        powers = torch.stack([torch.stack(rs, -1) ** j for j in range(len(rs))], -2)
        rhs = torch.stack([math.factorial(j) * _phi(j + 1, -h) / _phi(1, -h) for j in range(1, len(rs) + 1)], -1)
        rho = list(torch.linalg.solve(powers, rhs).unbind(-1))
    return _exp_step(x, [_lin((1, history[0]), *zip(rho, diffs, strict=True))], grid, i)


def _gamma_pairs(x: Pyramid, grid: Grid, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(gamma, gamma') of every level for the step from point i, in the level's dtype."""
    return [(g.to(z), gn.to(z)) for z, g, gn in zip(x, grid.gamma[:, i], grid.gamma[:, i + 1], strict=True)]


def _posterior_var(g: torch.Tensor, g_next: torch.Tensor) -> torch.Tensor:
    """beta~ = (1 - g/g') (1 - g') / (1 - g), the variance of the DDPM posterior q(z' | z, x0)."""
    return ((1 - g / g_next) * (1 - g_next) / (1 - g)).clamp(min=0)


def ddpm_step(
    z: torch.Tensor, x0: torch.Tensor, g: torch.Tensor, g_next: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    """One ancestral DDPM update of a level (see module); `noise` None gives the posterior mean."""
    alpha = g / g_next
    out = x0 * ((1 - alpha) * g_next.sqrt() / (1 - g)) + z * (alpha.sqrt() * (1 - g_next) / (1 - g))
    return out if noise is None else out + _posterior_var(g, g_next).sqrt() * noise


def ddim_step(
    z: torch.Tensor, x0: torch.Tensor, g: torch.Tensor, g_next: torch.Tensor, eta: float, noise: torch.Tensor | None
) -> torch.Tensor:
    """One DDIM(eta) update of a level, with eps recomputed from the thresholded x0 (see module). The fresh noise's
    variance is capped at 1 - g', so that eta above 1 keeps z' at the schedule's variance and tends to re-noising x0
    afresh (z' = sqrt(g') x0 + sqrt(1 - g') n) instead of overshooting it."""
    eps = x0_to("eps", x0, z, g)
    var = 1 - g_next if math.isinf(eta) else torch.minimum(eta**2 * _posterior_var(g, g_next), 1 - g_next)
    out = g_next.sqrt() * x0 + (1 - g_next - var).clamp(min=0).sqrt() * eps
    return out if noise is None else out + var.sqrt() * noise


def ddpm(denoise: X0Fn, x: Pyramid, grid: Grid, noise: StepNoise) -> Iterator[Pyramid]:
    """Ancestral DDPM: sample every level's posterior at every step (no noise into tau = 0)."""
    for i in range(grid.steps):
        x0 = denoise(x, i)
        ns = noise(x) if grid.noisy(i + 1) else [None] * len(x)
        x = [ddpm_step(z, m, g, gn, n) for z, m, (g, gn), n in zip(x, x0, _gamma_pairs(x, grid, i), ns, strict=True)]
        yield x


def ddim(denoise: X0Fn, x: Pyramid, grid: Grid, noise: StepNoise, eta: float = 0.0) -> Iterator[Pyramid]:
    """DDIM(eta): deterministic at eta = 0; eta = 1 has the ancestral step's mean and variance."""
    for i in range(grid.steps):
        x0 = denoise(x, i)
        ns = noise(x) if eta > 0 and grid.noisy(i + 1) else [None] * len(x)
        x = [
            ddim_step(z, m, g, gn, eta, n) for z, m, (g, gn), n in zip(x, x0, _gamma_pairs(x, grid, i), ns, strict=True)
        ]
        yield x


def _eps(x: Pyramid, x0: Pyramid, grid: Grid, i: int) -> Pyramid:
    """eps = (z - alpha x0) / sigma of every level at point i: the EDM slope dx~/dsigma_K."""
    return [x0_to("eps", m, z, g.to(z)) for z, m, g in zip(x, x0, grid.gamma[:, i], strict=True)]


def _edm_step(x: Pyramid, slope: Pyramid, grid: Grid, i: int) -> Pyramid:
    """x~' = x~ + (sigma_K' - sigma_K) slope with x~ = z/alpha, returned as z' = alpha' x~'."""
    a, a_next = grid.alpha[:, i], grid.alpha[:, i + 1]
    return _lin((a_next / a, x), (grid.sigma[:, i + 1] - a_next * grid.sigma[:, i] / a, slope))


def euler(denoise: X0Fn, x: Pyramid, grid: Grid, noise: StepNoise) -> Iterator[Pyramid]:
    """Euler on the probability-flow ODE in (sigma_K, x~) (Karras et al. 2022, Alg. 1 without the Heun step)."""
    for i in range(grid.steps):
        x = _edm_step(x, _eps(x, denoise(x, i), grid, i), grid, i)
        yield x


def heun(denoise: X0Fn, x: Pyramid, grid: Grid, noise: StepNoise) -> Iterator[Pyramid]:
    """EDM Heun (Karras et al. 2022, Alg. 1): average the slope at both ends; Euler into sigma = 0 (2N - 1 calls)."""
    for i in range(grid.steps):
        slope = _eps(x, denoise(x, i), grid, i)
        ahead = _edm_step(x, slope, grid, i)
        if grid.noisy(i + 1):
            slope_ahead = _eps(ahead, denoise(ahead, i + 1), grid, i + 1)
            ahead = _edm_step(x, _lin((0.5, slope), (0.5, slope_ahead)), grid, i)
        x = ahead
        yield x


def dpmpp_2m(denoise: X0Fn, x: Pyramid, grid: Grid, noise: StepNoise) -> Iterator[Pyramid]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): the exponential step with x0 extrapolated from the last two."""
    history: deque[Pyramid] = deque(maxlen=2)
    for i in range(grid.steps):
        history.appendleft(denoise(x, i))
        x = _exp_step(x, [_dpm2(list(history)[: _order(i, grid.steps, 2)], grid, i)], grid, i)
        yield x


def dpmpp_3m(denoise: X0Fn, x: Pyramid, grid: Grid, noise: StepNoise) -> Iterator[Pyramid]:
    """DPM-Solver++(3M): the exponential integrator over the quadratic in lambda through the last three x0."""
    history: deque[Pyramid] = deque(maxlen=3)
    for i in range(grid.steps):
        history.appendleft(denoise(x, i))
        x = _exp_step(x, _taylor(list(history)[: _order(i, grid.steps, 3)], grid, i), grid, i)
        yield x


def dpmpp_2m_sde(denoise: X0Fn, x: Pyramid, grid: Grid, noise: StepNoise) -> Iterator[Pyramid]:
    """DPM-Solver++(2M) SDE: z' = (sigma'/sigma) e^-h z + alpha' (1 - e^-2h) D + sigma' sqrt(1 - e^-2h) n with D the
    2M extrapolation; at order 1 this is the DDPM posterior step."""
    history: deque[Pyramid] = deque(maxlen=2)
    for i in range(grid.steps):
        history.appendleft(denoise(x, i))
        d = _dpm2(list(history)[: _order(i, grid.steps, 2)], grid, i)
        h, sigma_next = grid.h(i), grid.sigma[:, i + 1]
        terms = [(sigma_next / grid.sigma[:, i] * torch.exp(-h), x), (-grid.alpha[:, i + 1] * torch.expm1(-2 * h), d)]
        if grid.noisy(i + 1):
            terms.append((sigma_next * (-torch.expm1(-2 * h)).sqrt(), noise(x)))
        x = _lin(*terms)
        yield x


def unipc(denoise: X0Fn, x: Pyramid, grid: Grid, noise: StepNoise, order: int = 2) -> Iterator[Pyramid]:
    """UniPC-bh2 of the given order: a multistep predictor, then a corrector of the state just reached that reuses
    the estimate made there (no extra call; none after the last step)."""
    history: deque[Pyramid] = deque(maxlen=order)
    last: tuple[Pyramid, list[Pyramid]] | None = None
    for i in range(grid.steps):
        x0 = denoise(x, i)
        if last is not None:
            x = _unipc(*last, grid, i - 1, new=x0)
        history.appendleft(x0)
        last = (x, list(history)[: _order(i, grid.steps, order)])
        x = _unipc(*last, grid, i)
        yield x


Sampler = Callable[[X0Fn, Pyramid, Grid, StepNoise], Iterator[Pyramid]]

SAMPLERS: dict[str, Sampler] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "renoise": partial(ddim, eta=math.inf),
    "unipc": unipc,
    "unipc_3": partial(unipc, order=3),
}


def get_sampler(name: str, eta: float = 0.0) -> Sampler:
    """The registered sampler `name`; `eta` is DDIM's and is refused (when non-zero) by the others."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be finite and >= 0, got {eta}")
    if name == "ddim":
        return partial(ddim, eta=eta)
    if eta:
        raise ValueError(f"eta is DDIM's noise level; sampler {name!r} takes none")
    return SAMPLERS[name]


@dataclass
class SampleResult:
    """The final pyramid (level 0 clipped to [-1, 1]) and the number of network evaluations."""

    levels: Pyramid
    nfe: int


def run(
    model: Denoiser,
    noise: Pyramid,
    gammas: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning | None = None,
    uncond: Conditioning | None = None,
    *,
    sampler: str = "ddim",
    prediction_type: str = "v",
    thresholding: str = "clip",
    guidance: Guidance | float = 1.0,
    eta: float = 0.0,
    generator: Generators = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    x0_callback: X0Callback | None = None,
    level_projection: bool = False,
    temporal_downsample: str = "first",
) -> SampleResult:
    """Run the reverse process from `noise` (one tensor per level, highest first) over the descending integer grid
    `timesteps` of the per-level schedule `gammas` (L, T + 1), in the state's dtype.

    `guidance` is a scale or a `Guidance`; its interval is measured on the lowest level's schedule. Step noise is
    drawn from `generator` (or one generator per sample) level by level, high to low. `callback(i, tau, state)`
    runs after each step; `x0_callback(i, x0)` after each network call, with every level's (thresholded) x0
    estimate at grid point i.
    `level_projection` corrects every x0 estimate so that each level's pyramid (`temporal_downsample` for clips) is
    the level below (`process.project_levels`).
    """
    step_fn = get_sampler(sampler, eta)
    if thresholding not in THRESHOLDS:
        raise ValueError(f"thresholding must be one of {', '.join(THRESHOLDS)}; got {thresholding!r}")
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTIONS)}; got {prediction_type!r}")
    guidance = guidance if isinstance(guidance, Guidance) else Guidance(scale=guidance)
    grid = Grid.from_table(gammas, timesteps)
    network = guide(model, cond, uncond, guidance, gammas[-1])
    project = partial(project_levels, temporal_downsample=temporal_downsample) if level_projection else None
    denoise = X0Denoiser(network, grid, prediction_type, thresholding, observe=x0_callback, project=project)
    state = list(noise)
    steps = step_fn(denoise, state, grid, gaussian_noise(generator))
    for i, state in enumerate(tqdm(steps, total=grid.steps, desc="sampling", disable=not progress, leave=False)):
        if callback is not None:
            callback(i, int(grid.tau[i]), state)
    return SampleResult([state[0].clamp(-1, 1), *state[1:]], denoise.nfe)


def sample(
    model: Denoiser,
    noise: Pyramid,
    gammas: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning | None,
    uncond: Conditioning | None = None,
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    **options: Any,
) -> Pyramid:
    """`run` as ml-mdm's sampler is called: guidance as a plain scale, the pyramid alone returned, and ddpm
    ignoring eta. The other keywords are `run`'s."""
    return run(
        model,
        noise,
        gammas,
        timesteps,
        cond,
        uncond,
        sampler=sampler,
        eta=0.0 if sampler == "ddpm" else eta,
        guidance=guidance_scale,
        **options,
    ).levels
