import dataclasses
import math

import pytest
import torch
from PIL import Image

from mdm import MDMPipeline, NestedUNet
from tests.conftest import randomize_, tiny_config


def class_pipe(levels: int = 2) -> MDMPipeline:
    cfg = tiny_config(levels=levels, text_dim=0, num_classes=3)
    pipe = MDMPipeline(randomize_(NestedUNet(cfg.model)).eval(), cfg)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_save_and_load_give_bitwise_identical_outputs(tmp_path):
    pipe = class_pipe(levels=3)
    pipe.provenance = {"source": "unit-test"}
    pipe.save_pretrained(tmp_path / "model")
    pipe.save_pretrained(tmp_path / "model")  # overwriting an existing directory is safe
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = MDMPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config == pipe.config and loaded.provenance == {"source": "unit-test"}
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, loaded.unet.state_dict()[k])
    kw = dict(class_labels=[0, 2], num_inference_steps=4, output_type="pt")
    a = pipe(**kw, generator=torch.Generator().manual_seed(0))
    b = loaded(**kw, generator=torch.Generator().manual_seed(0))
    for x, y in zip(a.levels, b.levels, strict=True):
        assert torch.equal(x, y)


def test_outputs_in_every_format():
    pipe = class_pipe()
    pil = pipe(class_labels=[1], num_images_per_prompt=2, num_inference_steps=2)
    assert len(pil.images) == 2 and isinstance(pil.images[0], Image.Image)
    assert [im.size for im in (lv[0] for lv in pil.levels)] == [(16, 16), (8, 8)]
    arr = pipe(class_labels=[1], num_inference_steps=2, output_type="np")
    assert arr.images.shape == (1, 16, 16, 3) and arr.images.dtype.name == "uint8"
    pt = pipe(class_labels=[1], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert pt.images.min() >= -1 and pt.images.max() <= 1 and pt.images.std() > 0


def test_latents_and_callback():
    pipe = class_pipe()
    latents = [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 8, 8)]
    steps = []
    out = pipe(
        class_labels=[0],
        num_inference_steps=3,
        latents=latents,
        output_type="pt",
        callback=lambda i, t, state: steps.append((i, t, len(state))),
    )
    again = pipe(class_labels=[0], num_inference_steps=3, latents=latents, output_type="pt")
    assert torch.equal(out.images, again.images)
    assert steps == [(0, 751, 2), (1, 500, 2), (2, 250, 2)]
    with pytest.raises(ValueError, match="latents must be 2 tensors"):
        pipe(class_labels=[0], latents=latents[:1])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(class_labels=[3]), "class_labels must be in [0, 3)"),
        (dict(prompt="a cat"), "this model is class-conditional"),
        (dict(), "this model is class-conditional"),
        (dict(class_labels=[0], output_type="jpg"), "output_type"),
        (dict(class_labels=[0], prompt="x"), "give one of"),
    ],
)
def test_bad_calls(kwargs, needle):
    with pytest.raises(ValueError) as err:
        class_pipe()(num_inference_steps=2, **kwargs)
    assert needle in str(err.value)


def test_text_pipeline_requires_unconditional_text_for_guidance():
    cfg = tiny_config(levels=2)
    pipe = MDMPipeline(randomize_(NestedUNet(cfg.model)).eval(), cfg)
    pipe.set_progress_bar_config(disable=True)
    emb = torch.randn(2, 4, 24)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        pipe(prompt_embeds=emb, num_inference_steps=2)
    with pytest.raises(ValueError, match="no text encoder"):
        pipe(prompt="a red circle", num_inference_steps=2, guidance_scale=1.0)
    out = pipe(
        prompt_embeds=emb,
        negative_prompt_embeds=torch.zeros(1, 2, 24),
        num_inference_steps=2,
        output_type="pt",
    )
    assert out.images.shape == (2, 3, 16, 16)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        MDMPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing config\.yaml"):
        MDMPipeline.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize(
    ("sampler", "steps", "nfe"), [("ddim", 5, 5), ("dpmpp_2m", 5, 5), ("unipc", 4, 4), ("heun", 4, 7)]
)
def test_samplers_report_their_network_calls(sampler, steps, nfe):
    pipe = class_pipe()
    kw = dict(class_labels=[0, 1], num_inference_steps=steps, sampler=sampler, output_type="pt")
    guided = pipe(**kw, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    plain = pipe(**kw, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert guided.nfe == plain.nfe == nfe, "a guided call runs both branches in one batch: one call"
    assert not torch.equal(guided.images, plain.images)
    assert guided.images.shape == (2, 3, 16, 16) and guided.images.abs().max() <= 1


def test_spacings_and_guidance_interval():
    pipe = class_pipe()
    kw = dict(class_labels=[2], num_inference_steps=6, output_type="pt")
    grids = {s: pipe.timesteps(6, s).tolist() for s in ("mlmdm", "trailing", "logsnr", "karras")}
    assert grids["mlmdm"] == [858, 715, 572, 429, 286, 143, 0] and grids["trailing"][0] == 1000
    assert all(g == sorted(g, reverse=True) and g[-1] == 0 for g in grids.values())
    outs = {s: pipe(**kw, spacing=s, generator=torch.Generator().manual_seed(0)).images for s in grids}
    assert not torch.equal(outs["mlmdm"], outs["trailing"])
    unguided = pipe(**kw, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    never = pipe(**kw, guidance_scale=5.0, guidance_interval=(50.0, 60.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(never.images, unguided.images), "outside its interval guidance is off"
    always = pipe(**kw, guidance_scale=5.0, guidance_interval=(-50.0, 50.0), generator=torch.Generator().manual_seed(0))
    full = pipe(**kw, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(always.images, full.images)


def test_the_configs_guidance_interval_is_the_default_and_a_call_overrides_it():
    pipe = class_pipe()
    kw = dict(class_labels=[2], num_inference_steps=6, guidance_scale=5.0, output_type="pt")
    full = pipe(**kw, generator=torch.Generator().manual_seed(0))
    unguided = pipe(**{**kw, "guidance_scale": 1.0}, generator=torch.Generator().manual_seed(0))
    above_every_step = dataclasses.replace(pipe.config.diffusion, guidance_interval=[50.0, 60.0])
    pipe.config = dataclasses.replace(pipe.config, diffusion=above_every_step)
    assert pipe.settle(5.0).guidance.interval == (50.0, 60.0)
    assert torch.equal(pipe(**kw, generator=torch.Generator().manual_seed(0)).images, unguided.images)
    everywhere = (-math.inf, math.inf)
    assert pipe.settle(5.0, guidance_interval=everywhere).guidance.interval is None
    again = pipe(**kw, guidance_interval=everywhere, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.images, full.images)
    assert not torch.equal(full.images, unguided.images)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(sampler="dpm++"), "dpmpp_2m"),
        (dict(spacing="uniform"), "karras"),
        (dict(guidance_scale=-1.0), "guidance scales must be finite and >= 0"),
        (dict(guidance_scale=float("nan")), "guidance scales must be finite and >= 0"),
        (dict(sampler="dpmpp_2m", eta=0.5), "eta"),
        (dict(sampler="ddim", eta=-1.0), "eta must be finite and >= 0"),
    ],
)
def test_bad_sampling_settings_are_rejected(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        class_pipe()(class_labels=[0], num_inference_steps=2, **kwargs)


def test_the_model_directory_carries_a_default_sampler(tmp_path):
    pipe = class_pipe()
    pipe.config.diffusion.sampler, pipe.config.diffusion.spacing = "unipc", "trailing"
    pipe.save_pretrained(tmp_path / "m")
    loaded = MDMPipeline.from_pretrained(tmp_path / "m")
    loaded.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[1], num_inference_steps=3, output_type="pt")
    default = loaded(**kw, generator=torch.Generator().manual_seed(0))
    explicit = loaded(**kw, sampler="unipc", spacing="trailing", generator=torch.Generator().manual_seed(0))
    ddim = loaded(**kw, sampler="ddim", spacing="trailing", generator=torch.Generator().manual_seed(0))
    assert torch.equal(default.images, explicit.images) and not torch.equal(default.images, ddim.images)


def test_the_configs_guided_levels_and_eta_are_the_calls_defaults(tmp_path):
    pipe = class_pipe(levels=3)
    diffusion = dataclasses.replace(pipe.config.diffusion, level_projection=True, guided_levels="lowest", eta=1.0)
    pipe.config = dataclasses.replace(pipe.config, diffusion=diffusion).validate("lowest")
    pipe.save_pretrained(tmp_path / "m")
    pipe = MDMPipeline.from_pretrained(tmp_path / "m")
    pipe.set_progress_bar_config(disable=True)
    settled = pipe.settle(4.0)
    assert (settled.sampler, settled.eta, settled.level_projection) == ("ddim", 1.0, True)
    assert settled.guidance.scales(3) == [1.0, 1.0, 4.0], "guidance on the lowest level only"
    assert pipe.settle(4.0, sampler="dpmpp_2m").eta == 0.0, "eta is DDIM's: another sampler takes none"
    assert pipe.settle(4.0, level_projection=False).guidance.scales(3) == [4.0] * 3, "unprojected: every level guided"
    assert pipe.settle(4.0, guidance_level_scales=[2.0, 3.0, 4.0]).guidance.scales(3) == [2.0, 3.0, 4.0]
    assert pipe.settle(4.0, guided_levels="all").guidance.scales(3) == [4.0] * 3
    asked = pipe.settle(4.0, level_projection=False, guided_levels="lowest")
    assert asked.guidance.scales(3) == [1.0, 1.0, 4.0], "an explicit choice holds without projection"
    with pytest.raises(ValueError, match="guided_levels must be one of all, lowest, got 'top'"):
        pipe.settle(4.0, guided_levels="top")
    kw = dict(class_labels=[0, 2], num_inference_steps=4, guidance_scale=4.0, output_type="pt")
    default = pipe(**kw, generator=torch.Generator().manual_seed(0))
    explicit = pipe(**kw, guidance_level_scales=[1.0, 1.0, 4.0], eta=1.0, generator=torch.Generator().manual_seed(0))
    for a, b in zip(default.levels, explicit.levels, strict=True):
        assert torch.equal(a, b)
    for other in (dict(eta=0.0), dict(guidance_level_scales=[4.0] * 3)):
        changed = pipe(**kw, **other, generator=torch.Generator().manual_seed(0))
        assert not torch.equal(changed.images, default.images), f"{other} is not the default"


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_sde", "renoise"])
def test_one_generator_per_sample_makes_a_sample_the_same_in_any_batch(sampler):
    pipe = class_pipe()
    kw = dict(num_inference_steps=4, guidance_scale=2.0, sampler=sampler, output_type="pt")
    if sampler == "ddim":
        kw["eta"] = 1.0
    seeds = [11, 12, 13]
    batch = pipe(class_labels=[0, 1, 2], generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    alone = pipe(class_labels=[1], generator=[torch.Generator().manual_seed(12)], **kw)
    for whole, one in zip(batch.levels, alone.levels, strict=True):
        torch.testing.assert_close(whole[1:2], one, atol=1e-5, rtol=0)
    shared = pipe(class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(12), **kw)
    one_shared = pipe(class_labels=[1], generator=torch.Generator().manual_seed(12), **kw)
    assert not torch.allclose(shared.images[1:2], one_shared.images), "one shared generator: batch-dependent"
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3 samples: give one per sample"):
        pipe(class_labels=[0, 1, 2], generator=[torch.Generator(), torch.Generator()], **kw)


def test_x0_callback_sees_every_network_call():
    pipe = class_pipe()
    seen = []
    out = pipe(
        class_labels=[0],
        num_inference_steps=3,
        sampler="heun",
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        x0_callback=lambda i, x0: seen.append((i, [tuple(x.shape) for x in x0], max(x.abs().max().item() for x in x0))),
    )
    assert len(seen) == out.nfe == 5
    assert [i for i, _, _ in seen] == [0, 1, 1, 2, 2], "Heun: a corrector call at the next point, then its step"
    assert all(shapes == [(1, 3, 16, 16), (1, 3, 8, 8)] and peak <= 1 for _, shapes, peak in seen), "clipped x0"
