"""Video models: temporal layers, frame pyramids, the video SNR shift, sampling clips, growing around an image model."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from mdm.config import ConfigError, DiffusionConfig, MDMConfig, ModelConfig, PhaseConfig, UNetConfig
from mdm.diffusion.process import MultiLevelDiffusion, build_pyramid, subsample_frames
from mdm.diffusion.samplers import SAMPLERS, run
from mdm.diffusion.schedule import timestep_grid
from mdm.models import temporal
from mdm.models.conditioning import Conditioning, null_labels
from mdm.models.temporal import TemporalAttention, fold, unfold
from mdm.models.unet import LevelBlock, NestedUNet
from mdm.pipeline import MDMPipeline
from mdm.train.phases import load_inner
from tests.conftest import inner_level, randomize_, tiny_config


def video_config(frames: int = 4, positions: str = "rotary", text_dim: int = 24, **model_kw: object) -> MDMConfig:
    """4 x 16² (space) around 4 x 8² (time: 4 -> 2 -> 1 frames) around the 1 x 8² image level of the UNet tests."""
    time = UNetConfig(
        channels=[32, 16, 16],
        num_res_blocks=[1],
        attention_levels=[0],
        attention_ffn=True,
        num_groups=8,
        num_heads=2,
        temb_dim=64,
        resample="time",
        inner=inner_level(),
    )
    space = UNetConfig(
        channels=[16, 16], num_res_blocks=[1], num_groups=8, num_heads=2, temb_dim=64, normalize_input=True, inner=time
    )
    model = ModelConfig(
        image_size=16, num_frames=frames, text_dim=text_dim, frame_positions=positions, unet=space, **model_kw
    )
    return MDMConfig(model=model).validate("video")


def clips(cfg: MDMConfig, batch: int = 2, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(batch, 3, f, s, s, generator=g) for f, s in cfg.model.level_shapes()]
    mask = torch.ones(batch, 5)
    mask[0, 3:] = 0
    text = torch.randn(batch, 5, cfg.model.text_dim, generator=g) * mask[..., None]
    return zs, torch.tensor([999, 3][:batch]), Conditioning(text=text, text_mask=mask)


def zero_outputs(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The zero-initialised output layers of the temporal attention blocks in `module`."""
    return [p for n, p in module.named_parameters() if "temporal_attn" in n and ("proj_out" in n or "main.3" in n)]


# ----------------------------------------------------------------------------------------------------------
# Layout


def test_level_shapes_follow_each_levels_resample_axis():
    cfg = video_config()
    assert cfg.model.level_shapes() == [(4, 16), (4, 8), (1, 8)]
    assert cfg.model.level_sizes() == [16, 8, 8]
    inner = cfg.model.inner_model(1)
    assert (inner.num_frames, inner.image_size, inner.is_video()) == (1, 8, False)
    assert cfg.model.inner_model(2).level_shapes() == [(4, 8), (1, 8)]
    net = NestedUNet(cfg.model)
    assert [lv.frames for lv in net.levels()] == [4, 4, 1]
    zs, t, cond = clips(cfg)
    out = net(zs, t, cond)
    assert [tuple(o.shape) for o in out] == [(2, 3, 4, 16, 16), (2, 3, 4, 8, 8), (2, 3, 1, 8, 8)]
    with pytest.raises(ValueError, match=re.escape("level 2 must be (B, 3, 1, H, W)")):
        net([*zs[:2], zs[2][:, :, 0]], t, cond)


def test_normalize_input_divides_a_clip_by_its_own_std():
    cfg = video_config()
    model = NestedUNet(cfg.model)
    seen = []
    model.conv_in.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    zs, t, cond = clips(cfg)
    zs[0][:, :, 0] *= 3  # one loud frame: a per-frame std would flatten it
    model(zs, t, cond)
    frames = seen[0].unflatten(0, (2, 4))
    torch.testing.assert_close(frames.std(dim=(1, 2, 3, 4)), torch.ones(2))
    assert bool((frames[:, 0].std(dim=(1, 2, 3)) > 1.5).all())


def test_fold_is_frame_major_and_unfold_inverts_it():
    x = torch.arange(2 * 3 * 4).float().reshape(2, 1, 3, 2, 2)
    folded = fold(x)
    assert folded.shape == (6, 1, 2, 2)
    assert torch.equal(folded[4], x[1, :, 1])
    assert torch.equal(unfold(folded, 3), x)


# ----------------------------------------------------------------------------------------------------------
# Temporal layers


@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
def test_temporal_attention_is_identity_at_init_and_every_parameter_learns(positions):
    block = TemporalAttention(16, heads=2, frames=4, positions=positions, ffn=True, fp32_softmax=True)
    x = torch.randn(2 * 4, 16, 3, 3)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        for p in zero_outputs(torch.nn.ModuleDict({"temporal_attn": block})):
            p.normal_(0, 0.3)
    block(x).square().mean().backward()
    dead = [n for n, p in block.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, dead


@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
def test_temporal_attention_sees_frame_order(positions):
    """Without positions attention over frames commutes with permuting them; with them it must not."""
    block = randomize_(TemporalAttention(16, heads=2, frames=4, positions=positions, ffn=False, fp32_softmax=True))
    x = torch.randn(2, 16, 4, 3, 3)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        permuted_after = unfold(block(fold(x)), 4)[:, :, perm]
        permuted_before = unfold(block(fold(x[:, :, perm])), 4)
        assert not torch.allclose(permuted_after, permuted_before, atol=1e-3)
        block.positions = "none"  # the same weights with the positions left out are permutation-equivariant
        torch.testing.assert_close(
            unfold(block(fold(x)), 4)[:, :, perm], unfold(block(fold(x[:, :, perm])), 4), rtol=1e-5, atol=1e-6
        )


def test_temporal_attention_in_chunks_of_sequences_equals_one_call(monkeypatch):
    block = randomize_(TemporalAttention(16, heads=2, frames=4, positions="rotary", ffn=False, fp32_softmax=True))
    x = torch.randn(2 * 4, 16, 3, 3)
    with torch.no_grad():
        whole = block(x)
        monkeypatch.setattr(temporal, "SEQUENCES_PER_CALL", 4)  # 18 pixel sequences -> 5 calls
        torch.testing.assert_close(block(x), whole, rtol=0, atol=0)


def test_video_model_at_init_equals_the_same_model_without_temporal_attention():
    cfg = video_config()
    plain = dataclasses.replace(
        cfg.model,
        unet=dataclasses.replace(
            cfg.model.unet,
            temporal_attention=False,
            inner=dataclasses.replace(cfg.model.unet.inner, temporal_attention=False),
        ),
    )
    a = randomize_(NestedUNet(plain))
    b = NestedUNet(cfg.model)
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert not unexpected and missing and all("temporal_attn" in k for k in missing)
    zs, t, cond = clips(cfg)
    with torch.no_grad():
        for x, y in zip(a(zs, t, cond), b(zs, t, cond), strict=True):
            assert torch.equal(x, y)


def test_gradients_reach_every_parameter_of_a_video_model():
    cfg = video_config()
    model = randomize_(NestedUNet(cfg.model))
    proc = MultiLevelDiffusion(cfg.diffusion, cfg.model.level_shapes())
    zs, _, cond = clips(cfg)
    out = proc.loss(model, zs[0].clamp(-1, 1), cond, generator=torch.Generator().manual_seed(1))
    assert out.level_mse.shape == (3, 2) and torch.isfinite(out.loss).all()
    out.loss.mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, dead


def test_gradient_checkpointing_gives_the_same_video_gradients():
    cfg = video_config()
    grads = []
    for checkpointing in (False, True):
        model = randomize_(NestedUNet(dataclasses.replace(cfg.model, gradient_checkpointing=checkpointing))).train()
        zs, t, cond = clips(cfg)
        sum(o.square().mean() for o in model(zs, t, cond)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_video_gradients_are_finite_and_track_float32():
    # Temporal convolutions stay float32 under CPU autocast: oneDNN's bf16 Conv3d backward gave NaN weight gradients.
    cfg = video_config()
    model = randomize_(NestedUNet(cfg.model))
    grads = []
    for bf16 in (False, True):
        model.zero_grad()
        zs, t, cond = clips(cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(zs, t, cond)
        sum(o.float().square().mean() for o in out).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    bad = [name for name, g in grads[1].items() if not torch.isfinite(g).all()]
    assert not bad, bad
    flat = [torch.cat([g.flatten() for g in gs.values()]) for gs in grads]
    assert (flat[1] - flat[0]).norm() <= 0.05 * flat[0].norm()
    conv = torch.nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(2, 8, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = temporal.temporal_conv(conv, x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, conv(x))


def test_cross_attention_with_folded_frames_equals_each_frame_alone():
    kw = dict(
        widths=[(32, 32)],
        temb_dim=64,
        groups=8,
        dropout=0.0,
        attn_layers=1,
        heads=2,
        context_dim=24,
        ffn=True,
        resample=None,
        fp32_islands=True,
    )
    video = randomize_(LevelBlock(**kw, frames=4))
    image = LevelBlock(**kw)
    image.load_state_dict(video.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 4, 4, 4, generator=g)
    temb = torch.randn(2, 64, generator=g)
    ctx = torch.randn(2, 5, 24, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = unfold(video(fold(x), temb, ctx, mask)[0], 4)
        for f in range(4):
            alone = image(x[:, :, f], temb, ctx, mask)[0]
            torch.testing.assert_close(out[:, :, f], alone, rtol=1e-5, atol=1e-6)
        # each sample's frames see that sample's text: swapping the texts swaps the outputs
        swapped = unfold(video(fold(x), temb, ctx.flip(0), mask.flip(0))[0], 4)
        assert not torch.allclose(swapped, out, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Growing around an image model


def test_video_model_grown_around_an_image_model_reproduces_it_bitwise():
    cfg = video_config()
    image_cfg = cfg.model.inner_model(1)
    image = randomize_(NestedUNet(image_cfg), seed=0).eval()
    zs, t, cond = clips(cfg)
    with torch.no_grad():
        want = image(zs[-1][:, :, 0], t, cond)[0]
    tops = []
    for seed in (1, 2):
        video = randomize_(NestedUNet(cfg.model), seed=seed).eval()
        with torch.no_grad():
            for name, p in video.named_parameters():
                if "adapter" in name:
                    p.zero_()
        loaded = load_inner(video, image.state_dict(), 1, "image model")
        assert loaded == ["inner_unet.inner_unet." + n for n, _ in image.named_parameters()]
        with torch.no_grad():
            out = video(zs, t, cond)
        assert out[-1].shape == (2, 3, 1, 8, 8)
        assert torch.equal(out[-1][:, :, 0], want)
        tops.append(out[0])
    assert tops[0].abs().mean() > 0.01 and not torch.allclose(tops[0], tops[1])


def test_image_model_weights_must_match_the_inner_levels():
    cfg = video_config()
    wrong = NestedUNet(dataclasses.replace(cfg.model.inner_model(1), unet=inner_level(channels=[32, 32, 64])))
    with pytest.raises(ValueError, match=r"weights do not fit the inner 1 level\(s\).*shape mismatch"):
        load_inner(NestedUNet(cfg.model), wrong.state_dict(), 1, "image model")


# ----------------------------------------------------------------------------------------------------------
# Pyramids and the SNR shift


def frame_indices(frames: int, side: int) -> torch.Tensor:
    """A clip whose every pixel of frame f holds f (one sample, two channels)."""
    return torch.arange(frames).float().reshape(1, 1, frames, 1, 1).expand(1, 2, frames, side, side).clone()


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        (
            [(16, 2), (4, 2), (1, 2)],
            {"first": [[0, 4, 8, 12], [0]], "middle": [[2, 6, 10, 14], [10]], "mean": [[1.5, 5.5, 9.5, 13.5], [7.5]]},
        ),
        ([(8, 2), (1, 2)], {"first": [[0]], "middle": [[4]], "mean": [[3.5]]}),
        (  # a space level above a time level that stops above one frame (the reference takes cumulative strides)
            [(8, 4), (8, 2), (2, 2), (1, 2)],
            {
                "first": [list(range(8)), [0, 4], [0]],
                "middle": [list(range(8)), [2, 6], [6]],
                "mean": [list(range(8)), [1.5, 5.5], [3.5]],
            },
        ),
    ],
)
@pytest.mark.parametrize("how", ["first", "middle", "mean"])
def test_frame_subsampling_picks_the_right_frames(shapes, expected, how):
    x = frame_indices(*shapes[0])
    levels = build_pyramid(x, shapes, how)
    assert [tuple(lv.shape[2:]) for lv in levels] == [(f, s, s) for f, s in shapes]
    for level, frames in zip(levels[1:], expected[how], strict=True):
        assert torch.equal(level, torch.tensor(frames).reshape(1, 1, -1, 1, 1).expand_as(level))


def test_space_steps_pool_every_frame_and_model_layouts_give_these_pyramids():
    x = torch.randn(2, 3, 4, 8, 8)
    levels = build_pyramid(x, [(4, 8), (4, 4), (2, 4)])
    pooled = torch.nn.functional.avg_pool2d(x[:, :, 3], 2)
    torch.testing.assert_close(levels[1][:, :, 3], pooled, rtol=0, atol=0)
    assert torch.equal(levels[2], levels[1][:, :, ::2])
    assert torch.equal(subsample_frames(x, 2, "middle"), x[:, :, 1::2])

    def time(channels: int, inner: UNetConfig | None) -> UNetConfig:
        return UNetConfig(channels=[8] * channels, num_groups=8, num_heads=2, temb_dim=32, resample="time", inner=inner)

    base = UNetConfig(channels=[8], num_groups=8, temb_dim=32)
    deep = ModelConfig(image_size=8, num_frames=16, unet=time(3, time(3, base)))  # 16 -> 4 -> 1
    assert MDMConfig(model=deep).validate().model.level_shapes() == [(16, 8), (4, 8), (1, 8)]
    spatial = UNetConfig(channels=[8, 8], num_groups=8, num_heads=2, temb_dim=32, inner=time(3, time(2, base)))
    mixed = ModelConfig(image_size=16, num_frames=8, unet=spatial)
    assert MDMConfig(model=mixed).validate().model.level_shapes() == [(8, 16), (8, 8), (2, 8), (1, 8)]


def test_video_snr_shift_uses_pixels_times_frames_and_images_are_unchanged():
    d = DiffusionConfig()
    video = MultiLevelDiffusion(d, [(16, 256), (16, 64), (1, 64)])
    assert video.scales == [16.0, 4.0, 1.0] and video.video
    assert video.item_shapes(3) == [(3, 16, 256, 256), (3, 16, 64, 64), (3, 1, 64, 64)]
    g = video.gammas()
    snr = g / (1 - g)
    torch.testing.assert_close(snr[0, 1:-1], snr[2, 1:-1] / 16, rtol=1e-9, atol=0)
    images = MultiLevelDiffusion(d, [64, 32, 16])
    as_shapes = MultiLevelDiffusion(d, [(1, 64), (1, 32), (1, 16)])
    assert images.scales == as_shapes.scales == [4.0, 2.0, 1.0] and not as_shapes.video
    assert torch.equal(images.gammas(torch.float32), as_shapes.gammas(torch.float32))
    assert images.item_shapes(3) == [(3, 64, 64), (3, 32, 32), (3, 16, 16)]
    based = MultiLevelDiffusion(dataclasses.replace(d, shift_base_size=32), [(8, 64), (1, 64)])
    assert based.scales == pytest.approx([2 * 8**0.5, 2.0])


# ----------------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_steps_video_levels(sampler):
    cfg = video_config(text_dim=0, num_classes=3)
    model = randomize_(NestedUNet(cfg.model)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
    proc = MultiLevelDiffusion(cfg.diffusion, cfg.model.level_shapes())
    noise = [
        torch.randn(2, *shape, generator=torch.Generator().manual_seed(i))
        for i, shape in enumerate(proc.item_shapes(3))
    ]
    labels = torch.tensor([0, 2])
    result = run(
        model,
        noise,
        proc.gammas(torch.float32),
        timestep_grid(3),
        Conditioning(labels=labels),
        Conditioning(labels=null_labels(2, 3)),
        sampler=sampler,
        thresholding="dynamic",
        guidance=2.0,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert [tuple(lv.shape) for lv in result.levels] == [(2, 3, 4, 16, 16), (2, 3, 4, 8, 8), (2, 3, 1, 8, 8)]
    assert all(torch.isfinite(lv).all() for lv in result.levels) and result.nfe >= 3
    assert not torch.allclose(result.levels[0][:, :, 0], result.levels[0][:, :, 1])


def test_pipeline_returns_videos_at_every_level():
    cfg = video_config(text_dim=0, num_classes=3)
    pipe = MDMPipeline(randomize_(NestedUNet(cfg.model)).eval(), cfg)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe.prepare_latents(2, torch.Generator().manual_seed(0))
    assert [tuple(z.shape) for z in latents] == [(2, 3, 4, 16, 16), (2, 3, 4, 8, 8), (2, 3, 1, 8, 8)]
    kw = dict(class_labels=[0, 2], num_inference_steps=2, guidance_scale=2.0)
    pt = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert pt.images is pt.videos[0] and pt.levels is pt.videos and pt.videos[2].shape == (2, 3, 1, 8, 8)
    arrays = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").videos
    assert [a.shape for a in arrays] == [(2, 4, 16, 16, 3), (2, 4, 8, 8, 3), (2, 1, 8, 8, 3)]
    assert arrays[0].dtype.name == "uint8"
    frames = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="pil").videos
    assert [[len(clip) for clip in level] for level in frames] == [[4, 4], [4, 4], [1, 1]]
    assert frames[0][1][3].size == (16, 16)
    assert np.array_equal(np.asarray(frames[0][1][3]), arrays[0][1, 3])
    with pytest.raises(ValueError, match="latents must be 3 tensors"):
        pipe.prepare_latents(2, None, [z[:, :, :1] for z in latents])


def test_image_pipeline_output_has_no_videos():
    cfg = tiny_config(levels=2, text_dim=0, num_classes=3)
    pipe = MDMPipeline(NestedUNet(cfg.model).eval(), cfg)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1], num_inference_steps=2, output_type="pt")
    assert out.videos is None and out.images.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_torch_compile_runs_a_video_forward():
    cfg = video_config()
    model = randomize_(NestedUNet(cfg.model)).eval()
    zs, t, cond = clips(cfg)
    with torch.no_grad():
        eager = model(zs, t, cond)
        compiled = torch.compile(model)(zs, t, cond)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Config errors


def _layout(**changes: object) -> MDMConfig:
    """The video config with model fields replaced (validated by the caller)."""
    cfg = video_config()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


def _time_level(stages: int, inner: UNetConfig | None = None) -> UNetConfig:
    return UNetConfig(channels=[16] * stages, num_groups=8, num_heads=2, temb_dim=64, resample="time", inner=inner)


@pytest.mark.parametrize(
    ("cfg", "key", "words"),
    [
        (lambda: _layout(num_frames=6), "model.unet.inner.resample", "not divisible by 4"),
        (lambda: _layout(num_frames=2), "model.unet.inner.resample", "fewer than one"),
        (lambda: _layout(num_frames=0), "model.num_frames", "must be >= 1"),
        (lambda: _layout(num_frames=1), "model.unet.inner.resample", "gets 1 frame(s)"),
        (  # an outer time level leaves 1 frame for an inner one that halves again
            lambda: _layout(image_size=8, unet=_time_level(3, _time_level(2, inner_level()))),
            "model.unet.inner.resample",
            "fewer than one",
        ),
        (
            lambda: _layout(unet=dataclasses.replace(video_config().model.unet, channels=[18, 16], num_groups=2)),
            "model.unet.channels[0]",
            "temporal attention",
        ),
        (
            lambda: dataclasses.replace(video_config(), diffusion=DiffusionConfig(mixed_ratio=[1.0, 1.0, 2.0])),
            "diffusion.mixed_ratio",
            "video",
        ),
    ],
)
def test_impossible_video_layouts_are_config_errors_naming_the_key(cfg, key, words):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*" + re.escape(words)):
        cfg().validate("video.yaml")


def test_a_mixed_ratio_phase_is_refused_for_video_levels_only():
    cfg = video_config()
    image_phase = PhaseConfig(levels=1, steps=1, mixed_ratio=[1.0])
    ok = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, phases=[image_phase]))
    ok.validate()
    bad = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, phases=[PhaseConfig(levels=2, steps=1, mixed_ratio=[1.0, 1.0])])
    )
    with pytest.raises(ConfigError, match=re.escape("'train.phases[0].mixed_ratio'")):
        bad.validate()
