import math

import pytest
import torch

from mdm.config import DiffusionConfig
from mdm.diffusion.guidance import Guidance, guidance_on, guide
from mdm.diffusion.process import MultiLevelDiffusion
from mdm.diffusion.samplers import run
from mdm.diffusion.schedule import sampling_timesteps
from mdm.models.conditioning import Conditioning

COND = Conditioning(labels=torch.tensor([1, 2]))
UNCOND = Conditioning(labels=torch.tensor([9, 9]))


class Recorder:
    """A network whose every level outputs its condition's label (9 = unconditional, or none -> 0); records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int], list[int]]] = []

    def __call__(self, zs, t, cond):
        labels = cond.labels if cond is not None else torch.full((zs[0].shape[0],), 9)
        self.calls.append((zs[0].shape[0], t.tolist(), labels.tolist()))
        value = torch.where(labels == 9, 0, labels).to(zs[0].dtype).view(-1, 1, 1, 1)
        return [value * torch.ones_like(z) for z in zs]


def pyramid(batch: int = 2) -> list[torch.Tensor]:
    return [torch.zeros(batch, 3, 8, 8), torch.zeros(batch, 3, 4, 4)]


def test_cfg_mixes_the_raw_outputs_per_level_in_one_batch():
    network = Recorder()
    out = guide(network, COND, UNCOND, Guidance(level_scales=(2.0, 5.0)))(pyramid(), 321)
    assert network.calls == [(4, [320] * 4, [9, 9, 1, 2])], "one call on [uncond; cond], fed tau - 1"
    for w, level in zip((2.0, 5.0), out, strict=True):
        assert torch.equal(level[:, 0, 0, 0], w * torch.tensor([1.0, 2.0]))
    plain = Recorder()
    guide(plain, COND, UNCOND, Guidance(1.0))(pyramid(), 321)
    assert plain.calls == [(2, [320, 320], [1, 2])], "scale 1 runs the conditional branch alone"


def test_one_rule_decides_whether_guidance_runs():
    assert guidance_on(Guidance(3.0), has_uncond=True)
    assert not guidance_on(Guidance(3.0), has_uncond=False)
    assert not guidance_on(Guidance(1.0), has_uncond=True)
    assert guidance_on(Guidance(1.0, level_scales=(1.0, 2.0)), has_uncond=True)
    assert not guidance_on(Guidance(4.0, level_scales=(1.0, 1.0)), has_uncond=True), "level scales replace scale"


def test_guidance_interval_skips_the_unconditional_half_outside_it_without_changing_nfe():
    gammas = MultiLevelDiffusion(DiffusionConfig(snr_shift="shift"), [8, 4]).gammas(torch.float32)
    grid = sampling_timesteps("trailing", 10, gammas[-1])
    base = gammas[-1].double()
    logsnr = [math.log(base[t]) - math.log1p(-base[t]) for t in grid[:-1].tolist()]
    lo, hi = -4.0, 1.0
    inside = [lo <= v <= hi for v in logsnr]
    assert 0 < sum(inside) < len(inside)
    kw = dict(sampler="dpmpp_2m", progress=False)
    network = Recorder()
    narrow = run(network, pyramid(), gammas, grid, COND, UNCOND, guidance=Guidance(3.0, interval=(lo, hi)), **kw)
    assert [calls[0] for calls in network.calls] == [4 if i else 2 for i in inside]
    wide = Recorder()
    full = run(wide, pyramid(), gammas, grid, COND, UNCOND, guidance=3.0, **kw)
    assert [calls[0] for calls in wide.calls] == [4] * 10
    assert narrow.nfe == full.nfe == 10, "a guided batch is one evaluation"
    ends = Guidance(3.0, interval=(-20.0, 5.0))
    assert [ends.applies_at(g) for g in (0.0, 0.5, 1.0)] == [False, True, False], "gamma 0 / 1: logSNR -inf / inf"
    assert Guidance(3.0, interval=(-math.inf, 5.0)).applies_at(0.0)


def test_guidance_needs_an_unconditional_branch_and_consistent_settings():
    with pytest.raises(ValueError, match="unconditional condition"):
        guide(Recorder(), COND, None, Guidance(3.0))
    with pytest.raises(ValueError, match="2 values for 3 levels"):
        guide(Recorder(), COND, UNCOND, Guidance(level_scales=(2.0, 3.0)))([*pyramid(), torch.zeros(2, 3, 2, 2)], 5)
    with pytest.raises(ValueError, match="lo <= hi"):
        Guidance(3.0, interval=(2.0, -2.0))
    with pytest.raises(ValueError, match="base schedule"):
        guide(Recorder(), COND, UNCOND, Guidance(3.0, interval=(-2.0, 2.0)))
    unconditional = Recorder()
    guide(unconditional, None, None, Guidance(3.0))(pyramid(), 7)
    assert unconditional.calls[0][0] == 2, "a model without a condition is never guided"
