"""The motion oracle for the built-in moving shapes (settings, training, cache, evaluator, accuracy on real clips,
frozen and reversed clips judged by their motion) and the model-free video metrics."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from mdm.eval.motion_oracle import (
    MotionOracle,
    MotionOracleEvaluator,
    load_or_train_motion_oracle,
    motion_accuracy,
    motion_oracle_spec,
    real_clips,
    render_clips,
    train_motion_oracle,
)
from mdm.eval.oracle import train_oracle
from mdm.eval.video import MIN_MSE, PerFrame, fold_frames, temporal_psnr

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spec_defaults_and_cache_keys() -> None:
    spec = motion_oracle_spec(16, 8)
    assert spec.shapes == ("circle", "square", "triangle", "cross") and spec.colors == ("red", "green", "blue")
    assert spec.motions == ("left", "right", "up", "down", "grow", "shrink", "still")
    assert spec.num_classes == 12 and spec.steps == math.ceil(2400 * 12 / 64)
    assert motion_oracle_spec(16, 8, ["circle"], ["red"]).steps == math.ceil(2400 * 7 / 64)  # motions outnumber
    keys = {motion_oracle_spec(*shape).key() for shape in ((16, 8), (32, 8), (16, 4))}
    keys |= {motion_oracle_spec(16, 8, seed=1).key(), motion_oracle_spec(16, 8, motions=["left", "up"]).key()}
    assert len(keys) == 5 and motion_oracle_spec(32, 4).key().startswith("motion-oracle-4x32px-")
    with pytest.raises(ValueError, match="motions must be distinct names"):
        motion_oracle_spec(16, 8, motions=["left", "spin"])
    with pytest.raises(ValueError, match="steps >= 1"):
        motion_oracle_spec(16, 8, steps=0)


def test_few_step_training_save_load_and_cache(tmp_path: Path) -> None:
    spec = motion_oracle_spec(8, 2, ["circle"], ["red", "blue"], ["left", "grow"], steps=3)
    oracle = train_motion_oracle(spec, progress=False, check_samples=20)
    assert not oracle.training and set(oracle.accuracy) == {"class", "motion"}
    videos, labels = render_clips(oracle.spec.dataset(7, 20), range(20))
    assert videos.shape == (20, 3, 2, 8, 8) and labels.shape == (20, 2)
    loaded = MotionOracle.load(oracle.save(tmp_path / "m.safetensors"))
    assert loaded.spec == oracle.spec and loaded.accuracy == oracle.accuracy
    assert torch.equal(loaded.features(videos), oracle.features(videos))
    assert torch.equal(loaded.predict(videos), oracle.predict(videos))
    assert oracle.features(videos).shape == (20, 2 * 2 * oracle.spec.width)  # 8 px: one stage, 2x wider
    assert motion_accuracy(oracle, videos, labels, batch_size=7) == motion_accuracy(oracle, videos, labels)
    with pytest.raises(ValueError, match=r"takes \(N, 3, 2, 8, 8\) clips"):
        oracle.predict(torch.zeros(2, 3, 4, 8, 8))
    train_oracle(8, ["circle"], ["red"], steps=1, progress=False, check_samples=4).save(tmp_path / "image.safetensors")
    with pytest.raises(ValueError, match=r"not an oracle file .*mdm-motion-oracle/1"):
        MotionOracle.load(tmp_path / "image.safetensors")

    small = motion_oracle_spec(8, 2, ["circle"], ["red"], ["up"], steps=2)
    first = load_or_train_motion_oracle(small, cache_dir=tmp_path, progress=False)
    path = tmp_path / f"{small.key()}.safetensors"
    stamp = path.stat().st_mtime_ns
    again = load_or_train_motion_oracle(small, cache_dir=tmp_path, progress=False)
    assert path.stat().st_mtime_ns == stamp and again.accuracy == first.accuracy


class Brightest:
    """A hand-made judge: the class is the brightest channel, the motion whether the clip gets brighter."""

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        return videos.mean(dim=(2, 3, 4))

    def predict(self, videos: torch.Tensor) -> torch.Tensor:
        brighter = videos[:, :, -1].mean(dim=(1, 2, 3)) > videos[:, :, 0].mean(dim=(1, 2, 3))
        return torch.stack([self.features(videos).argmax(1), brighter.long()], dim=1)


def test_evaluator_scores_class_and_motion_next_to_the_real_floor() -> None:
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(6, 3, 2, 2, 2, generator=g)
    truth = Brightest().predict(videos)
    asked = truth.clone()
    asked[0, 0] = (asked[0, 0] + 1) % 3  # one wrong class
    asked[1:3, 1] = 1 - asked[1:3, 1]  # two wrong motions
    evaluator = MotionOracleEvaluator(Brightest())
    evaluator.add_generated(videos[:4], asked[:4])
    evaluator.add_generated(videos[4:], asked[4:])
    real = torch.rand(10, 3, 2, 2, 2, generator=g)
    labels = Brightest().predict(real)
    labels[0, 1] = 1 - labels[0, 1]
    evaluator.add_real(real[:5], labels[:5], 0)
    evaluator.add_real(real[5:], labels[5:], 1)
    result = evaluator.results()
    assert result.num_generated == 6
    assert result.class_accuracy == pytest.approx(5 / 6) and result.motion_accuracy == pytest.approx(4 / 6)
    assert result.real_class_accuracy == 1.0 and result.real_motion_accuracy == pytest.approx(0.9)
    assert result.fd > 0 and result.floor > 0
    assert result.per_class is None and result.per_motion is None

    named = MotionOracleEvaluator(Brightest(), ["red", "green", "blue"], ["dimmer", "brighter"])
    named.add_generated(videos, asked)
    named.add_real(real[:5], labels[:5], 0)
    named.add_real(real[5:], labels[5:], 1)
    per_class, per_motion = named.results().per_class, named.results().per_motion
    assert per_class is not None and per_motion is not None
    for breakdown, column in ((per_class, 0), (per_motion, 1)):
        confusion = torch.tensor(breakdown.confusion)
        assert confusion.sum() == 6 and confusion.trace() == (asked[:, column] == truth[:, column]).sum()
        for i, value in enumerate(breakdown.accuracy.values()):
            wanted = asked[:, column] == i
            expect = None if not wanted.any() else float((truth[wanted, column] == i).double().mean())
            assert value == (None if expect is None else pytest.approx(expect))
    with pytest.raises(ValueError, match="both class_names and motion_names"):
        MotionOracleEvaluator(Brightest(), ["red", "green", "blue"])
    unasked = MotionOracleEvaluator(Brightest())
    unasked.add_generated(videos, None)
    unasked.add_real(real[:5], labels[:5], 0)
    unasked.add_real(real[5:], labels[5:], 1)
    assert unasked.results().class_accuracy is None and unasked.results().motion_accuracy is None


def test_a_briefly_trained_oracle_judges_frozen_clips_as_still() -> None:
    motions = ["left", "right", "still"]
    spec = motion_oracle_spec(16, 4, ["circle"], ["red"], motions, steps=50)
    oracle = train_motion_oracle(spec, progress=False, check_samples=60)
    real = real_clips(16, 4, ["circle"], ["red"], motions, 60)
    videos, labels = render_clips(real, range(120))
    assert motion_accuracy(oracle, videos, labels)["motion"] >= 0.95
    left = videos[labels[:, 1] == 0]
    frozen = left[:, :, :1].expand_as(left)
    assert (oracle.predict(frozen)[:, 1] == motions.index("still")).float().mean() >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("size", [16, 32])
def test_oracle_reaches_99_percent_on_real_clips(size: int) -> None:
    start = time.perf_counter()
    oracle = train_motion_oracle(motion_oracle_spec(size, 8), progress=False)
    seconds = time.perf_counter() - start
    assert oracle.accuracy is not None and min(oracle.accuracy.values()) >= 0.99, oracle.accuracy
    spec = oracle.spec
    real = real_clips(size, 8, list(spec.shapes), list(spec.colors), list(spec.motions), 500)
    videos, labels = render_clips(real, range(1000))
    fresh = motion_accuracy(oracle, videos, labels)
    assert min(fresh.values()) >= 0.99, fresh
    moving = videos[labels[:, 1] != spec.motions.index("still")]
    frozen = oracle.predict(moving[:, :, :1].expand_as(moving))[:, 1]
    assert (frozen == spec.motions.index("still")).float().mean() >= 0.99, "a frozen clip does not move"
    left = videos[labels[:, 1] == spec.motions.index("left")]
    assert (oracle.predict(left.flip(2))[:, 1] == spec.motions.index("right")).float().mean() >= 0.95
    evaluator = MotionOracleEvaluator(oracle)
    evaluator.add_real(videos[:500], labels[:500], 0)
    evaluator.add_real(videos[500:], labels[500:], 1)
    evaluator.add_generated(moving[:, :, :1].expand_as(moving), labels[labels[:, 1] != spec.motions.index("still")])
    result = evaluator.results()
    assert result.motion_accuracy is not None and result.motion_accuracy < 0.05 and result.fd > result.floor
    print(f"{size}px: trained in {seconds:.0f} s, held-out {oracle.accuracy}, fresh {fresh}, floor {result.floor:.3f}")


# ------------------------------------------------------------------------------------------------------ metrics
def test_temporal_psnr_and_per_frame_features() -> None:
    base = torch.rand(2, 3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    still = base.expand(-1, -1, 5, -1, -1)
    assert torch.allclose(temporal_psnr(still), torch.full((2,), -10 * math.log10(MIN_MSE), dtype=torch.float64))
    flicker = torch.cat([base, base + 0.2, base, base + 0.2], dim=2)  # steps of 0.1 on [0, 1] pixels: 20 dB
    assert torch.allclose(temporal_psnr(flicker), torch.full((2,), 20.0, dtype=torch.float64))
    assert temporal_psnr(torch.cat([still, flicker[:1].expand(2, -1, -1, -1, -1)], dim=2)).shape == (2,)
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_psnr(base)
    with pytest.raises(ValueError, match=r"expected \(N, C, T, H, W\) clips"):
        temporal_psnr(base[:, :, 0])

    clips = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).view(2, 3, 4, 2, 2)
    frames = fold_frames(clips)
    assert frames.shape == (8, 3, 2, 2) and torch.equal(frames[5], clips[1, :, 1])
    per_frame = PerFrame(lambda images: images.mean(dim=(2, 3)))
    assert torch.equal(per_frame(clips), frames.mean(dim=(2, 3)))
    assert per_frame(frames).shape == (8, 3)
