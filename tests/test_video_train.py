"""Video through the trainer, CLI and eval: progressive phases in time and space, exact resume, two gloo processes,
the pyramid's frames in every phase, growing around a trained image model, `mdm sample` / `mdm demo` / `mdm eval`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdm.app import serve
from mdm.cli import main
from mdm.config import (
    ConfigError,
    DataConfig,
    MDMConfig,
    ModelConfig,
    PhaseConfig,
    TrainConfig,
    UNetConfig,
    load_preset,
)
from mdm.data.loader import StreamSampler
from mdm.data.moving_shapes import MovingShapesDataset
from mdm.data.shapes import ShapesDataset
from mdm.diffusion.process import build_pyramid
from mdm.eval.motion_oracle import motion_oracle_spec, train_motion_oracle
from mdm.eval.oracle import ORACLE_CACHE_ENV
from mdm.models.unet import NestedUNet
from mdm.pipeline import MDMPipeline
from mdm.train import phases
from mdm.train.step import draws, train_step
from mdm.train.trainer import Trainer
from mdm.videos import mp4_available, read_clip
from tests.test_distributed import two_ranks_and_one
from tests.test_eval import TinyInception, script_to
from tests.test_train import assert_equal_states, weights

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPES, COLORS = ["circle", "square"], ["red", "blue"]
PROMPT = "a red circle moving left on a gray background"


def video_config(steps: tuple[int, ...] = (2, 2, 2), text: bool = False, **train: object) -> MDMConfig:
    """4 x 16² (space) around 4 x 8² (time: 4 -> 2 -> 1 frames) around a 1 x 8² image UNet, on moving shapes of
    4 classes; class-conditional, or captioned through the byte encoder. `steps`: the phases, innermost first."""
    image = UNetConfig(
        channels=[16, 32], num_res_blocks=[1], num_groups=8, num_heads=2, temb_dim=32, mid_blocks=True, text_proj_dim=16
    )
    time = UNetConfig(channels=[16, 16, 16], num_res_blocks=[1], num_groups=8, num_heads=2, temb_dim=32, inner=image)
    time.resample = "time"
    space = UNetConfig(channels=[16, 16], num_res_blocks=[1], num_groups=8, num_heads=2, temb_dim=32, inner=time)
    model = ModelConfig(image_size=16, num_frames=4, unet=space, **({"text_dim": 3136} if text else {"num_classes": 4}))
    data = DataConfig(dataset="moving_shapes", num_samples=64, shapes=SHAPES, colors=COLORS)
    cfg = MDMConfig(model=model, data=data, train=TrainConfig(mixed_precision="fp32"))  # exact comparisons on any CPU
    if text:
        cfg.text.encoder, cfg.text.max_length = "bytes", 16
    t = cfg.train
    t.batch_size, t.lr, t.warmup_steps, t.ema_decay, t.ema_warmup = 4, 1e-3, 2, 0.9, True
    t.checkpoint_every, t.log_every, t.sample_count, t.sample_steps = 100, 1, 2, 2
    t.phases = [PhaseConfig(levels=i + 1, steps=s) for i, s in enumerate(steps)]
    for k, v in train.items():
        setattr(t, k, v)
    return cfg.validate("video test")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def text_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A captioned video model (byte encoder) trained 2 + 2 + 2 steps through its three phases."""
    torch.set_num_threads(1)
    return Trainer(video_config(text=True), tmp_path_factory.mktemp("text-video"), progress=False).fit()


# ----------------------------------------------------------------------------------------------------------
# Training


def fixed_batch_loss(trainer: Trainer, state: dict[str, torch.Tensor]) -> float:
    """The current phase's loss with weights `state` on 16 fixed clips, timesteps spread over [0, T) and fixed noise."""
    phase = trainer.phase
    net = NestedUNet(phase.config.model)
    net.load_state_dict(state)
    clips = MovingShapesDataset(16, 4, 16, SHAPES, COLORS, seed=9)
    x = torch.stack([clips[i]["video"] for i in range(16)])
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(16, *shape, generator=g) for shape in phase.diffusion.item_shapes(3)]
    t = torch.linspace(0, phase.diffusion.T - 1, 16).long()
    cond = trainer.conditioner.labels(torch.tensor([clips.scene(i).label for i in range(16)]))
    with torch.no_grad():
        return float(phase.diffusion.loss(net.eval(), x, cond, t=t, noise=noise).loss.mean())


def test_phases_grow_in_time_then_space_and_the_loss_goes_down(tmp_path: Path) -> None:
    cfg = video_config(steps=(4, 4, 40), lr=3e-3)
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit(max_steps=8)
    start = {k: v.clone() for k, v in trainer.grow(2).net.state_dict().items()}
    final = trainer.fit()
    assert fixed_batch_loss(trainer, trainer.phase.net.state_dict()) < 0.75 * fixed_batch_loss(trainer, start)
    log = records(tmp_path)
    shapes = [[[1, 8]], [[4, 8], [1, 8]], [[4, 16], [4, 8], [1, 8]]]
    assert [r["level_shapes"] for r in (log[0], log[4], log[8])] == shapes
    assert log[8]["level_sizes"] == [16, 8, 8] and all(len(r["level_loss"]) == len(r["level_shapes"]) for r in log)
    for rel in ("loss.png", "samples/step_0000004.png", "samples/step_0000008.gif", "samples/step_0000048.gif"):
        assert (tmp_path / rel).is_file(), rel
    assert read_clip(tmp_path / "samples/step_0000048.gif").shape[1] == 4
    assert MDMPipeline.from_pretrained(tmp_path / "phases/levels_1").config.model.level_shapes() == [(1, 8)]
    assert MDMPipeline.from_pretrained(tmp_path / "phases/levels_2").config.model.level_shapes() == [(4, 8), (1, 8)]
    pipe = MDMPipeline.from_pretrained(final)
    out = pipe(class_labels=["red circle", 3], num_inference_steps=2, output_type="pt")
    assert [tuple(v.shape) for v in out.videos] == [(2, 3, 4, 16, 16), (2, 3, 4, 8, 8), (2, 3, 1, 8, 8)]


def test_interrupted_and_resumed_video_run_is_bitwise_identical(tmp_path: Path) -> None:
    cfg = video_config(steps=(2, 3, 2), keep_checkpoints=10)
    cfg.train.phases[1].freeze_inner_steps = 1
    cfg.diffusion.cond_drop_prob = 0.3
    Trainer(cfg, tmp_path / "a", progress=False).fit()
    assert Trainer(cfg, tmp_path / "b", progress=False).fit(max_steps=4) is None
    Trainer(cfg, tmp_path / "b", resume="latest", progress=False).fit()
    a, b = weights(tmp_path / "a", 7), weights(tmp_path / "b", 7)
    for part in ("model", "ema"):
        assert_equal_states(a[part], b[part])
    assert_equal_states(
        load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    )
    assert [r["loss"] for r in records(tmp_path / "a")] == [r["loss"] for r in records(tmp_path / "b")]
    state = json.loads((tmp_path / "b/checkpoints/step_0000007/state.json").read_text())
    assert state["levels"] == [[4, 16], [4, 8], [1, 8]] and state["phase"] == 2


def distributed_config(batch_size: int, **train: object) -> MDMConfig:
    """The video config, all three levels trained together for 2 steps."""
    cfg = video_config(steps=(1, 1, 2), batch_size=batch_size, sample_count=0, **train)
    cfg.train.phases = cfg.train.phases[2:]
    return cfg


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_train_a_video_model_like_one(
    tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r0 = two_ranks_and_one(tmp_path, distributed_config(2, strategy=strategy), distributed_config(4), monkeypatch)
    assert any("temporal_attn" in k for k in r0) and any(k.startswith("ema.") for k in r0)


def _inputs(trainer: Trainer, index: int) -> tuple[torch.Tensor, list[int]]:
    """What phase `index`'s first micro-batch trains on (its top level), and the dataset indices it read."""
    seen = []
    phase = trainer.grow(index)
    real = phase.diffusion.loss
    phase.diffusion.loss = lambda model, x, *a, **k: seen.append(x) or real(model, x, *a, **k)
    stream = StreamSampler(64, phase.batch_size, trainer.cfg.data.seed)
    indices = [stream.index(q) for q in range(trainer.state.position, trainer.state.position + phase.batch_size)]
    train_step(phase, trainer.state, trainer.env, trainer.conditioner, 1e-3, False)
    return seen[0], indices


@pytest.mark.parametrize("how", ["first", "middle", "mean"])
def test_every_phase_trains_on_the_frames_of_the_video_pyramid(tmp_path: Path, how: str) -> None:
    cfg = video_config()
    cfg.diffusion.temporal_downsample = how
    assert [phases.data_shape(cfg, n) for n in (1, 2, 3)] == [(4, 8), (4, 8), (4, 16)]
    image, indices = _inputs(Trainer(cfg, tmp_path / "built-in", progress=False), 0)
    clips = torch.stack([MovingShapesDataset(8, 4, 64, SHAPES, COLORS)[i]["video"] for i in indices])
    torch.testing.assert_close(image, build_pyramid(clips, [(4, 8), (1, 8)], how)[1][:, :, 0], rtol=0, atol=0)

    full = MovingShapesDataset(16, 4, 64, SHAPES, COLORS)  # a user dataset at the model's shape
    given = Trainer(cfg, tmp_path / "given", dataset=full, progress=False)
    image, indices = _inputs(given, 0)
    clips = torch.stack([full[i]["video"] for i in indices])
    torch.testing.assert_close(image, build_pyramid(clips, cfg.model.level_shapes(), how)[2][:, :, 0], rtol=0, atol=0)
    clip, indices = _inputs(given, 1)
    clips = torch.stack([full[i]["video"] for i in indices])
    torch.testing.assert_close(clip, build_pyramid(clips, cfg.model.level_shapes(), how)[1], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Image to video


def _random_model(cfg: MDMConfig, out: Path) -> Path:
    """A model directory of `cfg`'s network with its initial weights."""
    return MDMPipeline(NestedUNet(cfg.model), cfg).save_pretrained(out)


def test_init_inner_from_a_trained_image_model_keeps_its_prediction_bitwise(tmp_path: Path) -> None:
    video = video_config(steps=(2, 2))
    image = video_config(steps=(2,))  # the image base alone, trained on the clips' (first) frames
    image.model = video.model.inner_model(1)
    base = Trainer(image.validate("image"), tmp_path / "image", progress=False).fit()
    base_state = load_file(base / "model.safetensors")
    video.train.phases = [PhaseConfig(levels=2, steps=2), PhaseConfig(levels=3, steps=2)]
    video.train.init_inner_from = str(base)
    trainer = Trainer(video.validate("video"), tmp_path / "video", progress=False)
    net = trainer.grow(0).net
    assert_equal_states(base_state, {k: net.inner_unet.state_dict()[k] for k in base_state})
    carried = {f"inner_unet.{k}" for k, _ in net.inner_unet.named_parameters()}
    assert set(trainer.phase.frozen) == carried | {"in_adapter.weight", "in_adapter.bias"}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # whatever the time level's weights (but its zero-initialised adapters), ...
        for name, p in net.named_parameters():
            if not name.startswith("inner_unet.") and "adapter" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    zs = [torch.randn(3, 3, f, s, s, generator=g) for f, s in video.model.inner_model(2).level_shapes()]
    t, cond = torch.tensor([999, 500, 3]), trainer.conditioner.labels(torch.tensor([0, 1, 3]))
    net.eval()
    with torch.no_grad():  # ... its image level predicts exactly as the image model
        inner = net(zs, t, cond)[1][:, :, 0]
        alone = MDMPipeline.from_pretrained(base).unet([zs[1][:, :, 0]], t, cond)[0]
    torch.testing.assert_close(inner, alone, rtol=0, atol=0)
    assert trainer.fit() == tmp_path / "video/final"

    wide = dataclasses.replace(image.model, unet=dataclasses.replace(image.model.unet, channels=[16, 64]))
    video.train.init_inner_from = str(_random_model(dataclasses.replace(image, model=wide), tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"wide: weights do not fit the inner 1 level.*shape mismatch"):
        Trainer(video, tmp_path / "bad", progress=False).fit()
    big = dataclasses.replace(image.model, image_size=16)
    video.train.init_inner_from = str(_random_model(dataclasses.replace(image, model=big), tmp_path / "big"))
    with pytest.raises(ValueError, match=r"big: --init-inner-from model has levels \(frames, side\) \[\(1, 16\)\]"):
        Trainer(video, tmp_path / "bad2", progress=False)


# ----------------------------------------------------------------------------------------------------------
# CLI and eval


def test_mdm_sample_writes_a_gif_strip_and_mp4_per_clip(text_video: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "samples"
    args = ["sample", "--model", str(text_video), "--prompt", PROMPT, "--num", "2", "--steps", "2", "--plain"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    gifs = sorted(out.glob("*.gif"))
    assert [p.name[:4] for p in gifs] == ["000_", "001_"] and gifs[0].stem.endswith("gray-background")
    clip = read_clip(gifs[0])
    assert clip.shape[:2] == (3, 4)  # 4 frames of the three levels side by side, labelled
    strip = read_clip(gifs[0].with_suffix(".png"))
    assert strip.shape[1] == 1 and strip.shape[2] > 3 * 64  # one PNG: a row of frames per level
    if mp4_available():
        assert read_clip(gifs[0].with_suffix(".mp4")).shape[1] == 4
    for folder in ("plain", "level_4x16", "level_4x8", "level_1x8"):
        frames = read_clip(out / folder / "00001.gif")
        assert frames.shape[1] == (1 if folder == "level_1x8" else 4), folder
    assert read_clip(out / "plain/00000.gif").shape[-1] == 16


def test_mdm_demo_video_writes_the_grid_animation_and_the_frame_strip(tmp_path: Path, capsys) -> None:
    refine = "{levels: 1, steps: 1, timesteps: [950, 1000], timesteps_share: 0.75, loss_target: v}"  # as the preset's
    tiny = f"train.phases=[{{levels: 1, steps: 1}}, {refine}, {{levels: 2, steps: 1}}, {{levels: 3, steps: 1}}]"
    sets = [tiny, "train.batch_size=2", "train.sample_count=0", "data.motions=[left, grow]"]
    args = ["demo", "--preset", "demo-video", "--out", str(tmp_path), "--steps", "2", "--per-class", "2"]
    assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
    assert "demo_samples.gif" in capsys.readouterr().out
    grid = read_clip(tmp_path / "demo_samples.gif")
    assert grid.shape[1] == 4 and grid.shape[-1] > 2 * 3 * 128  # two captions per row, three levels each
    assert read_clip(tmp_path / "demo_samples.png").shape[1] == 1
    phases = sorted(p.name for p in (tmp_path / "phases").iterdir())
    assert phases == ["levels_1", "levels_1_phase_0", "levels_2"]  # the base before and after its refine phase
    assert [json.loads(x)["phase"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


@pytest.fixture
def motion_oracle_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 2-step motion oracle for the test model's clips, saved where `--oracle` looks for the default one, so no test
    trains one for a minute."""
    cache = tmp_path / "oracle-cache"
    monkeypatch.setenv(ORACLE_CACHE_ENV, str(cache))
    oracle = train_motion_oracle(motion_oracle_spec(16, 4, SHAPES, COLORS, steps=2), progress=False, check_samples=8)
    oracle.save(cache / f"{motion_oracle_spec(16, 4, SHAPES, COLORS).key()}.safetensors")
    return cache


def test_mdm_eval_of_a_video_model_per_frame_fid_temporal_psnr_and_motion_oracle(
    text_video: Path, motion_oracle_cache: Path, tmp_path: Path, capsys
) -> None:
    inception = script_to(TinyInception, tmp_path / "inception.pt")
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(text_video), "--data", "moving_shapes", "--num", "6", "--batch-size", "4"]
    assert main([*args, "--steps", "2", "--inception", str(inception), "--oracle", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tPSNR gen/data" in printed and "motion oracle: class accuracy" in printed
    report = json.loads(out.read_text())
    assert report["settings"]["level_shapes"] == [[4, 16], [4, 8], [1, 8]] and report["settings"]["num_data"] == 6
    assert all(p.endswith("on a gray background") or "background" in p for p in report["conditions"]["prompts"])
    levels = report["levels"]
    assert [lv["frames"] for lv in levels] == [4, 4, 1]
    assert all(lv["fid"] > 0 and lv["kid"] is not None for lv in levels)  # over 24, 24 and 6 frames
    for lv in levels[:2]:
        assert 0 < lv["temporal_psnr"] < 100 and 10 < lv["data_temporal_psnr"] < 100
    assert levels[2]["temporal_psnr"] is None and levels[1]["psnr"] > 0
    o = report["oracle"]
    for key in ("class_accuracy", "motion_accuracy", "real_class_accuracy", "real_motion_accuracy"):
        assert 0 <= o[key] <= 1 and o[key] * 6 == pytest.approx(round(o[key] * 6)), key
    assert o["fd"] > 0 and o["floor"] > 0 and report["settings"]["oracle"]["steps"] == 2  # the cached stand-in
    clips = MovingShapesDataset(16, 4, 1, SHAPES, COLORS)
    for kind, names in (("class", clips.class_names), ("motion", clips.motion_names)):
        breakdown, confusion = o[f"per_{kind}"], torch.tensor(o[f"per_{kind}"]["confusion"])
        assert list(breakdown["accuracy"]) == names and confusion.sum() == 6
        assert confusion.trace() == round(o[f"{kind}_accuracy"] * 6)
        assert [v is None for v in breakdown["accuracy"].values()] == (confusion.sum(1) == 0).tolist()
    assert "per requested motion:" in printed and "per requested class:" in printed


def test_bad_video_inputs_name_the_field(text_video: Path, tmp_path: Path, capsys) -> None:
    cfg = video_config()
    cfg.data.dataset = "shapes"
    with pytest.raises(ValueError, match=r"data.dataset = shapes gives images, but 4 frames .*model.num_frames"):
        Trainer(cfg, tmp_path / "a", progress=False)
    images = ShapesDataset(16, 8, SHAPES, COLORS)
    with pytest.raises(ValueError, match=r"shape \(3, 16, 16\) fits no level.*model.num_frames x model.image_size"):
        Trainer(video_config(), tmp_path / "b", dataset=images, progress=False).fit()
    with pytest.raises(ConfigError, match=r"diffusion\.mixed_ratio"):
        load_preset("demo-video", ["diffusion.mixed_ratio=[1, 1, 1]"])
    args = ["eval", "--model", str(text_video), "--num", "2", "--steps", "1", "--quiet", "--oracle"]
    assert main([*args, "--data", "shapes", "--out", str(tmp_path / "x.json")]) == 2
    assert "data 'shapes' does not fit this model (model.num_frames = 4)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"a video model \(model.num_frames = 4\); mdm serve shows images"):
        serve([str(text_video)])


def test_video_draws_give_clip_noise_per_level_and_drop_conditions_at_the_configured_rate(tmp_path: Path) -> None:
    cfg = video_config()
    cfg.diffusion.cond_drop_prob = 0.3
    trainer = Trainer(cfg, tmp_path, progress=False)
    phase = trainer.grow(2)
    t, noise, dropped = draws(phase, cfg.train.seed, torch.arange(2000), torch.zeros(2000, 3, 4, 16, 16))
    assert [tuple(n.shape[1:]) for n in noise] == [(3, 4, 16, 16), (3, 4, 8, 8), (3, 1, 8, 8)]
    assert abs(dropped.float().mean().item() - 0.3) < 0.03 and t.min() >= 0 and t.max() < 1000
    assert abs(noise[0].std().item() - 1) < 0.01
