import pytest
import torch
import torch.nn.functional as F

from mdm.config import DiffusionConfig
from mdm.diffusion.process import (
    MultiLevelDiffusion,
    build_pyramid,
    convert,
    mixed_fractions,
    predict_x0,
    project_levels,
    q_sample,
    target,
)
from mdm.models.conditioning import Conditioning


def test_pyramid_is_repeated_box_filter():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    levels = build_pyramid(x, [32, 8, 2])
    assert [lv.shape[-1] for lv in levels] == [32, 8, 2]
    torch.testing.assert_close(levels[1][0, 0, 0, 0], x[0, 0, :4, :4].mean())
    torch.testing.assert_close(levels[2], F.avg_pool2d(x, 16))
    with pytest.raises(ValueError, match="images must be 32x32"):
        build_pyramid(x[..., :16, :16], [32, 8])


@pytest.mark.parametrize(
    ("shapes", "how"),
    [
        ([32, 8, 2], "first"),
        ([(8, 16), (4, 16), (4, 8), (1, 4)], "first"),
        ([(8, 16), (2, 8)], "middle"),
        ([(4, 8), (2, 4)], "mean"),
    ],
)
def test_projected_levels_are_the_pyramid_of_the_level_above_and_keep_its_detail(shapes, how):
    gen = torch.Generator().manual_seed(0)
    frames = [1 if isinstance(s, int) else s[0] for s in shapes]
    sides = [s if isinstance(s, int) else s[1] for s in shapes]
    clips = any(f > 1 for f in frames)
    x0 = [
        torch.randn(2, 3, *((f,) if clips else ()), s, s, generator=gen, dtype=torch.float64)
        for f, s in zip(frames, sides, strict=True)
    ]
    out = project_levels(x0, how)
    assert torch.equal(out[-1], x0[-1]), "the lowest level is kept"
    for i in range(len(shapes) - 1):
        below = build_pyramid(out[i], shapes[i : i + 2], how)[1]
        torch.testing.assert_close(below, out[i + 1], atol=1e-12, rtol=0)
        assert (out[i] - x0[i]).abs().max() > 0.1, f"level {i} was corrected"
    # The correction is constant over each block a lower pixel stands for: the level's own detail is untouched.
    ratio = sides[0] // sides[1]
    change = out[0] - x0[0]
    blocks = change[..., ::ratio, ::ratio].repeat_interleave(ratio, -2).repeat_interleave(ratio, -1)
    torch.testing.assert_close(change, blocks)
    consistent = build_pyramid(x0[0], shapes, how)
    for a, b in zip(project_levels(consistent, how), consistent, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("src", ["v", "eps", "x0"])
@pytest.mark.parametrize("dst", ["v", "eps", "x0"])
def test_prediction_conversions_are_exact(src, dst):
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64),
    )
    gamma = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=torch.float64)
    z = q_sample(x0, gamma, eps)
    truth = {k: target(k, x0, eps, gamma) for k in ("v", "eps", "x0")}
    torch.testing.assert_close(convert(truth[src], z, gamma, src, dst), truth[dst])
    torch.testing.assert_close(predict_x0(truth[src], z, gamma, src), x0)


def test_eps_loss_is_gamma_weighted_v_loss():
    g = torch.Generator().manual_seed(1)
    x0, eps, v_hat = (torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    gamma = torch.tensor([0.8, 0.3, 0.05], dtype=torch.float64)
    z = q_sample(x0, gamma, eps)
    eps_err = (convert(v_hat, z, gamma, "v", "eps") - eps).pow(2).flatten(1).sum(1)
    v_err = (v_hat - target("v", x0, eps, gamma)).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(eps_err, gamma * v_err)


def test_mixed_fractions_are_cumulative():
    assert mixed_fractions([2, 1]) == pytest.approx([2 / 3, 1.0])
    assert mixed_fractions([1, 1, 2]) == pytest.approx([0.25, 0.5, 1.0])


def test_loss_draws_are_reproducible_and_independent_per_level():
    proc = MultiLevelDiffusion(DiffusionConfig(), [16, 4])
    calls = []

    def model(zs, t, cond):
        calls.append([z.clone() for z in zs])
        return [torch.zeros_like(z) for z in zs]

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = proc.loss(model, x, None, generator=torch.Generator().manual_seed(3))
    b = proc.loss(model, x, None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t)
    assert a.t.min() >= 0 and a.t.max() < 1000
    # the low level is not the pooled high-level noise
    g = a.gammas
    pooled_noise = F.avg_pool2d(
        (calls[0][0] - g[0].sqrt().view(-1, 1, 1, 1) * x) / (1 - g[0]).sqrt().view(-1, 1, 1, 1), 4
    )
    low_noise = (calls[0][1] - g[1].sqrt().view(-1, 1, 1, 1) * F.avg_pool2d(x, 4)) / (1 - g[1]).sqrt().view(-1, 1, 1, 1)
    assert (pooled_noise - low_noise).abs().max() > 0.1
    assert g[0].lt(g[1]).all(), "the higher level is noisier at the same t"


def test_level_weights_and_top_level_only_loss():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([10, 500])
    noise = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]

    def model(zs, t, cond):
        return [torch.full_like(z, 0.3) for z in zs]

    base = MultiLevelDiffusion(DiffusionConfig(), [8, 4]).loss(model, x, None, t=t, noise=noise)
    torch.testing.assert_close(base.loss, base.level_mse.sum(0))
    w = MultiLevelDiffusion(DiffusionConfig(level_weights=[3.0, 0.5]), [8, 4]).loss(model, x, None, t=t, noise=noise)
    torch.testing.assert_close(w.loss, 3 * base.level_mse[0] + 0.5 * base.level_mse[1])
    top = MultiLevelDiffusion(DiffusionConfig(loss_on_all_levels=False), [8, 4]).loss(model, x, None, t=t, noise=noise)
    torch.testing.assert_close(top.loss, base.level_mse[0])


def test_mixed_ratio_trains_each_level_on_its_share():
    seen = []

    def model(zs, t, cond):
        seen.append([z.shape[0] for z in zs])
        return [torch.zeros_like(z) for z in zs]

    proc = MultiLevelDiffusion(DiffusionConfig(mixed_ratio=[1.0, 2.0]), [8, 4])
    x = torch.rand(6, 3, 8, 8)
    out = proc.loss(model, x, Conditioning(), generator=torch.Generator().manual_seed(0))
    assert seen == [[2, 6]]
    full = out.level_mse
    torch.testing.assert_close(out.loss[:2], full[0, :2] * 3 + full[1, :2])
    torch.testing.assert_close(out.loss[2:], full[1, 2:])


def test_a_single_level_model_can_take_the_top_level_schedule_of_a_nested_one():
    nested = MultiLevelDiffusion(DiffusionConfig(shift_power=1.0), [32, 16]).gammas()
    alone = MultiLevelDiffusion(DiffusionConfig(shift_power=1.0), [32]).gammas()
    shifted = MultiLevelDiffusion(DiffusionConfig(shift_power=1.0, shift_base_size=16), [32]).gammas()
    assert torch.equal(shifted[0], nested[0]) and torch.equal(alone[0], nested[1])
    g, base = shifted[0][1:-1], alone[0][1:-1]
    torch.testing.assert_close(g / (1 - g), base / (1 - base) / 2, msg="SNR / (32 / 16)")
