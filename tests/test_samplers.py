import pytest
import torch

from mdm.config import DiffusionConfig
from mdm.diffusion.process import MultiLevelDiffusion, q_sample, target
from mdm.diffusion.samplers import sample, step, threshold
from mdm.diffusion.schedule import timestep_grid
from mdm.models.conditioning import Conditioning


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
    proc = MultiLevelDiffusion(DiffusionConfig(snr_shift="shift"), [8, 2])
    gammas = proc.gammas()
    x0 = [
        torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5,
        torch.rand(2, 3, 2, 2, dtype=torch.float64) - 0.5,
    ]

    def oracle(zs, t, cond):
        out = []
        for lvl, z in enumerate(zs):
            g = gammas[lvl, t + 1]
            eps = (z - g.sqrt().view(-1, 1, 1, 1) * x0[lvl]) / (1 - g).sqrt().view(-1, 1, 1, 1)
            out.append(target("v", x0[lvl], eps, g))
        return out

    noise = [torch.randn_like(x) for x in x0]
    out = sample(
        oracle,
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
    torch.testing.assert_close(step(z, x0, g, g_next, "ddim", 1.0, zero), step(z, x0, g, g_next, "ddpm", 0.0, zero))
    unit = torch.ones_like(z)
    spread_ddim = step(z, x0, g, g_next, "ddim", 1.0, unit) - step(z, x0, g, g_next, "ddim", 1.0, zero)
    spread_ddpm = step(z, x0, g, g_next, "ddpm", 0.0, unit) - step(z, x0, g, g_next, "ddpm", 0.0, zero)
    torch.testing.assert_close(spread_ddim, spread_ddpm)


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
        sample(model, noise, gammas, timestep_grid(5), None, sampler="euler", progress=False)
