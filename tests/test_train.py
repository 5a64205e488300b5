"""The trainer: exact resume, progressive growth, dropout, accumulation, NaN handling, atomic checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdm.config import ConfigError, PhaseConfig, config_from_dict, load_config, to_dict
from mdm.diffusion.process import MultiLevelDiffusion, build_pyramid
from mdm.models.conditioning import Conditioning
from mdm.models.unet import NestedUNet
from mdm.pipeline import MDMPipeline
from mdm.train import checkpoint
from mdm.train.checkpoint import NonFiniteWeightsError, RunState, TrainingError
from mdm.train.ema import EMA
from mdm.train.optim import learning_rate, make_optimizer
from mdm.train.phases import load_inner, phase_config
from mdm.train.step import _condition, draws
from mdm.train.trainer import Trainer
from tests.conftest import tiny_config


def train_config(phases: list[tuple[int, int]] | None = ((1, 3), (2, 3)), **train: object):
    """A 16/8 px class-conditional model on 4 shape classes, trained a few steps."""
    cfg = tiny_config(levels=2, text_dim=0, num_classes=4)
    cfg.data.shapes, cfg.data.colors = ["circle", "square"], ["red", "blue"]
    cfg.data.num_samples = 64
    t = cfg.train
    t.batch_size, t.lr, t.warmup_steps, t.ema_decay, t.ema_warmup = 4, 1e-3, 2, 0.9, True
    t.checkpoint_every, t.log_every, t.sample_count, t.sample_steps = 100, 1, 2, 2
    t.phases = [PhaseConfig(levels=n, steps=s) for n, s in phases] if phases else []
    t.steps = 3
    for k, v in train.items():
        setattr(t, k, v)
    return cfg.validate("test")


def weights(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    ck = run / "checkpoints" / f"step_{step:07d}"
    return {"model": load_file(ck / "model.safetensors"), "ema": load_file(ck / "ema.safetensors")}


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path: Path) -> None:
    cfg = train_config(phases=((1, 3), (2, 4)), keep_checkpoints=10)
    cfg.train.phases[1].freeze_inner_steps = 1
    final = Trainer(cfg, tmp_path / "a", progress=False).fit()
    assert final == tmp_path / "a" / "final"
    assert Trainer(cfg, tmp_path / "b", progress=False).fit(max_steps=5) is None
    assert checkpoint.resolve(tmp_path / "b").name == "step_0000005"
    Trainer(cfg, tmp_path / "b", resume="latest", progress=False).fit()
    a, b = weights(tmp_path / "a", 7), weights(tmp_path / "b", 7)
    for part in ("model", "ema"):
        assert_equal_states(a[part], b[part])
    opt_a = torch.load(tmp_path / "a/checkpoints/step_0000007/optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / "b/checkpoints/step_0000007/optimizer.pt", weights_only=True)
    for name, st in opt_a["state"].items():
        assert torch.equal(st["exp_avg_sq"], opt_b["state"][name]["exp_avg_sq"])
    assert_equal_states(
        load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    )
    state = json.loads((tmp_path / "b/checkpoints/step_0000007/state.json").read_text())
    assert state["position"] == 7 * 4 and state["phase"] == 1
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "a/log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "b/log.jsonl").read_text().splitlines()]
    assert log_a == log_b


def test_a_clock_stop_checkpoints_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    cfg = train_config(phases=((1, 2), (2, 3)), keep_checkpoints=10)
    Trainer(cfg, tmp_path / "a", progress=False).fit()
    stopped = Trainer(cfg, tmp_path / "b", progress=False)
    assert stopped.fit(max_seconds=0.0) is None  # the clock has run out after the first step
    assert stopped.state.step == 1 and checkpoint.resolve(tmp_path / "b").name == "step_0000001"
    assert Trainer(cfg, tmp_path / "b", resume="latest", progress=False).fit(max_seconds=3600.0) is not None
    assert_equal_states(weights(tmp_path / "a", 5)["model"], weights(tmp_path / "b", 5)["model"])


def test_run_outputs_model_samples_curve_and_phase_models(tmp_path: Path) -> None:
    cfg = train_config()
    Trainer(cfg, tmp_path, progress=False).fit()
    for rel in ("config.yaml", "loss.png", "log.jsonl", "samples/step_0000003.png", "samples/step_0000006.png"):
        assert (tmp_path / rel).is_file(), rel
    base = MDMPipeline.from_pretrained(tmp_path / "phases/levels_1")
    assert base.config.model.level_sizes() == [8]
    pipe = MDMPipeline.from_pretrained(tmp_path / "final")
    assert pipe.config.model.level_sizes() == [16, 8]
    assert pipe.config.model.class_names == ["red circle", "blue circle", "red square", "blue square"]
    out = pipe(class_labels=["blue square", 0], num_inference_steps=2, output_type="pt")
    assert [lv.shape for lv in out.levels] == [(2, 3, 16, 16), (2, 3, 8, 8)]
    assert torch.isfinite(out.levels[0]).all()
    with pytest.raises(ValueError, match="unknown class name 'green square'"):
        pipe(class_labels=["green square"], num_inference_steps=2)
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["level_sizes"] == [8] and records[-1]["level_sizes"] == [16, 8]
    assert all(len(r["level_loss"]) == len(r["level_sizes"]) for r in records)
    assert records[0]["lr"] == pytest.approx(5e-4) and records[1]["lr"] == pytest.approx(1e-3)


def test_growth_carries_inner_weights_and_keeps_base_loss(tmp_path: Path) -> None:
    cfg = train_config()
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit(max_steps=3)
    sub = trainer.phase.config
    base_net = NestedUNet(sub.model)
    base_net.load_state_dict(trainer.phase.ema.state_dict())
    grown = trainer.grow(1).net
    for k, v in base_net.state_dict().items():
        assert torch.equal(grown.inner_unet.state_dict()[k], v), k
    carried = {f"inner_unet.{k}" for k, _ in base_net.named_parameters()}
    assert set(trainer.phase.frozen) == carried | {"in_adapter.weight", "in_adapter.bias"}

    x = torch.rand(4, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = [torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 8, 8, generator=g)]
    cond = Conditioning(labels=torch.tensor([0, 1, 2, 4]))
    grown.eval()
    base_net.eval()
    two = MultiLevelDiffusion(trainer.phase.config.diffusion, [16, 8]).loss(grown, x, cond, t=t, noise=noise)
    one = MultiLevelDiffusion(sub.diffusion, [8]).loss(
        base_net, build_pyramid(x, [16, 8])[1], cond, t=t, noise=noise[1:]
    )
    torch.testing.assert_close(two.level_mse[1], one.level_mse[0], rtol=0, atol=0)


@pytest.mark.parametrize("freeze", [3, 1])
def test_a_freeze_window_keeps_the_inner_level_predicting_what_it_did(tmp_path: Path, freeze: int) -> None:
    cfg = train_config()
    cfg.train.phases[1].freeze_inner_steps = freeze
    final = Trainer(cfg, tmp_path, progress=False).fit()
    base = MDMPipeline.from_pretrained(tmp_path / "phases/levels_1").unet.eval()
    grown = MDMPipeline.from_pretrained(final).unet.eval()
    adapter = grown.in_adapter.weight
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = [torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 8, 8, generator=g)]
    cond = Conditioning(labels=torch.tensor([0, 1, 2, 3]))
    two = MultiLevelDiffusion(phase_config(cfg, 2).diffusion, [16, 8]).loss(grown, x, cond, t=t, noise=noise)
    one = MultiLevelDiffusion(phase_config(cfg, 1).diffusion, [8]).loss(
        base, build_pyramid(x, [16, 8])[1], cond, t=t, noise=noise[1:]
    )
    if freeze == 3:  # frozen for the whole phase: the adapter into the base is still zero, the base unchanged
        assert not adapter.any()
        torch.testing.assert_close(two.level_mse[1], one.level_mse[0], rtol=0, atol=0)
    else:  # after the window both train
        assert adapter.any()
        assert not torch.equal(two.level_mse[1], one.level_mse[0])


def test_a_fixed_inner_gives_the_outer_level_the_same_gradients_without_the_inner_backward() -> None:
    cfg = train_config()
    base = NestedUNet(phase_config(cfg, 1).model)
    nets = []
    for fixed in (False, True):
        net = NestedUNet(cfg.model)
        load_inner(net, base.state_dict(), 1, "base")
        for name, p in net.named_parameters():  # a trained outer level, but its adapter into the base still zero
            if not name.startswith(("inner_unet.", "in_adapter.")):
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        if fixed:
            net.fix_inner()
        x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        out = MultiLevelDiffusion(cfg.diffusion, [16, 8]).loss(
            net, x, Conditioning(labels=torch.tensor([0, 1, 2, 3])), generator=torch.Generator().manual_seed(2)
        )
        out.loss.mean().backward()
        nets.append(net)
    slow, fast = (dict(n.named_parameters()) for n in nets)
    for name, p in fast.items():
        if name.startswith(("inner_unet.", "in_adapter.")):
            assert p.grad is None and not p.requires_grad, name
        else:
            torch.testing.assert_close(p.grad, slow[name].grad, rtol=1e-5, atol=1e-8, msg=name)


def test_strict_inner_loading_names_the_keys(tmp_path: Path) -> None:
    cfg = train_config()
    grown = NestedUNet(cfg.model)
    state = NestedUNet(phase_config(cfg, 1).model).state_dict()
    bad = dict(state)
    bad.pop("conv_in.bias")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \(1\): \['conv_in.bias'\].*unexpected \(1\): \['extra.weight'\]"):
        load_inner(grown, bad, 1, "ckpt")
    wrong = dict(state)
    wrong["conv_in.weight"] = torch.zeros(1, 3, 3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch.*conv_in.weight"):
        load_inner(grown, wrong, 1, "ckpt")
    with pytest.raises(ValueError, match="a 2-level model cannot seed the levels of a 1-level one"):
        load_inner(NestedUNet(phase_config(cfg, 1).model), grown.state_dict(), 2, "ckpt")
    other = NestedUNet(cfg.model)
    assert sorted(load_inner(other, grown.state_dict(), 2, "ckpt")) == sorted(n for n, _ in grown.named_parameters())
    for (name, p), q in zip(grown.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_separate_runs_grow_from_init_inner_from(tmp_path: Path) -> None:
    Trainer(train_config(phases=((1, 3),)), tmp_path / "first", progress=False).fit()
    base = load_file(tmp_path / "first/final/model.safetensors")
    second = train_config(phases=((2, 2),), init_inner_from=str(tmp_path / "first/final"), seed=5)
    trainer = Trainer(second, tmp_path / "second", progress=False)
    inner = trainer.grow(0).net.inner_unet.state_dict()
    assert_equal_states(base, {k: inner[k] for k in base})
    assert len(trainer.phase.frozen) == len(base) + 2  # and the adapter's weight and bias
    trainer.fit()
    assert MDMPipeline.from_pretrained(tmp_path / "second/final").config.model.level_sizes() == [16, 8]

    mismatched = tiny_config(levels=2, text_dim=0, num_classes=4)
    mismatched.model.unet.inner.channels = [64, 64, 64]
    mismatched.data.shapes, mismatched.data.colors = ["circle", "square"], ["red", "blue"]
    mismatched.train.phases = [PhaseConfig(levels=2, steps=1)]
    mismatched.train.init_inner_from = str(tmp_path / "first/final")
    with pytest.raises(ValueError, match=r"first/final: weights do not fit the inner 1 level.*shape mismatch"):
        Trainer(mismatched.validate(), tmp_path / "bad", progress=False).fit()
    missing = train_config(phases=((2, 1),), init_inner_from=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere: --init-inner-from needs a model directory"):
        Trainer(missing, tmp_path / "bad2", progress=False).fit()


def test_condition_dropout_rate_matches_config(tmp_path: Path) -> None:
    cfg = train_config()
    cfg.diffusion.cond_drop_prob = 0.3
    trainer = Trainer(cfg, tmp_path, progress=False)
    phase = trainer.grow(0)
    x = torch.zeros(4000, 3, 8, 8)
    t, noise, dropped = draws(phase, cfg.train.seed, torch.arange(4000), x)
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    assert t.min() >= 0 and t.max() <= 999 and noise[0].shape == (4000, 3, 8, 8)
    assert abs(noise[0].std().item() - 1) < 0.01
    batch = {"label": torch.arange(4000) % 4, "caption": [""] * 4000}
    cond = _condition(trainer.conditioner, batch, dropped)
    assert torch.equal(cond.labels[dropped], torch.full((int(dropped.sum()),), 4))
    assert torch.equal(cond.labels[~dropped], batch["label"][~dropped])


def record_grads(store: list[list[torch.Tensor]], real_step=torch.optim.AdamW.step):
    """An AdamW.step replacement that appends every step's gradients to `store` before the real step (frozen
    parameters have none)."""

    def step(self, *args, **kwargs):
        store.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
        return real_step(self, *args, **kwargs)

    return step


def test_accumulation_equals_one_big_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grads: dict[str, list[list[torch.Tensor]]] = {}
    for run, batch, accum in (("big", 8, 1), ("small", 2, 4)):
        grads[run] = []
        monkeypatch.setattr(torch.optim.AdamW, "step", record_grads(grads[run]))
        cfg = train_config(phases=((2, 2),), batch_size=batch, grad_accum=accum)
        Trainer(cfg, tmp_path / run, progress=False).fit()
    assert len(grads["big"]) == len(grads["small"]) == 2
    for step_a, step_b in zip(grads["big"], grads["small"], strict=True):
        for ga, gb in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
    a, b = weights(tmp_path / "big", 2), weights(tmp_path / "small", 2)
    for k in a["model"]:  # 2 Adam steps move a weight by ~1.5e-3; rounding of near-zero gradients moves it ~1e-5
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=2e-5)
    la = [json.loads(x)["loss"] for x in (tmp_path / "big/log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "small/log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


def _nan_at(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    original = MultiLevelDiffusion.loss
    count = {"n": 0}

    def loss(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] in calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MultiLevelDiffusion, "loss", loss)


def test_injected_nan_is_skipped_and_never_checkpointed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = train_config(phases=((1, 4),), checkpoint_every=1, keep_checkpoints=10)
    _nan_at(monkeypatch, {3})
    Trainer(cfg, tmp_path, progress=False).fit()
    w2, w3 = weights(tmp_path, 2), weights(tmp_path, 3)
    assert_equal_states(w2["model"], w3["model"])
    assert_equal_states(w2["ema"], w3["ema"])
    for step in range(1, 5):
        for part in weights(tmp_path, step).values():
            assert all(torch.isfinite(v).all() for v in part.values())
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in records] == [0, 0, 1, 1]
    assert "loss" not in records[2]


def test_many_nonfinite_steps_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = train_config(phases=((1, 10),), max_nonfinite=3)
    _nan_at(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingError, match=r"3 non-finite losses or gradients in a row at step 2"):
        Trainer(cfg, tmp_path, progress=False).fit()
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_nonfinite_weights_are_never_written(tmp_path: Path) -> None:
    good = {"w": torch.ones(2)}
    with pytest.raises(NonFiniteWeightsError, match=r"EMA model.*'w'"):
        checkpoint.save(tmp_path, good, {"w": torch.tensor([1.0, float("inf")])}, {}, {}, RunState(step=1), keep=2)
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_crash_during_checkpoint_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = train_config(phases=((1, 4),), checkpoint_every=2)
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit(max_steps=2)
    real_save = torch.save

    def crash(obj, path, *args, **kwargs):
        if str(path).endswith("rng.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    monkeypatch.setattr(torch, "save", real_save)
    latest = checkpoint.resolve(tmp_path)
    assert latest.name == "step_0000002"
    logged = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4], "steps 3-4 ran and were logged before the crash"
    ck = checkpoint.load(latest)
    assert ck.state.step == 2 and ck.state.position == 8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "latest",
        "step_0000002",
    ]
    Trainer(cfg, tmp_path, resume="latest", progress=False).fit()
    assert checkpoint.resolve(tmp_path).name == "step_0000004"
    logged = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4], "the resumed run replaced the records after its checkpoint"
    assert not list((tmp_path / "checkpoints").glob(".step_*"))


def test_rotation_keeps_newest(tmp_path: Path) -> None:
    cfg = train_config(phases=((1, 5),), checkpoint_every=1, keep_checkpoints=2)
    Trainer(cfg, tmp_path, progress=False).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000004", "step_0000005"]
    assert checkpoint.resolve(tmp_path).name == "step_0000005"


def test_run_dir_guards(tmp_path: Path) -> None:
    cfg = train_config(phases=((1, 2),))
    Trainer(cfg, tmp_path, progress=False).fit()
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(cfg, tmp_path, progress=False)
    changed = train_config(phases=((1, 2),))
    changed.diffusion.shift_power = 2.0
    with pytest.raises(TrainingError, match=r"changed: \['diffusion.shift_power'\]"):
        Trainer(changed, tmp_path, resume="latest", progress=False)
    sampling = train_config(phases=((1, 2),))
    sampling.diffusion.spacing, sampling.diffusion.level_projection = "logsnr", True  # how it samples only
    sampling.diffusion.guidance_interval = [-math.inf, 5.0]
    Trainer(sampling, tmp_path, resume="latest", progress=False).fit()
    resumed = load_config(tmp_path / "config.yaml").diffusion
    assert (resumed.spacing, resumed.guidance_interval) == ("logsnr", [-math.inf, 5.0]), "saved and read back"
    shorter = train_config(phases=((1, 1),))
    with pytest.raises(TrainingError, match="past the end of the configured phases"):
        Trainer(shorter, tmp_path, resume="latest", progress=False).fit()
    other_levels = train_config(phases=((2, 2),))
    with pytest.raises(TrainingError, match=r"checkpoint levels \[8\] differ from phase 0's \[16, 8\]"):
        Trainer(other_levels, tmp_path, resume="latest", progress=False).fit()
    moved = train_config(phases=((1, 1), (2, 3)))
    with pytest.raises(TrainingError, match=r"train.phases changed: step 2 was in phase 0"):
        Trainer(moved, tmp_path, resume="latest", progress=False).fit()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        Trainer(cfg, tmp_path / "empty", resume="latest", progress=False)
    wrong = train_config(phases=((1, 2),))
    wrong.data.colors = ["red", "blue", "green"]
    with pytest.raises(ValueError, match="num_classes = 4 but the shapes dataset has 6"):
        Trainer(wrong, tmp_path / "w", progress=False)


def test_lr_schedule_warmup_and_cosine(tmp_path: Path) -> None:
    cfg = train_config(warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1, lr=1.0)
    tc = cfg.train
    assert [learning_rate(tc, s, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(tc, 4, 14) == pytest.approx(1.0)
    assert learning_rate(tc, 9, 14) == pytest.approx(0.55)
    assert learning_rate(tc, 14, 14) == pytest.approx(0.1)


def test_the_fused_adamw_takes_the_steps_of_the_reference_loop_and_skips_frozen_parameters() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    twin.load_state_dict(net.state_dict())
    net[0].requires_grad_(False)
    twin[0].requires_grad_(False)
    tc = train_config(lr=1e-2, weight_decay=0.1).train
    fused = make_optimizer(net, tc)
    loop = torch.optim.AdamW(
        twin.parameters(), lr=1e-2, betas=tuple(tc.betas), eps=tc.eps, weight_decay=0.1, foreach=False
    )
    assert fused.defaults["fused"]
    frozen, start = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    for step in range(20):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((net, fused), (twin, loop)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert torch.equal(net[0].weight, frozen) and (net[2].weight - start).abs().max() > 1e-2


def test_ema_update_and_warmup() -> None:
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, decay=0.99, warmup=True)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.update()
    torch.testing.assert_close(ema.state_dict()["weight"], 0.1 * before + 0.9 * net.weight.detach())
    plain = EMA(net, decay=0.99)
    assert plain.current_decay() == 0.99
    with pytest.raises(ValueError, match="missing"):
        plain.load_state_dict({}, 0)


def test_train_config_validation() -> None:
    data = to_dict(train_config())
    data["train"]["phases"] = [{"levels": 2, "steps": 2}, {"levels": 1, "steps": 2}]
    with pytest.raises(ConfigError, match=r"train.phases\[1\].levels"):
        config_from_dict(data)
    data["train"]["phases"] = [{"levels": 3, "steps": 2}]
    with pytest.raises(ConfigError, match="at most the model's 2 levels"):
        config_from_dict(data)
    data["train"]["phases"] = [{"levels": 2, "steps": 2, "mixed_ratio": [1, 2, 3]}]
    with pytest.raises(ConfigError, match="mixed_ratio"):
        config_from_dict(data)
    data["train"]["phases"] = [{"levels": 2, "steps": 2, "freeze_inner_steps": 3}]
    with pytest.raises(ConfigError, match="freeze_inner_steps"):
        config_from_dict(data)
    data["train"]["phases"] = [{"levels": 1, "steps": 2}, {"levels": 1, "steps": 2, "freeze_inner_steps": 1}]
    with pytest.raises(ConfigError, match=r"phases\[1\].freeze_inner_steps' must be 0: the phase refines"):
        config_from_dict(data)
    for span in ([1000, 1000], [0, 1001], [-1, 10], [5]):
        data["train"]["phases"] = [{"levels": 1, "steps": 2, "timesteps": span}]
        with pytest.raises(ConfigError, match=r"phases\[0\].timesteps' needs \[lo, hi\] with 0 <= lo < hi <= "):
            config_from_dict(data)
    for share in (0.0, 1.5, float("nan")):
        data["train"]["phases"] = [{"levels": 1, "steps": 2, "timesteps": [900, 1000], "timesteps_share": share}]
        with pytest.raises(ConfigError, match=r"phases\[0\].timesteps_share' must be"):
            config_from_dict(data)
    data["train"]["phases"] = [{"levels": 1, "steps": 2, "timesteps_share": 0.5}]
    with pytest.raises(ConfigError, match="timesteps_share' needs timesteps"):
        config_from_dict(data)
    data["train"]["phases"] = [{"levels": 1, "steps": 2, "loss_target": "noise"}]
    with pytest.raises(ConfigError, match="loss_target"):
        config_from_dict(data)
    data["train"]["phases"] = [{"levels": 1, "steps": 2}, {"levels": 1, "steps": 2, "timesteps": [0, 1000]}]
    assert config_from_dict(data).train.phases[1].timesteps == [0, 1000]
    data["train"]["phases"] = []
    data["train"]["batch_size"] = 0
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        config_from_dict(data)


class HashText:
    """A deterministic stand-in text encoder: one 8-wide token per word, from the word's bytes."""

    dim = 8
    name = "hash"

    def to(self, device: str | torch.device) -> HashText:
        return self

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        words = [p.split() or [""] for p in prompts]
        length = max(len(w) for w in words)
        emb, mask = torch.zeros(len(prompts), length, self.dim), torch.zeros(len(prompts), length)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                g = torch.Generator().manual_seed(sum(w.encode()) + 1000 * len(w))
                emb[i, j], mask[i, j] = torch.randn(self.dim, generator=g), 1
        return emb, mask


def test_text_model_trains_on_captions_and_drops_to_the_empty_caption(tmp_path: Path) -> None:
    cfg = tiny_config(levels=2, text_dim=8, num_classes=0)
    cfg.data.num_samples = 32
    cfg.diffusion.cond_drop_prob = 0.5
    t = cfg.train
    t.batch_size, t.warmup_steps, t.sample_count, t.sample_steps, t.log_every = 4, 1, 2, 2, 1
    t.phases = [PhaseConfig(levels=1, steps=2), PhaseConfig(levels=2, steps=2)]
    with pytest.raises(ValueError, match="needs a text encoder"):
        Trainer(cfg, tmp_path / "x", progress=False)
    trainer = Trainer(cfg, tmp_path / "run", text_encoder=HashText(), progress=False)
    phase = trainer.grow(0)
    batch = next(phase.batches)
    _, _, dropped = draws(phase, cfg.train.seed, batch["position"], batch["image"])
    cond = _condition(trainer.conditioner, batch, dropped)
    empty, _ = HashText().encode([""])
    for i, caption in enumerate(batch["caption"]):
        if dropped[i]:
            assert torch.equal(cond.text[i, :1], empty[0]) and cond.text_mask[i].sum() == 1
        else:
            emb, mask = HashText().encode([caption])
            assert torch.equal(cond.text[i, : emb.shape[1]], emb[0]) and cond.text_mask[i].sum() == mask.sum()
    assert dropped.any() and not dropped.all()
    final = Trainer(cfg, tmp_path / "run2", text_encoder=HashText(), progress=False).fit()
    assert (tmp_path / "run2/samples/step_0000004.png").is_file()
    pipe = MDMPipeline.from_pretrained(final)
    assert pipe.config.model.level_sizes() == [16, 8] and pipe.config.model.text_dim == 8


def test_resave_of_an_older_step_drops_the_abandoned_newer_ones(tmp_path: Path) -> None:
    w = {"w": torch.ones(1)}
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, w, w, {}, {}, RunState(step=step), keep=5)
    checkpoint.save(tmp_path, {"w": torch.zeros(1)}, w, {}, {}, RunState(step=2), keep=5)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]
    assert checkpoint.resolve(tmp_path).name == "step_0000002"
    assert checkpoint.load(checkpoint.resolve(tmp_path)).model["w"].item() == 0
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_resume_repairs_torn_log_and_missing_phase_outputs(tmp_path: Path) -> None:
    cfg = train_config()
    Trainer(cfg, tmp_path, progress=False).fit(max_steps=3)
    shutil.rmtree(tmp_path / "phases")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    Trainer(cfg, tmp_path, resume="latest", progress=False).fit()
    assert (tmp_path / "phases/levels_1/model.safetensors").is_file()
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_mixed_ratio_must_leave_every_level_rows() -> None:
    data = to_dict(train_config())
    data["train"]["phases"] = [{"levels": 2, "steps": 2, "batch_size": 2, "mixed_ratio": [1, 3]}]
    with pytest.raises(ConfigError, match=r"phases\[0\].batch_size' = 2 gives level 0 of the mixed ratio"):
        config_from_dict(data)
    data["train"]["phases"][0]["batch_size"] = 4
    config_from_dict(data)


DATA = Path(__file__).parent / "data"


def test_a_checkpoint_written_before_the_redesign_resumes(tmp_path: Path) -> None:
    """`data/legacy_run` is a run of a 16/8 px class model (phases of 2 and 3 steps, batch 2) stopped at step 3
    by the trainer as it was before the redesign (commit a453b12); `data/legacy_final.safetensors` is what that
    trainer's uninterrupted run ended with (made on an AVX-512 CPU). The old trainer's AdamW looped over the
    tensors; today's is fused, whose rounding differs, and AdamW's normalised step amplifies rounding on near-zero
    weights (1.4e-4 seen between CPUs), so the resumed run, a fresh one and the old trainer's end agree to half an
    optimizer step (lr 1e-3); a replayed, skipped or reset step moves weights by a whole one. (A resume within one
    version is bit for bit: tests/test_crash_resume.py.)"""
    run = tmp_path / "run"
    shutil.copytree(DATA / "legacy_run", run)
    cfg = load_config(run / "config.yaml")
    cfg.train.mixed_precision = "fp32"  # what the old trainer ran on every CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count the files were made with: float sums then match bit for bit
    try:
        final = Trainer(cfg, run, resume="latest", progress=False).fit()
        fresh = Trainer(cfg, tmp_path / "fresh", progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    resumed = load_file(final / "model.safetensors")
    atol = 0.5 * cfg.train.lr
    for other in (load_file(fresh / "model.safetensors"), load_file(DATA / "legacy_final.safetensors")):
        assert resumed.keys() == other.keys()
        for key, value in resumed.items():
            torch.testing.assert_close(value, other[key], rtol=0, atol=atol, msg=key)


def test_a_refine_phase_continues_the_same_levels_on_its_timesteps_and_loss(tmp_path: Path) -> None:
    cfg = train_config(phases=((1, 2), (1, 3), (2, 2)), keep_checkpoints=10, mixed_precision="fp32")
    cfg.train.phases[1].timesteps, cfg.train.phases[1].loss_target = [950, 1000], "v"
    cfg.train.phases[2].freeze_inner_steps = 2
    trainer = Trainer(cfg, tmp_path / "a", progress=False)
    trainer.fit(max_steps=2)
    before = trainer.phase.ema.state_dict()
    refine = trainer.grow(1)
    assert_equal_states(before, refine.net.state_dict())  # all of the base, nothing new around it
    assert refine.frozen == [] and refine.diffusion.config.loss_target == "v"
    assert refine.config.diffusion.loss_target == "eps"  # what its saved model directory records
    assert trainer.phase_dir() == tmp_path / "a/phases/levels_1"
    t, _, _ = draws(refine, cfg.train.seed, torch.arange(2000), torch.zeros(2000, 3, 8, 8))
    assert t.min() == 950 and t.max() == 999
    quarter = dataclasses.replace(refine, spec=dataclasses.replace(refine.spec, timesteps_share=0.25))
    t, _, _ = draws(quarter, cfg.train.seed, torch.arange(4000), torch.zeros(4000, 3, 8, 8))
    assert abs((t >= 950).float().mean().item() - (0.25 + 0.75 * 0.05)) < 0.02 and t.min() < 20
    assert cfg.diffusion.loss_target == "eps" and trainer.grow(2).diffusion.config.loss_target == "eps"

    final = Trainer(cfg, tmp_path / "b", progress=False).fit()
    first = load_file(tmp_path / "b/phases/levels_1_phase_0/model.safetensors")
    refined = load_file(tmp_path / "b/phases/levels_1/model.safetensors")
    assert first.keys() == refined.keys()
    assert all(not torch.equal(first[k], refined[k]) for k in first)  # the refine phase trains all of it
    inner = load_file(final / "model.safetensors")  # held fixed all of phase 2: what phase 2 grew from
    assert_equal_states(refined, {k.removeprefix("inner_unet."): v for k, v in inner.items() if k.startswith("inner_")})
    records = [json.loads(x) for x in (tmp_path / "b/log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == [0, 0, 1, 1, 1, 2, 2]

    assert Trainer(cfg, tmp_path / "c", progress=False).fit(max_steps=4) is None
    Trainer(cfg, tmp_path / "c", resume="latest", progress=False).fit()
    assert_equal_states(weights(tmp_path / "b", 7)["model"], weights(tmp_path / "c", 7)["model"])


def test_init_inner_from_a_model_of_all_the_levels_fine_tunes_it(tmp_path: Path) -> None:
    Trainer(train_config(phases=((1, 2),)), tmp_path / "base", progress=False).fit()
    base = load_file(tmp_path / "base/final/model.safetensors")
    tune = train_config(phases=((1, 2),), init_inner_from=str(tmp_path / "base/final"))
    tune.train.phases[0].timesteps = [900, 1000]
    trainer = Trainer(tune, tmp_path / "tune", progress=False)
    assert_equal_states(base, trainer.grow(0).net.state_dict())
    final = trainer.fit()
    assert MDMPipeline.from_pretrained(final).config.model.level_sizes() == [8]
    held = train_config(phases=((1, 2),), init_inner_from=str(tmp_path / "base/final"))
    held.train.phases[0].freeze_inner_steps = 1
    with pytest.raises(ValueError, match=r"final: --init-inner-from model has all 1 level\(s\) of train.phases\[0\]"):
        Trainer(held, tmp_path / "held", progress=False)
    Trainer(train_config(phases=((1, 1), (2, 1))), tmp_path / "two", progress=False).fit()
    smaller = train_config(phases=((1, 2), (2, 1)), init_inner_from=str(tmp_path / "two/final"))
    with pytest.raises(
        ValueError, match="two/final: --init-inner-from model has 2 levels, more than the first phase's 1"
    ):
        Trainer(smaller, tmp_path / "smaller", progress=False)


def test_resume_inside_a_freeze_window_is_exact(tmp_path: Path) -> None:
    cfg = train_config(phases=((1, 2), (2, 4)))
    cfg.train.phases[1].freeze_inner_steps = 3
    Trainer(cfg, tmp_path / "a", progress=False).fit()
    assert Trainer(cfg, tmp_path / "b", progress=False).fit(max_steps=3) is None
    Trainer(cfg, tmp_path / "b", resume="latest", progress=False).fit()
    assert_equal_states(weights(tmp_path / "a", 6)["model"], weights(tmp_path / "b", 6)["model"])


def test_resuming_an_older_checkpoint_warns_about_the_newer_ones(tmp_path: Path, caplog) -> None:
    cfg = train_config(phases=((1, 4),), checkpoint_every=1, keep_checkpoints=5)
    Trainer(cfg, tmp_path, progress=False).fit(max_steps=3)
    older = tmp_path / "checkpoints" / "step_0000001"
    with caplog.at_level("WARNING", logger="mdm.train.trainer"):
        Trainer(cfg, tmp_path, resume=str(older), progress=False).fit(max_steps=2)
    assert "the newer ['step_0000002', 'step_0000003'] will be replaced" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]


def test_bf16_autocast_on_cpu_tracks_fp32_and_keeps_float32_weights(tmp_path: Path) -> None:
    """bf16 autocast (train.mixed_precision=bf16) on the CPU: the losses of a short run stay within 2 % of fp32's
    (0.4 % measured over 30 steps) and every stored tensor stays float32."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = train_config(phases=((1, 6), (2, 6)), mixed_precision=precision)
        Trainer(cfg, tmp_path / precision, progress=False).fit()
        losses[precision] = torch.tensor(
            [json.loads(x)["loss"] for x in (tmp_path / precision / "log.jsonl").read_text().splitlines()]
        )
        stored = [
            *weights(tmp_path / precision, 12).values(),
            load_file(tmp_path / precision / "final/model.safetensors"),
        ]
        assert {v.dtype for part in stored for v in part.values()} == {torch.float32}
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=0.02, atol=0)
    assert not torch.equal(losses["bf16"], losses["fp32"]), "bf16 autocast was not in effect"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(
    native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """mixed_precision=auto trains in bf16 on CPUs with AVX-512 BF16 / AMX and in fp32 elsewhere (emulated bf16 ran a
    demo-video step 6.8x slower); an explicit bf16 is kept, with a warning where it is emulated."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    chosen = {}
    for mode in ("auto", "bf16", "fp32"):
        with caplog.at_level("WARNING", logger="mdm.train.step"):
            caplog.clear()
            chosen[mode] = Trainer(train_config(mixed_precision=mode), tmp_path / mode, progress=False).bf16
        assert ("emulated" in caplog.text) == (mode == "bf16" and not native), mode
    assert chosen == {"auto": native, "bf16": True, "fp32": False}


def test_channels_last_training_matches_the_default_layout_and_saves_plain_tensors(tmp_path: Path) -> None:
    """train.channels_last changes the memory format only: the same losses (to float rounding), and the saved
    weights load into a default-layout model."""
    losses = {}
    for name, cl in (("default", False), ("cl", True)):
        Trainer(train_config(phases=((1, 3), (2, 3)), channels_last=cl), tmp_path / name, progress=False).fit()
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(losses["cl"]), torch.tensor(losses["default"]), rtol=1e-4, atol=1e-6)
    state = load_file(tmp_path / "cl/final/model.safetensors")
    assert all(v.is_contiguous() for v in state.values())
    MDMPipeline.from_pretrained(tmp_path / "cl/final")
