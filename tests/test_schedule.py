import pytest
import torch

from mdm.config import DiffusionConfig
from mdm.diffusion.schedule import (
    cosine_gamma,
    level_gammas,
    linear_gamma,
    logsnr_cosine_gamma,
    shift_gamma,
    sigmoid_gamma,
    timestep_grid,
)
from tests.conftest import load_fixture


@pytest.fixture(scope="module")
def ref():
    return load_fixture("schedule.pt")


def test_base_schedules_equal_reference_f64(ref):
    assert (cosine_gamma() - ref["deepfloyd_f64"]).abs().max() <= 1e-10
    assert (linear_gamma() - ref["ddpm_linear_f64"]).abs().max() <= 1e-10
    assert (logsnr_cosine_gamma() - ref["cosine_f64"]).abs().max() <= 1e-10


def test_float32_tables_equal_reference(ref):
    for ours, key in (
        (cosine_gamma(), "deepfloyd_f32"),
        (linear_gamma(), "ddpm_linear_f32"),
        (logsnr_cosine_gamma(), "cosine_f32"),
    ):
        assert torch.equal(ours.float(), ref[key])


@pytest.mark.parametrize(
    ("scales", "power", "key"), [([4, 1], 1.0, "shifted_4_1_p1"), ([16, 4, 1], 2.0, "shifted_16_4_1_p2")]
)
def test_shifted_schedules_equal_reference(ref, scales, power, key):
    exact = level_gammas(DiffusionConfig(shift_power=power, schedule_fp32=False), scales)
    assert exact.dtype == torch.float64
    assert (exact - ref[key + "_f64"]).abs().max() <= 1e-10
    f32 = level_gammas(DiffusionConfig(shift_power=power), scales, torch.float32)
    assert torch.equal(f32, ref[key + "_f32"])


def test_shift_rule_is_snr_division():
    g = cosine_gamma()[1:-1]
    shifted = shift_gamma(g, 4.0, 2.0)
    snr, snr_s = g / (1 - g), shifted / (1 - shifted)
    torch.testing.assert_close(snr / snr_s, torch.full_like(g, 16.0), rtol=1e-9, atol=0)
    assert shift_gamma(torch.ones(1, dtype=torch.float64), 4, 1).item() == 1.0
    assert torch.equal(shift_gamma(g, 1, 2), g)


def test_schedule_shapes_and_endpoints():
    for g in (cosine_gamma(50), linear_gamma(50), logsnr_cosine_gamma(50), sigmoid_gamma(50)):
        assert g.shape == (51,) and g[0] == 1.0
        assert torch.all(g[1:] < g[:-1]), "gamma must decrease strictly"
    assert cosine_gamma()[-1] == pytest.approx(2.43e-9, rel=0.02)


def test_timestep_grids_equal_reference(ref):
    for n, grid in ref["timesteps"].items():
        assert torch.equal(timestep_grid(n), grid), n
    assert {214, 500, 786} <= set(timestep_grid(13).tolist()), "exact halves round to even"
    assert timestep_grid(1).tolist() == [500, 0]


def test_timestep_grid_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_inference_steps"):
        timestep_grid(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        timestep_grid(1001)
