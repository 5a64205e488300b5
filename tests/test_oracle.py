"""The shapes oracle: training, the safetensors cache, and the accuracy / Fréchet-distance numbers it reports."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mdm.data.shapes import COLORS, SHAPES, ShapesDataset
from mdm.eval.oracle import (
    CHECK_SEED,
    ORACLE_CACHE_ENV,
    REAL_SEED,
    Oracle,
    OracleEvaluator,
    accuracy,
    load_or_train_oracle,
    oracle_cache_dir,
    oracle_spec,
    real_dataset,
    render,
    train_oracle,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread avoids contention


def test_spec_defaults_scale_with_the_vocabulary_and_name_the_cache_file() -> None:
    spec = oracle_spec(16)
    assert spec.shapes == ("circle", "square", "triangle", "cross") and spec.colors == ("red", "green", "blue")
    assert spec.num_classes == 12 and spec.steps == math.ceil(2400 * 12 / 64)
    assert oracle_spec(16, list(SHAPES), list(COLORS)).steps == math.ceil(2400 * 40 / 64)
    keys = {oracle_spec(16).key(), oracle_spec(32).key(), oracle_spec(16, seed=1).key(), oracle_spec(16, steps=9).key()}
    assert len(keys) == 4 and oracle_spec(16).key() == oracle_spec(16).key()
    assert oracle_spec(32).key().startswith("oracle-32px-")
    with pytest.raises(ValueError, match="shapes must be distinct names"):
        oracle_spec(16, shapes=["circle", "hexagon"])
    with pytest.raises(ValueError, match="steps >= 1"):
        oracle_spec(16, steps=0)


def test_cache_dir_argument_then_environment_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ORACLE_CACHE_ENV, str(tmp_path / "env"))
    assert oracle_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert oracle_cache_dir() == tmp_path / "env"
    monkeypatch.delenv(ORACLE_CACHE_ENV)
    assert oracle_cache_dir() == Path.home() / ".cache" / "mdm" / "oracle"


def test_few_step_training_and_save_load_round_trip(tmp_path: Path) -> None:
    oracle = train_oracle(16, ["circle", "ring"], ["red", "cyan", "yellow"], steps=3, progress=False, check_samples=40)
    assert oracle.spec.num_classes == 6 and not oracle.training
    assert oracle.accuracy is not None and oracle.accuracy * 40 == round(oracle.accuracy * 40)
    images, labels = render(oracle.spec.dataset(CHECK_SEED, 40), range(40))
    assert accuracy(oracle, images, labels, batch_size=7) == oracle.accuracy
    loaded = Oracle.load(oracle.save(tmp_path / "o.safetensors"))
    assert loaded.spec == oracle.spec and loaded.accuracy == oracle.accuracy
    torch.testing.assert_close(loaded.features(images), oracle.features(images), rtol=0, atol=0)
    assert torch.equal(loaded.predict(images), oracle.predict(images))
    assert oracle.features(images).shape == (40, 4 * oracle.spec.width)
    with pytest.raises(ValueError, match=r"\(N, 3, 16, 16\) images"):
        oracle.features(torch.zeros(2, 3, 32, 32))
    (tmp_path / "torn.safetensors").write_bytes((tmp_path / "o.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"torn\.safetensors: not a readable safetensors file"):
        Oracle.load(tmp_path / "torn.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other\.safetensors: not an oracle file"):
        Oracle.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no such oracle file"):
        Oracle.load(tmp_path / "absent.safetensors")


def test_load_or_train_trains_once_then_reads_the_cache(tmp_path: Path) -> None:
    first = load_or_train_oracle(16, steps=2, cache_dir=tmp_path, progress=False)
    path = tmp_path / f"{oracle_spec(16, steps=2).key()}.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    stamp = path.stat().st_mtime_ns
    second = load_or_train_oracle(16, steps=2, cache_dir=tmp_path, progress=False)
    assert path.stat().st_mtime_ns == stamp and second.accuracy == first.accuracy
    images = render(real_dataset(16, list(first.spec.shapes), list(first.spec.colors), 3), range(6))[0]
    torch.testing.assert_close(second.features(images), first.features(images), rtol=0, atol=0)


def test_real_sets_are_disjoint_scenes_of_one_distribution() -> None:
    real = real_dataset(16, ["circle", "square"], ["red"], 5)
    assert len(real) == 10 and real.seed == REAL_SEED
    same = ShapesDataset(16, 5, ["circle", "square"], ["red"], seed=REAL_SEED)
    assert torch.equal(real.render(4), same.render(4))
    images, labels = render(real, range(10))
    assert len({tuple(x.flatten()[:8].tolist()) for x in images}) == 10
    assert labels.tolist() == [real.scene(i).label for i in range(10)]


class ChannelMeans:
    """A hand-made oracle: features are the per-channel means, the prediction is the brightest channel."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).argmax(1)


def flat(values: list[list[float]]) -> torch.Tensor:
    """Images of 2 x 2 pixels with constant channels `values` (one row per image)."""
    return torch.tensor(values)[:, :, None, None].expand(-1, -1, 2, 2).contiguous()


def fd_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance from np.cov and the eigenvalues of the (non-symmetric) covariance product."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_accuracy_fd_and_floor_on_a_hand_made_case() -> None:
    rng = np.random.default_rng(0)
    generated = rng.normal(size=(6, 3))
    requested = torch.tensor(generated.argmax(1))
    requested[[1, 4]] = (requested[[1, 4]] + 1) % 3  # two of six samples miss their label
    real_a, real_b = rng.normal(0.3, 1.0, size=(8, 3)), rng.normal(0.3, 1.1, size=(8, 3))
    labels_b = torch.tensor(real_b.argmax(1))
    labels_b[0] = (labels_b[0] + 1) % 3  # one of sixteen real images is "misclassified"

    evaluator = OracleEvaluator(ChannelMeans())
    evaluator.add_generated(flat(generated[:4].tolist()), requested[:4])
    evaluator.add_generated(flat(generated[4:].tolist()), requested[4:])
    evaluator.add_real(flat(real_a.tolist()), torch.tensor(real_a.argmax(1)), 0)
    evaluator.add_real(flat(real_b.tolist()), labels_b, 1)
    result = evaluator.results()
    assert result.num_generated == 6
    assert result.accuracy == pytest.approx(4 / 6) and result.real_accuracy == pytest.approx(15 / 16)
    f = lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)  # noqa: E731 (features pass through float32)
    assert result.fd == pytest.approx(fd_numpy(f(generated), f(real_a)), rel=1e-6)
    assert result.floor == pytest.approx(fd_numpy(f(real_a), f(real_b)), rel=1e-6)

    unconditional = OracleEvaluator(ChannelMeans())
    unconditional.add_generated(flat(generated.tolist()), None)
    unconditional.add_real(flat(real_a.tolist()), torch.tensor(real_a.argmax(1)), 0)
    unconditional.add_real(flat(real_b.tolist()), labels_b, 1)
    assert unconditional.results().accuracy is None


def test_per_class_breakdown_counts_what_each_requested_label_was_read_as() -> None:
    names = ["red", "green", "blue"]
    seen = [0, 0, 1, 2, 2, 2]  # the brightest channel of each generated image
    asked = torch.tensor([0, 1, 1, 2, 2, 0])  # red: 1 of 2 right, green: 1 of 2 (read as red), blue: 2 of 2
    colours = torch.eye(3)[seen]
    evaluator = OracleEvaluator(ChannelMeans(), label_names=[names])
    evaluator.add_generated(flat(colours[:3].tolist()), asked[:3])
    evaluator.add_generated(flat(colours[3:].tolist()), asked[3:])
    evaluator.add_real(flat(torch.eye(3).tolist()), torch.arange(3), 0)
    evaluator.add_real(flat(torch.eye(3).tolist()), torch.arange(3), 1)
    result = evaluator.results()
    assert result.accuracy == pytest.approx(4 / 6)
    b = result.per_class
    assert b is not None and b.accuracy == {"red": 0.5, "green": 0.5, "blue": 1.0}
    assert b.confusion == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert b.line() == "red 50.0% (most often read as blue), green 50.0% (most often read as red), blue 100.0%"

    partial = OracleEvaluator(ChannelMeans(), label_names=[names])
    partial.add_generated(flat(torch.eye(3)[[0, 0, 2]].tolist()), torch.tensor([0, 0, 0]))  # red, red, blue seen
    partial.add_real(flat(torch.eye(3).tolist()), torch.arange(3), 0)
    partial.add_real(flat(torch.eye(3).tolist()), torch.arange(3), 1)
    only_red = partial.results().per_class
    assert only_red is not None and only_red.accuracy == {"red": pytest.approx(2 / 3), "green": None, "blue": None}
    assert only_red.line() == "red 66.7% (most often read as blue)"
    assert OracleEvaluator(ChannelMeans()).breakdowns() == []


@pytest.mark.slow
def test_oracle_reaches_99_percent_on_held_out_scenes_at_16px() -> None:
    start = time.perf_counter()
    oracle = train_oracle(16, progress=False)
    seconds = time.perf_counter() - start
    assert oracle.accuracy is not None and oracle.accuracy >= 0.99
    fresh = real_dataset(16, list(oracle.spec.shapes), list(oracle.spec.colors), 500)
    assert accuracy(oracle, *render(fresh, range(1000))) >= 0.99
    assert seconds < 60, f"training took {seconds:.0f} s"
