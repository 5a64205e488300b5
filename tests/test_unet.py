import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mdm.config import MDMConfig, ModelConfig, UNetConfig
from mdm.diffusion.process import MultiLevelDiffusion
from mdm.models.blocks import attention, position_code
from mdm.models.conditioning import Conditioning
from mdm.models.unet import NestedUNet
from mdm.train.phases import load_inner
from tests.conftest import inner_level, randomize_, tiny_config


def inputs(cfg: MDMConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(batch, 3, s, s, generator=g) for s in cfg.model.level_sizes()]
    text = torch.randn(batch, 5, cfg.model.text_dim, generator=g)
    mask = torch.ones(batch, 5)
    mask[0, 3:] = 0
    text = text * mask[..., None]
    return zs, torch.tensor([999, 3][:batch]), Conditioning(text=text, text_mask=mask)


def test_output_shapes_and_level_order():
    cfg = tiny_config(levels=3)
    model = randomize_(NestedUNet(cfg.model))
    zs, t, cond = inputs(cfg)
    out = model(zs, t, cond)
    assert (
        [tuple(o.shape) for o in out] == [tuple(z.shape) for z in zs] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    )
    assert all(torch.isfinite(o).all() and o.std() > 0.01 for o in out)


def test_gradients_reach_every_parameter_of_three_levels():
    cfg = tiny_config(levels=3)
    model = randomize_(NestedUNet(cfg.model))
    proc = MultiLevelDiffusion(cfg.diffusion, cfg.model.level_sizes())
    zs, _, cond = inputs(cfg)
    proc.loss(model, zs[0].clamp(-1, 1), cond, generator=torch.Generator().manual_seed(1)).loss.mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def test_fresh_model_predicts_zero_and_outer_level_leaves_inner_unchanged():
    cfg3 = tiny_config(levels=3)
    model = NestedUNet(cfg3.model)
    zs, t, cond = inputs(cfg3)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in model(zs, t, cond))
    cfg2 = tiny_config(levels=2)
    small = randomize_(NestedUNet(cfg2.model))
    grown = NestedUNet(cfg3.model)
    missing = grown.inner_unet.load_state_dict(small.state_dict(), strict=True)
    assert not missing.missing_keys
    with torch.no_grad():
        before = small(zs[1:], t, cond)
        after = grown(zs, t, cond)
    assert torch.equal(after[0], torch.zeros_like(after[0]))
    for a, b in zip(after[1:], before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_mixed_batch_rows_match_standalone_inner_model():
    cfg = tiny_config(levels=2)
    model = randomize_(NestedUNet(cfg.model)).eval()
    zs, t, cond = inputs(cfg, batch=2)
    with torch.no_grad():
        mixed = model([zs[0][:1], zs[1]], t, cond)
        full = model(zs, t, cond)
        torch.testing.assert_close(mixed[0], full[0][:1])
        torch.testing.assert_close(mixed[1][:1], full[1][:1])
        # the row without a top level sees zero adapter features: exactly the inner network alone
        with torch.no_grad():
            model.in_adapter.weight.zero_()
            model.in_adapter.bias.zero_()
            alone = model(zs, t, cond)[1][1]
        assert not torch.allclose(full[1][1], alone)
        torch.testing.assert_close(mixed[1][1], alone)


def test_gradient_checkpointing_gives_same_gradients():
    cfg = tiny_config(levels=2)
    a = randomize_(NestedUNet(cfg.model))
    cfg_ck = tiny_config(levels=2, gradient_checkpointing=True)
    b = NestedUNet(cfg_ck.model)
    b.load_state_dict(a.state_dict())
    zs, t, cond = inputs(cfg)
    for m in (a, b):
        sum(o.square().mean() for o in m(zs, t, cond)).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_class_conditional_model_uses_its_labels():
    cfg = tiny_config(levels=2, text_dim=0, num_classes=4)
    model = randomize_(NestedUNet(cfg.model)).eval()
    zs, t, _ = inputs(cfg)
    with torch.no_grad():
        a = model(zs, t, Conditioning(labels=torch.tensor([0, 1])))
        b = model(zs, t, Conditioning(labels=torch.tensor([0, 4])))
    torch.testing.assert_close(a[0][0], b[0][0])
    assert (a[0][1] - b[0][1]).abs().max() > 1e-3


def test_masked_cross_attention_ignores_padding_but_unmasked_does_not():
    for masked in (True, False):
        cfg = MDMConfig(
            model=ModelConfig(image_size=8, text_dim=24, unet=inner_level(masked_cross_attention=masked))
        ).validate()
        model = randomize_(NestedUNet(cfg.model)).eval()
        zs, t, cond = inputs(cfg)
        padded = Conditioning(
            text=torch.cat([cond.text, torch.zeros(2, 3, 24)], 1),
            text_mask=torch.cat([cond.text_mask, torch.zeros(2, 3)], 1),
        )
        with torch.no_grad():
            diff = (model(zs, t, cond)[0] - model(zs, t, padded)[0]).abs().max()
        assert (diff < 1e-5) if masked else (diff > 1e-4)


def test_unconditional_model():
    cfg = MDMConfig(model=ModelConfig(image_size=8, unet=inner_level(text_proj_dim=0))).validate()
    model = randomize_(NestedUNet(cfg.model))
    out = model([torch.randn(2, 3, 8, 8)], 5)
    assert out[0].shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model([torch.randn(2, 3, 8, 8)], 5, Conditioning(labels=torch.tensor([0, 1])))


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda m, zs, t, c: m(zs[:2], t, c), "expected 3 levels"),
        (lambda m, zs, t, c: m([zs[0][:, :, :16], *zs[1:]], t, c), "sides must keep the ratios"),
        (lambda m, zs, t, c: m([zs[0][:, :1], *zs[1:]], t, c), "level 0 must be (B, 3, H, W)"),
        (lambda m, zs, t, c: m(zs, torch.tensor([1, 2, 3]), c), "t must be a scalar or shape (2,)"),
        (lambda m, zs, t, c: m(zs, t, None), "this model is conditional"),
        (lambda m, zs, t, c: m(zs, t, Conditioning(text=torch.randn(2, 5, 7))), "must be 24 wide"),
        (lambda m, zs, t, c: m(zs, t, Conditioning(text=torch.randn(3, 5, 24))), "condition batch 3"),
        (
            lambda m, zs, t, c: m(zs, t, Conditioning(labels=torch.tensor([0, 1]))),
            "takes text, not class labels",
        ),
        (lambda m, zs, t, c: m([zs[0], zs[1][:1], zs[2]], t, c), "fewer rows"),
    ],
)
def test_bad_inputs_are_rejected(call, needle):
    cfg = tiny_config(levels=3)
    model = NestedUNet(cfg.model)
    zs, t, cond = inputs(cfg)
    with pytest.raises(ValueError) as err:
        call(model, zs, t, cond)
    assert needle in str(err.value)


def test_conditioning_validation():
    with pytest.raises(ValueError, match="not both"):
        Conditioning(labels=torch.tensor([1]), text=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="rows \\[1\\] have no tokens"):
        Conditioning(text=torch.zeros(2, 2, 3), text_mask=torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="integer tensor"):
        Conditioning(labels=torch.tensor([1.0]))


def test_extra_micro_conditioning_values_change_the_output():
    cfg = MDMConfig(
        model=ModelConfig(
            image_size=8, text_dim=24, unet=inner_level(micro_conditioning={"scale": 8.0, "aesthetic": 0.0})
        )
    ).validate()
    model = randomize_(NestedUNet(cfg.model)).eval()
    zs, t, cond = inputs(cfg)
    with torch.no_grad():
        default = model(zs, t, cond)[0]
        explicit = model(
            zs, t, Conditioning(text=cond.text, text_mask=cond.text_mask, micro={"aesthetic": torch.zeros(2)})
        )[0]
        other = model(
            zs,
            t,
            Conditioning(
                text=cond.text,
                text_mask=cond.text_mask,
                micro={"aesthetic": torch.ones(2), "scale": torch.full((2,), 99.0)},
            ),
        )[0]
    torch.testing.assert_close(default, explicit)
    assert (default - other).abs().max() > 1e-4


def _every_level(unet: UNetConfig, **kw: object) -> UNetConfig:
    """`unet` with `kw` set at every level of the tree."""
    inner = None if unet.inner is None else _every_level(unet.inner, **kw)
    return dataclasses.replace(unet, inner=inner, **kw)


def test_position_embedding_starts_as_a_2d_code_learns_and_pins_the_side():
    cfg = tiny_config(levels=2)
    plain = randomize_(NestedUNet(cfg.model))
    placed = NestedUNet(dataclasses.replace(cfg.model, unet=_every_level(cfg.model.unet, position_embedding=True)))
    loaded = placed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(loaded.missing_keys) == ["inner_unet.position_embedding", "position_embedding"]
    assert not loaded.unexpected_keys
    assert placed.position_embedding.shape == (32, 16, 16)
    assert placed.inner_unet.position_embedding.shape == (32, 8, 8)
    code, x = placed.position_embedding.detach(), torch.arange(16.0)
    for channel, wave in ((0, x.sin()), (1, (x * 10000 ** (-1 / 8)).sin()), (8, x.cos())):
        torch.testing.assert_close(code[channel], wave.expand(16, 16))  # the column's code, the same in every row
        torch.testing.assert_close(code[16 + channel], wave[:, None].expand(16, 16))  # the row's
    assert torch.equal(placed.inner_unet.position_embedding, position_code(32, 8))
    assert torch.equal(position_code(6, 4)[4:], torch.zeros(2, 4, 4)) and not position_code(3, 4).any()  # left over

    zs, t, cond = inputs(cfg)
    with torch.no_grad():
        for p in (placed.position_embedding, placed.inner_unet.position_embedding):
            p.zero_()  # an addition after conv_in and nothing else: zeroed, the levels are the plain ones
        assert all(torch.equal(a, b) for a, b in zip(placed(zs, t, cond), plain(zs, t, cond), strict=True))
        placed.inner_unet.position_embedding.copy_(position_code(32, 8))
        moved = placed(zs, t, cond)
        assert all((a - b).abs().max() > 1e-3 for a, b in zip(moved, plain(zs, t, cond), strict=True))

    proc = MultiLevelDiffusion(cfg.diffusion, cfg.model.level_sizes())
    proc.loss(placed, zs[0].clamp(-1, 1), cond, generator=torch.Generator().manual_seed(1)).loss.mean().backward()
    for p in (placed.position_embedding, placed.inner_unet.position_embedding):
        assert p.grad is not None and p.grad.abs().sum() > 0
    bigger = [torch.randn(2, 3, 2 * z.shape[-1], 2 * z.shape[-1]) for z in zs]
    with pytest.raises(ValueError, match="position embedding is for 16x16 frames"):
        placed(bigger, t, cond)

    # A new level with an embedding around a trained one (zero adapters) still reproduces the inner level.
    outer = dataclasses.replace(cfg.model, unet=dataclasses.replace(cfg.model.unet, position_embedding=True))
    grown = randomize_(NestedUNet(outer), seed=3)
    with torch.no_grad():
        for name, p in grown.named_parameters():
            if "adapter" in name:
                p.zero_()
        load_inner(grown, plain.inner_unet.state_dict(), 1, "inner")
        alone = NestedUNet(cfg.model.inner_model(1))
        alone.load_state_dict(plain.inner_unet.state_dict())
        assert torch.equal(grown(zs, t, cond)[1], alone(zs[1:], t, cond)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_cpu_sampling_attention_computes_sdpas_float32_arithmetic(dtype):
    """When sampling, the explicit CPU path for bf16/fp16 heads gives SDPA's float32 result rounded once to the input
    dtype, keeps keys outside the mask out and gives 0 to a query whose keys are all masked; in training the result
    is SDPA's own."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g).mul(2).to(dtype).requires_grad_() for _ in range(3))
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    with torch.no_grad():
        out = attention(q, k, v, mask, fp32_softmax=False, sampling=True)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None, None].clone())
        unmasked = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert out.dtype == dtype
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0].float(), ref[0], atol=1e-2, rtol=1e-2)
    assert not torch.allclose(out[0].float(), unmasked[0])
    trained = attention(q, k, v, mask, fp32_softmax=False)
    assert torch.equal(trained, F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None].clone()))
    assert all(t.abs().sum() > 0 for t in torch.autograd.grad(trained[0].float().square().sum(), (q, k, v)))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert attention(q, k, v, None, fp32_softmax=False, sampling=True).dtype == dtype
