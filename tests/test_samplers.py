import math

import pytest
import torch

from mdm.config import DiffusionConfig
from mdm.diffusion.process import MultiLevelDiffusion, Pyramid, q_sample, target
from mdm.diffusion.samplers import (
    SAMPLERS,
    Grid,
    ddim,
    ddim_step,
    ddpm,
    ddpm_step,
    dpmpp_2m,
    dpmpp_2m_sde,
    euler,
    gaussian_noise,
    run,
    sample,
    threshold,
    unipc,
)
from mdm.diffusion.schedule import (
    SPACINGS,
    cosine_gamma,
    half_logsnr,
    sampling_timesteps,
    sigmoid_gamma,
    timestep_grid,
)
from mdm.models.conditioning import Conditioning

F64 = torch.float64


def oracle(gammas: torch.Tensor, x0: Pyramid):
    """A network that predicts the true v of known data at every level."""

    def model(zs, t, cond):
        out = []
        for lvl, z in enumerate(zs):
            g = gammas[lvl, t + 1]
            eps = (z - g.sqrt().view(-1, 1, 1, 1) * x0[lvl]) / (1 - g).sqrt().view(-1, 1, 1, 1)
            out.append(target("v", x0[lvl], eps, g))
        return out

    return model


def two_levels() -> tuple[torch.Tensor, Pyramid]:
    """Shifted float64 schedules of an 8/2 pyramid and data in (-0.5, 0.5) at both levels."""
    gammas = MultiLevelDiffusion(DiffusionConfig(snr_shift="shift"), [8, 2]).gammas()
    x0 = [torch.rand(2, 3, 8, 8, dtype=F64) - 0.5, torch.rand(2, 3, 2, 2, dtype=F64) - 0.5]
    return gammas, x0


def test_clip_and_dynamic_thresholding_values():
    x = torch.linspace(-3, 3, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    assert threshold(x, "clip").abs().max() == 1.0
    assert torch.equal(threshold(x, "none"), x)
    for kind, level, high in (("dynamic", 0.995, 100.0), ("dynamic_if", 0.95, 1.5)):
        out = threshold(x, kind)
        q = torch.quantile(x.abs().flatten(1), level, dim=1).clamp(1, high)
        torch.testing.assert_close(
            out,
            torch.maximum(torch.minimum(x, q.view(-1, 1, 1, 1)), -q.view(-1, 1, 1, 1)) / q.view(-1, 1, 1, 1),
        )
    small = torch.full((1, 3, 2, 2), 0.5)
    assert torch.equal(threshold(small, "dynamic"), small), "q is clamped to at least 1"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_last_step_returns_x0_and_perfect_denoiser_recovers_data(sampler):
    gammas, x0 = two_levels()
    noise = [torch.randn_like(x) for x in x0]
    out = sample(
        oracle(gammas, x0),
        noise,
        gammas,
        timestep_grid(20),
        None,
        sampler=sampler,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    for a, b in zip(out, x0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_ddim_eta_one_matches_ddpm_mean_and_variance():
    g, g_next = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    x0 = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    z = q_sample(x0, g, torch.randn_like(x0))
    zero = torch.zeros_like(z)
    torch.testing.assert_close(ddim_step(z, x0, g, g_next, 1.0, zero), ddpm_step(z, x0, g, g_next, zero))
    unit = torch.ones_like(z)
    spread_ddim = ddim_step(z, x0, g, g_next, 1.0, unit) - ddim_step(z, x0, g, g_next, 1.0, zero)
    spread_ddpm = ddpm_step(z, x0, g, g_next, unit) - ddpm_step(z, x0, g, g_next, zero)
    torch.testing.assert_close(spread_ddim, spread_ddpm)


def test_ddim_noise_is_capped_at_the_schedule_so_large_eta_re_noises_x0():
    g, g_next = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    z = q_sample(x0, g, torch.randn_like(x0))
    n = torch.randn_like(x0)
    fresh = g_next.sqrt() * x0 + (1 - g_next).sqrt() * n
    for eta in (3.0, math.inf):
        torch.testing.assert_close(ddim_step(z, x0, g, g_next, eta, n), fresh, atol=1e-12, rtol=0)
    # below the cap eta still mixes the state's own noise in: 1.1^2 beta~ = 0.35 < 1 - g' = 0.4 here
    between = ddim_step(z, x0, g, g_next, 1.1, n)
    assert (between - fresh).abs().max() > 1e-3
    eps = (z - g.sqrt() * x0) / (1 - g).sqrt()
    var = 1.21 * (1 - g / g_next) * (1 - g_next) / (1 - g)
    torch.testing.assert_close(between, g_next.sqrt() * x0 + (1 - g_next - var).sqrt() * eps + var.sqrt() * n)


def test_renoise_keeps_none_of_the_state_and_keeps_the_marginal_variance():
    gammas, x0 = two_levels()
    grid = Grid.from_table(gammas, sampling_timesteps("trailing", 6, gammas[-1]))
    noise = gaussian_noise(torch.Generator().manual_seed(1))

    def first_step(state: Pyramid) -> Pyramid:
        return next(SAMPLERS["renoise"](lambda x, i: x0, state, grid, noise))

    a = first_step([torch.randn_like(x) for x in x0])
    noise = gaussian_noise(torch.Generator().manual_seed(1))
    b = first_step([torch.randn_like(x) for x in x0])
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)
    big = [torch.zeros(4000, 1, 8, 8, dtype=F64), torch.zeros(4000, 1, 2, 2, dtype=F64)]
    noise = gaussian_noise(torch.Generator().manual_seed(2))
    out = next(SAMPLERS["renoise"](lambda x, i: [torch.zeros_like(z) for z in x], big, grid, noise))
    for level, gamma in zip(out, grid.gamma[:, 1], strict=True):
        assert abs(level.var().item() - (1 - gamma.item())) < 0.02 * (1 - gamma.item())


def test_sampling_is_deterministic_under_a_generator_and_guidance_mixes_branches():
    gammas = MultiLevelDiffusion(DiffusionConfig(), [4]).gammas(torch.float32)
    calls = []

    def model(zs, t, cond):
        calls.append(cond.labels.tolist())
        return [torch.where(cond.labels.view(-1, 1, 1, 1) == 9, 0.0, 1.0) * torch.ones_like(zs[0])]

    noise = [torch.randn(2, 3, 4, 4)]
    kw = dict(prediction_type="v", sampler="ddpm", progress=False)

    def run() -> list[torch.Tensor]:
        cond, uncond = Conditioning(labels=torch.tensor([1, 2])), Conditioning(labels=torch.tensor([9, 9]))
        generator = torch.Generator().manual_seed(4)
        return sample(
            model, noise, gammas, timestep_grid(5), cond, uncond, guidance_scale=3.0, generator=generator, **kw
        )

    a, b = run(), run()
    assert torch.equal(a[0], b[0])
    assert calls[0] == [9, 9, 1, 2], "guidance batch is [uncond; cond]"
    with pytest.raises(ValueError, match="unconditional condition"):
        sample(
            model,
            noise,
            gammas,
            timestep_grid(5),
            Conditioning(labels=torch.tensor([1, 2])),
            None,
            guidance_scale=3.0,
            **kw,
        )
    with pytest.raises(ValueError, match="sampler must be"):
        sample(model, noise, gammas, timestep_grid(5), None, sampler="nope", progress=False)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_recovers_data_with_a_perfect_denoiser_and_counts_calls(sampler):
    gammas, x0 = two_levels()
    noise = [torch.randn_like(x) for x in x0]
    grid = sampling_timesteps("trailing", 12, gammas[-1])
    out = run(oracle(gammas, x0), noise, gammas, grid, generator=torch.Generator().manual_seed(0), sampler=sampler)
    for a, b in zip(out.levels, x0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    assert out.nfe == (2 * 12 - 1 if sampler == "heun" else 12)


def smooth_denoiser(grid: Grid):
    """A nonlinear stand-in for a trained model: x0 depends on the state and on the grid point."""

    def denoise(x: Pyramid, i: int) -> Pyramid:
        return [torch.tanh(z * (0.5 + 0.1 * lvl) + 0.01 * int(grid.tau[i])) for lvl, z in enumerate(x)]

    return denoise


def three_level_grid(num_steps: int = 8) -> Grid:
    """Float64 shifted schedules of a 16/8/4 pyramid on the trailing grid."""
    gammas = MultiLevelDiffusion(DiffusionConfig(snr_shift="shift", schedule_fp32=False), [16, 8, 4]).gammas()
    return Grid.from_table(gammas, sampling_timesteps("trailing", num_steps, gammas[-1]))


def start(seed: int = 0) -> Pyramid:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, s, s, generator=generator, dtype=F64) for s in (16, 8, 4)]


def close(a: Pyramid, b: Pyramid) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_order_one_steps_equal_ddim_and_ddpm_on_every_level():
    grid = three_level_grid()
    denoise = smooth_denoiser(grid)
    first_ddim = next(ddim(denoise, start(), grid, gaussian_noise()))
    for solver in (dpmpp_2m, unipc):
        assert close(next(solver(denoise, start(), grid, gaussian_noise())), first_ddim) <= 1e-10, solver.__name__
    whole = [list(f(denoise, start(), grid, gaussian_noise()))[-2] for f in (ddim, euler)]
    assert close(*whole) <= 1e-10, "Euler in (sigma/alpha, z/alpha) is DDIM with eta = 0 at every step"
    sde = next(dpmpp_2m_sde(denoise, start(), grid, gaussian_noise(torch.Generator().manual_seed(3))))
    ancestral = next(ddpm(denoise, start(), grid, gaussian_noise(torch.Generator().manual_seed(3))))
    assert close(sde, ancestral) <= 1e-10


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_the_lambda_step_is_the_same_at_every_level(spacing, power):
    cfg = DiffusionConfig(snr_shift="shift", shift_power=power, schedule_fp32=False)
    gammas = MultiLevelDiffusion(cfg, [64, 32, 16]).gammas()
    grid = Grid.from_table(gammas, sampling_timesteps(spacing, 20, gammas[-1]))
    steps = torch.stack([grid.h(i) for i in range(grid.steps - 1)], 1)
    assert (steps - steps[-1]).abs().max() <= 1e-6
    assert torch.isinf(grid.h(grid.steps - 1)).all(), "the last step reaches sigma = 0"


@pytest.mark.parametrize("kind", ["clip", "dynamic"])
def test_thresholding_applies_to_x0_before_the_solver_history(kind):
    gammas, _ = two_levels()
    grid = sampling_timesteps("trailing", 6, gammas[-1])
    noise = [torch.randn(2, 3, 8, 8, dtype=F64), torch.randn(2, 3, 2, 2, dtype=F64)]

    def wild(zs, t, cond):
        return [3 * z + 0.002 * t.view(-1, 1, 1, 1) for z in zs]

    def tamed(zs, t, cond):
        return [threshold(p, kind) for p in wild(zs, t, cond)]

    kw = dict(prediction_type="x0", sampler="dpmpp_3m", progress=False)
    seen = []
    raw = run(wild, noise, gammas, grid, thresholding=kind, callback=lambda i, tau, s: seen.append(s), **kw)
    pre = run(tamed, noise, gammas, grid, thresholding="none", **kw)
    loose = run(wild, noise, gammas, grid, thresholding="none", **kw)
    assert close(raw.levels, pre.levels) <= 1e-12
    assert close(seen[-1], pre.levels) <= 1e-12, "every level's final x0 was thresholded"
    assert close(raw.levels[1:], loose.levels[1:]) > 0.1


def test_unknown_names_are_rejected_with_the_valid_ones():
    gammas, x0 = two_levels()
    noise = [torch.randn_like(x) for x in x0]
    with pytest.raises(ValueError, match="dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, renoise, unipc, unipc_3"):
        run(oracle(gammas, x0), noise, gammas, timestep_grid(4), sampler="dpm++")
    with pytest.raises(ValueError, match="mlmdm, trailing, logsnr, karras"):
        sampling_timesteps("linspace", 4, gammas[-1])
    with pytest.raises(ValueError, match="clip, dynamic, dynamic_if, none"):
        run(oracle(gammas, x0), noise, gammas, timestep_grid(4), thresholding="percentile")
    with pytest.raises(ValueError, match="eta"):
        run(oracle(gammas, x0), noise, gammas, timestep_grid(4), sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampling_timesteps("karras", 0, gammas[-1])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 7, 50, 1000])
def test_spacings_are_strictly_descending_integer_grids_ending_at_zero(spacing, num_steps):
    grid = sampling_timesteps(spacing, num_steps, cosine_gamma())
    assert grid.dtype == torch.long and grid[-1] == 0 and grid[0] <= 1000
    assert bool((grid[1:] < grid[:-1]).all())
    assert len(grid) - 1 <= num_steps
    if spacing == "mlmdm":
        assert torch.equal(grid, timestep_grid(num_steps))
    if spacing == "trailing":
        assert grid[0] == 1000 and len(grid) == num_steps + 1


def test_logsnr_and_karras_spacings_follow_their_targets():
    gamma = sigmoid_gamma()
    lam = half_logsnr(gamma)
    uniform = sampling_timesteps("logsnr", 10, gamma)
    assert torch.equal(uniform[:-1], torch.linspace(1000, 1, 10, dtype=F64).round().long()), "lambda is linear in t"
    karras = sampling_timesteps("karras", 10, gamma)
    hi, lo = torch.exp(-lam[1000]) ** (1 / 7), torch.exp(-lam[1]) ** (1 / 7)
    sigmas = (hi + torch.arange(10, dtype=F64) / 9 * (lo - hi)) ** 7
    index_width = (lam[1] - lam[2]).item()
    assert ((-sigmas.log() - lam[karras[:-1]]).abs() <= index_width / 2 + 1e-9).all()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_level_projection_makes_the_levels_one_image_and_keeps_the_top_levels_detail(sampler):
    gammas, _ = two_levels()
    gen = torch.Generator().manual_seed(3)
    top = (torch.rand(2, 3, 8, 8, generator=gen, dtype=F64) - 0.5) / 2
    low = torch.rand(2, 3, 2, 2, generator=gen, dtype=F64) - 0.5  # the projected top level stays inside [-1, 1]

    def disagreeing(zs, t, cond):
        """Predicts x0 = `top` and `low`, two levels that are not one image."""
        return [top.expand_as(zs[0]), low.expand_as(zs[1])]

    noise = [torch.randn(2, 3, 8, 8, dtype=F64), torch.randn(2, 3, 2, 2, dtype=F64)]
    kw = dict(prediction_type="x0", sampler=sampler, thresholding="none", progress=False)
    seen = []
    plain = run(disagreeing, noise, gammas, timestep_grid(6), **kw)
    projected = run(
        disagreeing,
        noise,
        gammas,
        timestep_grid(6),
        level_projection=True,
        x0_callback=lambda i, x0: seen.append(x0),
        **kw,
    )
    assert close(plain.levels, [top, low]) <= 1e-12
    pooled = torch.nn.functional.avg_pool2d(projected.levels[0], 4)
    assert (pooled - low).abs().max() <= 1e-12, "the top level's pyramid is the level below"
    assert torch.equal(projected.levels[1], plain.levels[1]), "the lowest level is kept"
    detail = projected.levels[0] - torch.nn.functional.interpolate(pooled, scale_factor=4)
    expected = top - torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(top, 4), scale_factor=4)
    assert (detail - expected).abs().max() <= 1e-12, "what the top level adds to the one below is its own"
    assert all((torch.nn.functional.avg_pool2d(x0[0], 4) - x0[1]).abs().max() <= 1e-12 for x0 in seen)
