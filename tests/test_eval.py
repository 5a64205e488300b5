"""Metrics: FID / KID against direct float64 computations, statistics files, the Inception loader (a tiny random
TorchScript stand-in with the same call convention), a tiny offline CLIP, per-level consistency, and two ranks."""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mdm.config import load_config
from mdm.data.shapes import ShapesDataset
from mdm.diffusion.process import build_pyramid
from mdm.eval import (
    INCEPTION_ENV,
    INCEPTION_SHA256,
    INCEPTION_URL,
    ORACLE_CACHE_ENV,
    FeatureAccumulator,
    PyramidEvaluator,
    RunningMean,
    Statistics,
    consistency_mse,
    format_table,
    frechet_distance,
    kid,
    load_clip,
    load_inception,
    psnr,
    rank_batches,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread avoids contention


class TinyInception(nn.Module):
    """Same call convention as the TorchScript Inception: 0..255 RGB of any size, `return_features=True`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img.to(torch.float32), size=(16, 16), mode="bilinear", align_corners=False)
        x = F.adaptive_avg_pool2d(torch.relu(self.conv((x - 128) / 128)), 2).flatten(1)
        return x if return_features else self.head(x).softmax(-1)


class ChannelMeans(nn.Module):
    """Returns what it is given, per channel: shows the 0..255 RGB conversion."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return img.mean(dim=(2, 3))


def script_to(module: type[nn.Module], path: Path) -> Path:
    """Build `module` with seeded weights, torch.jit.script and save it (TorchScript's deprecation warnings off)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module()), str(path))
    return path


@pytest.fixture
def inception_file(tmp_path: Path) -> Path:
    return script_to(TinyInception, tmp_path / "inception.pt")


def smooth_images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Random low-frequency RGB images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear")


def random_statistics(dim: int, seed: int) -> Statistics:
    """Full-rank statistics with correlated features."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    return Statistics(rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim))


# --- Inception loader ----------------------------------------------------------------------------------------------


def test_missing_inception_says_where_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    for path in (None, tmp_path / "absent.pt"):
        with pytest.raises(FileNotFoundError) as err:
            load_inception(path)
        assert INCEPTION_URL in str(err.value) and INCEPTION_SHA256 in str(err.value)
        assert INCEPTION_ENV in str(err.value) and "--inception" in str(err.value)
    assert "absent.pt" in str(err.value)


def test_non_torchscript_file_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip archive")
    weights = tmp_path / "weights.pt"
    torch.save(TinyInception().state_dict(), weights)
    for path in (garbage, weights):
        with pytest.raises(ValueError, match="not a TorchScript archive") as err:
            load_inception(path)
        assert str(path) in str(err.value) and INCEPTION_URL in str(err.value)


def test_inception_from_the_environment(inception_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INCEPTION_ENV, str(inception_file))
    net = load_inception()
    assert net.path == inception_file and not net.is_standard and len(net.sha256) == 64
    assert net(smooth_images(3, 0, size=24)).shape == (3, 32)


def test_images_reach_the_network_as_8bit_rgb(tmp_path: Path) -> None:
    net = load_inception(script_to(ChannelMeans, tmp_path / "means.pt"))
    rgb = torch.stack([torch.full((3, 5, 5), v) for v in (-1.0, 0.0, 1.0)])
    assert net(rgb).tolist() == [[0.0] * 3, [128.0] * 3, [255.0] * 3]
    assert net(torch.full((2, 1, 7, 7), 1.0)).tolist() == [[255.0] * 3] * 2
    with pytest.raises(ValueError, match="1 or 3 channels"):
        net(torch.zeros(1, 4, 8, 8))


# --- Fréchet distance and statistics -----------------------------------------------------------------------------


def test_accumulated_statistics_match_float64_numpy(inception_file: Path) -> None:
    acc = FeatureAccumulator(load_inception(inception_file))
    images = smooth_images(70, 1)
    rows = torch.cat([acc.update(images[i : i + 32]) for i in range(0, 70, 32)]).double().numpy()
    stats = acc.statistics()
    assert stats.n == 70
    np.testing.assert_allclose(stats.mu, rows.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(acc.features().double().numpy(), rows.astype(np.float32))


def test_fd_is_zero_for_a_set_against_itself_and_grows_with_noise(inception_file: Path) -> None:
    net = load_inception(inception_file)
    images = smooth_images(256, 2)

    def stats(x: torch.Tensor) -> Statistics:
        acc = FeatureAccumulator(net, keep_features=False)
        acc.update(x)
        return acc.statistics()

    clean = stats(images)
    assert frechet_distance(clean, clean) < 1e-9
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(images.shape, generator=g)
    distances = [frechet_distance(clean, stats((images + s * noise).clamp(-1, 1))) for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in pairwise(distances)), distances
    assert distances[0] > 1e-6


def test_fd_matches_direct_float64_computations() -> None:
    s1, s2 = random_statistics(24, 0), random_statistics(24, 1)
    # Tr sqrtm(S1 S2) from the eigenvalues of the non-symmetric product (real, >= 0: it is similar to a PSD matrix).
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1.sigma @ s2.sigma).real.clip(min=0)).sum()
    direct = ((s1.mu - s2.mu) ** 2).sum() + np.trace(s1.sigma) + np.trace(s2.sigma) - 2 * trace_sqrt
    assert frechet_distance(s1, s2) == pytest.approx(direct, rel=1e-10)
    assert frechet_distance(s2, s1) == pytest.approx(direct, rel=1e-10)
    # Commuting (diagonal) covariances: FD = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    diag = frechet_distance(Statistics(np.zeros(3), np.diag(a)), Statistics(np.ones(3), np.diag(b)))
    assert diag == pytest.approx(3 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-12)
    with pytest.raises(ValueError, match="feature sizes differ: 24 vs 3"):
        frechet_distance(s1, Statistics(np.zeros(3), np.eye(3)))


def test_statistics_file_round_trip(tmp_path: Path) -> None:
    stats = Statistics.from_moments(10, np.arange(4.0), np.eye(4) * 10 + 1)
    loaded = Statistics.load(stats.save(tmp_path / "ref" / "stats.npz"))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == 10
    np.savez(tmp_path / "edm.npz", mu=np.zeros(4, np.float32), sigma=np.eye(4, dtype=np.float32))
    edm = Statistics.load(tmp_path / "edm.npz")
    assert edm.n is None and edm.mu.dtype == np.float64


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"mu": np.zeros(3)}, r"missing \['sigma'\]"),
        ({"mu": np.zeros(3), "sigma": np.eye(4)}, r"sigma must be \(3, 3\)"),
        ({"mu": np.zeros((3, 1)), "sigma": np.eye(3)}, r"mu must be a vector"),
        ({"mu": np.full(2, np.nan), "sigma": np.eye(2)}, "finite"),
    ],
)
def test_bad_statistics_files_name_the_file_and_field(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as err:
        Statistics.load(path)
    assert str(path) in str(err.value)


def test_unreadable_statistics_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such statistics file"):
        Statistics.load(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        Statistics.load(tmp_path / "text.npz")


# --- KID ----------------------------------------------------------------------------------------------------------


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 16, generator=g), torch.randn(1000, 16, generator=g)
    same_mean, same_std = kid(a, b, subset_size=200, num_subsets=50)
    far_mean, far_std = kid(a, b + 0.5, subset_size=200, num_subsets=50)
    assert abs(same_mean) < same_std < 0.05
    assert far_mean > 5 * far_std and far_mean > 50 * abs(same_mean)
    assert kid(a.numpy(), b.numpy(), subset_size=200, num_subsets=50) == (same_mean, same_std)


def test_kid_matches_the_unbiased_mmd_formula() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) + 0.3
    k = lambda p, q: (p @ q.T / 5 + 1) ** 3  # noqa: E731
    off = lambda m: (m.sum() - np.trace(m)) / 30  # noqa: E731
    expected = off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()
    mean, std = kid(x, y, subset_size=6, num_subsets=3)
    assert mean == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_kid_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        kid(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="feature sizes differ"):
        kid(torch.zeros(5, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"f2 must be a feature matrix"):
        kid(torch.zeros(5, 4), torch.zeros(5))


# --- per-level consistency and the evaluator ---------------------------------------------------------------------


def test_consistency_psnr_is_infinite_for_a_pooled_pyramid_and_drops_with_inconsistency() -> None:
    top = smooth_images(4, 4, size=32)
    pyramid = build_pyramid(top, [32, 16, 8])
    assert torch.isinf(psnr(consistency_mse(pyramid))).all()
    shifted = [pyramid[0], pyramid[1] + 0.2, pyramid[2] - 0.02]
    # An offset c on [-1, 1] is c / 2 on [0, 1]: PSNR = -20 log10(c / 2).
    torch.testing.assert_close(psnr(consistency_mse(shifted)[0]), torch.tensor([20.0, 40.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(5)
    noisy = [
        psnr(consistency_mse([top, pyramid[1] + s * torch.randn(4, 3, 16, 16, generator=g)])).mean()
        for s in (0.01, 0.1)
    ]
    assert noisy[0] > noisy[1]
    with pytest.raises(ValueError, match="divide"):
        consistency_mse([top, F.adaptive_avg_pool2d(top, 12)])
    with pytest.raises(ValueError, match="level 1"):
        consistency_mse([top, torch.zeros(3, 3, 16, 16)])


def test_evaluator_on_data_pooled_from_the_same_images(inception_file: Path, tmp_path: Path) -> None:
    net = load_inception(inception_file)
    images = smooth_images(48, 6, size=32)
    evaluator = PyramidEvaluator(net, [32, 16])
    for batch in rank_batches(48, 20, desc="test"):
        chunk = images[batch.start : batch.stop]
        evaluator.add_data(chunk)
        evaluator.add_generated(build_pyramid(chunk, [32, 16]))
    results = evaluator.results(kid_subsets=5)
    assert [(r.level, r.size, r.num_generated) for r in results] == [(0, 32, 48), (1, 16, 48)]
    assert all(r.fid is not None and r.fid < 1e-6 for r in results)
    # The unbiased MMD^2 of a set against itself is slightly negative (the diagonal is left out of one term only).
    assert all(r.kid is not None and -1e-2 < r.kid <= 0 for r in results)
    assert results[0].psnr is None and results[1].psnr == float("inf")
    table = format_table(results)
    assert "FID" in table and len(table.splitlines()) == 3 and "inf" in table

    top_ref = evaluator.data_statistics()[0]
    with_ref = PyramidEvaluator(net, [32, 16], reference=Statistics.load(top_ref.save(tmp_path / "ref.npz")))
    with_ref.add_generated(build_pyramid(images, [32, 16]))
    first, second = with_ref.results()
    assert first.fid == pytest.approx(0, abs=1e-6) and first.kid is None and second.fid is None
    with pytest.raises(ValueError, match="alternatives"):
        with_ref.add_data(images)
    with pytest.raises(ValueError, match="expected levels of sizes"):
        with_ref.add_generated(build_pyramid(images, [32, 8]))


def test_rank_batches_and_running_mean_alone() -> None:
    batches = list(rank_batches(10, 4))
    assert [list(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    mean = RunningMean((2,))
    assert torch.isnan(mean.compute()).all()
    mean.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    mean.update(torch.tensor([[5.0, 7.0]]))
    assert mean.compute().tolist() == [3.0, 5.0]


# --- two ranks -----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    acc = FeatureAccumulator(load_inception(Path(root) / "inception.pt"))
    mean = RunningMean()
    images = smooth_images(11, 7)
    for batch in rank_batches(11, 2):
        acc.update(images[batch.start : batch.stop])
        mean.update(torch.arange(batch.start, batch.stop, dtype=torch.float64))
    stats = acc.statistics()
    torch.save(
        {"mu": stats.mu, "sigma": stats.sigma, "n": stats.n, "features": acc.features(), "mean": mean.compute()},
        Path(root) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_with_one_process(inception_file: Path, tmp_path: Path) -> None:
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    acc = FeatureAccumulator(load_inception(inception_file))
    acc.update(smooth_images(11, 7))
    single = acc.statistics()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["n"] == 11 and float(got["mean"]) == 5.0
        np.testing.assert_allclose(got["mu"], single.mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got["sigma"], single.sigma, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got["features"], acc.features())


# --- CLIP score ----------------------------------------------------------------------------------------------------

WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "red", "blue", "circle", "square", "photo", "of"]


@pytest.fixture
def clip_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny random CLIP with a word-level tokenizer and a preprocessor config, saved for offline loading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    text = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    text |= dict(num_attention_heads=2, max_position_embeddings=12, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision |= dict(image_size=16, patch_size=8)
    torch.manual_seed(0)
    path = tmp_path / "clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    prep = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (path / "preprocessor_config.json").write_text(json.dumps(prep))
    return path


def test_clip_score_range_determinism_and_batch_independence(clip_dir: Path) -> None:
    scorer = load_clip(clip_dir)
    images = smooth_images(4, 8, size=24)
    prompts = ["a red circle", "a photo of a blue square", "blue", "a photo of a red square of a blue circle"]
    scores = scorer(images, prompts)
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 100)).all()
    torch.testing.assert_close(load_clip(clip_dir)(images, prompts), scores)
    alone = torch.cat([scorer(images[i : i + 1], prompts[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(alone, scores, atol=1e-4, rtol=1e-4)
    assert scorer.score(images, prompts) == pytest.approx(float(scores.mean()))
    assert scorer(images[:1, :1], ["red"]).shape == (1,)


def test_clip_input_and_directory_errors(clip_dir: Path, tmp_path: Path) -> None:
    scorer = load_clip(clip_dir)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(smooth_images(2, 0), ["a red circle"])
    with pytest.raises(TypeError, match="list of strings"):
        scorer(smooth_images(1, 0), "a red circle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 or 3 channels"):
        scorer(torch.zeros(1, 2, 8, 8), ["red"])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_clip(tmp_path / "absent")
    (clip_dir / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing preprocessor_config\.json"):
        load_clip(clip_dir)
    (clip_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5]}))
    with pytest.raises(ValueError, match="image_mean"):
        load_clip(clip_dir)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# --- mdm eval: the whole loop on tiny trained models --------------------------------------------------------------

TINY_TRAIN = [
    "train.phases=[{levels: 1, steps: 2}, {levels: 2, steps: 2, mixed_ratio: [1, 1]}]",
    "train.batch_size=2",
    "train.sample_count=0",
]


@pytest.fixture(scope="module")
def class_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo preset (32/16 px, 12 shape x colour classes) trained for 2 + 2 steps."""
    from mdm.config import load_preset
    from mdm.train.trainer import Trainer

    return Trainer(load_preset("demo", TINY_TRAIN), tmp_path_factory.mktemp("demo"), progress=False).fit()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The text demo preset (byte encoder, shapes captions) trained for 2 + 2 steps."""
    from mdm.config import load_preset
    from mdm.train.trainer import Trainer

    return Trainer(load_preset("demo-text", TINY_TRAIN), tmp_path_factory.mktemp("text"), progress=False).fit()


@pytest.fixture
def oracle_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 2-step 32 px oracle saved where `--oracle` looks for the default one, so no test trains for a minute."""
    from mdm.eval.oracle import oracle_spec, train_oracle

    cache = tmp_path / "oracle-cache"
    monkeypatch.setenv(ORACLE_CACHE_ENV, str(cache))
    train_oracle(32, steps=2, progress=False, check_samples=8).save(cache / f"{oracle_spec(32).key()}.safetensors")
    return cache


def run_eval(*args: str) -> int:
    from mdm.cli import main

    return main(["eval", "--steps", "2", "--quiet", *args])


def test_eval_cli_per_level_fid_oracle_and_reference_round_trip(
    class_model: Path, inception_file: Path, oracle_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    common = ["--model", str(class_model), "--num", "14", "--batch-size", "5", "--inception", str(inception_file)]
    ref_file, first_json = tmp_path / "ref.npz", tmp_path / "first.json"
    assert run_eval(*common, "--data", "shapes", "--save-ref", str(ref_file), "--oracle", "--out", str(first_json)) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "oracle: accuracy" in printed and str(first_json) in printed
    first = json.loads(first_json.read_text())
    assert first["conditions"] == {"labels": [i % 12 for i in range(14)]}
    s = first["settings"]
    guidance = load_config(class_model / "config.yaml").train.sample_guidance  # the default without --guidance
    assert (s["num"], s["num_data"], s["steps"], s["guidance"], s["level_sizes"]) == (14, 14, 2, guidance, [32, 16])
    assert s["inception"] == str(inception_file) and len(s["inception_sha256"]) == 64 and s["world_size"] == 1
    top, low = first["levels"]
    assert (top["size"], low["size"], top["num_generated"], low["num_generated"]) == (32, 16, 14, 14)
    assert all(np.isfinite(lv[k]) and lv["fid"] > 0 for lv in (top, low) for k in ("fid", "kid", "kid_std"))
    assert top["psnr"] is None and np.isfinite(low["psnr"]) and low["psnr"] > 0  # projected: the levels agree
    o = first["oracle"]
    assert o["num_generated"] == 14 and 0 <= o["accuracy"] <= 1 and 0 <= o["real_accuracy"] <= 1
    assert o["accuracy"] * 14 == pytest.approx(round(o["accuracy"] * 14))
    per_class = o["per_class"]
    assert list(per_class["accuracy"]) == ShapesDataset(32, 1).class_names
    confusion = np.array(per_class["confusion"])
    assert confusion.shape == (12, 12) and confusion.sum() == 14 and (confusion.sum(1) == [2, 2] + [1] * 10).all()
    assert confusion.trace() == round(o["accuracy"] * 14) and "per requested class: red circle" in printed
    assert np.isfinite(o["fd"]) and np.isfinite(o["floor"]) and o["fd"] > 0 and o["floor"] > 0
    assert s["oracle"]["size"] == 32 and s["oracle"]["steps"] == 2  # the stand-in from the cache, not a new one
    assert any("not the standard Inception" in n for n in first["notes"])

    stats = Statistics.load(ref_file)
    assert stats.n == 14 and stats.mu.shape == (32,)
    second_json = tmp_path / "second.json"
    assert run_eval(*common, "--ref", str(ref_file), "--out", str(second_json)) == 0
    second = json.loads(second_json.read_text())
    assert second["levels"][0]["fid"] == pytest.approx(top["fid"], rel=1e-9, abs=1e-9)
    assert second["levels"][0]["kid"] is None and second["levels"][1]["fid"] is None
    assert second["levels"][1]["psnr"] == pytest.approx(low["psnr"], rel=1e-9)
    assert second["settings"]["reference"] == str(ref_file) and second["settings"]["reference_n"] == 14
    assert second["oracle"] is None and second["conditions"] == first["conditions"]


def test_eval_without_inception_skips_fid_only_when_another_metric_is_asked_for(
    class_model: Path, oracle_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    common = ["--model", str(class_model), "--num", "4", "--batch-size", "4", "--data", "shapes"]
    assert run_eval(*common, "--out", str(tmp_path / "x.json")) == 2
    err = capsys.readouterr().err
    assert "mdm eval: error: no Inception network given" in err and INCEPTION_URL in err
    assert run_eval(*common, "--oracle", "--out", str(tmp_path / "oracle.json")) == 0
    report = json.loads((tmp_path / "oracle.json").read_text())
    assert [lv["fid"] for lv in report["levels"]] == [None, None] and np.isfinite(report["levels"][1]["psnr"])
    assert report["settings"]["inception"] is None and "FID / KID skipped" in report["notes"][0]
    assert report["oracle"]["num_generated"] == 4
    apart_args = ["--oracle", "--no-level-projection", "--sampler", "ddim", "--eta", "0", "--guidance", "2"]
    apart_args += ["--guidance-interval", "-3", "4"]
    assert run_eval(*common, *apart_args, "--out", str(tmp_path / "apart.json")) == 0
    apart = json.loads((tmp_path / "apart.json").read_text())
    assert (report["settings"]["level_projection"], apart["settings"]["level_projection"]) == (True, False)
    chosen = [(r["settings"]["sampler"], r["settings"]["eta"]) for r in (report, apart)]
    assert chosen == [("renoise", 0.0), ("ddim", 0.0)], "the preset's sampler, then --sampler / --eta"
    assert report["settings"]["guidance_level_scales"] == [1.0, report["settings"]["guidance"]]
    assert apart["settings"]["guidance_level_scales"] == [2.0, 2.0], "unprojected levels are all guided"
    lo, hi = load_config(class_model / "config.yaml").diffusion.guidance_interval
    assert (lo, report["settings"]["guidance_interval"]) == (-math.inf, [None, hi]), "JSON: an open end is null"
    assert apart["settings"]["guidance_interval"] == [-3.0, 4.0]
    assert run_eval(*common, "--oracle", "--guidance-interval", "50", "60", "--out", str(tmp_path / "never.json")) == 0
    never = json.loads((tmp_path / "never.json").read_text())
    assert never["oracle"]["fd"] != report["oracle"]["fd"], "--guidance-interval reaches the sampler"
    assert report["levels"][1]["psnr"] > apart["levels"][1]["psnr"] + 10, "the preset's projected levels agree"
    ref = tmp_path / "ref.npz"
    Statistics(np.zeros(32), np.eye(32)).save(ref)
    assert run_eval("--model", str(class_model), "--num", "4", "--ref", str(ref), "--oracle") == 2
    assert "no Inception network given" in capsys.readouterr().err
    assert run_eval("--model", str(class_model), "--num", "4", "--ref", str(ref), "--save-ref", "x.npz") == 2
    assert "--save-ref) needs data images (--data)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_eval("--model", str(class_model), "--num", "4", "--ref", str(ref), "--data", "shapes")
    assert "not allowed with argument" in capsys.readouterr().err


def test_latents_depend_on_the_sample_index_not_the_batch() -> None:
    from mdm.eval import sample_latents

    whole = sample_latents(range(6), 3, [8, 4], 3)
    assert [tuple(level.shape) for level in whole] == [(6, 3, 8, 8), (6, 3, 4, 4)]
    head, tail = sample_latents(range(0, 4), 3, [8, 4], 3), sample_latents([4, 5], 3, [8, 4], 3)
    for level, a, b in zip(whole, head, tail, strict=True):
        torch.testing.assert_close(level, torch.cat([a, b]), rtol=0, atol=0)
    assert not torch.equal(whole[0][0], whole[0][1])
    assert not torch.equal(whole[0], sample_latents(range(6), 4, [8, 4], 3)[0])


def test_text_model_prompts_clip_score_and_oracle_labels(
    text_model: Path, clip_dir: Path, oracle_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mdm.eval import evaluate_model
    from mdm.eval.oracle import REAL_SEED

    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    report = evaluate_model(
        text_model, 5, data="shapes", clip=clip_dir, oracle=True, batch_size=3, steps=2, guidance=1.0, progress=False
    )
    captions = ShapesDataset(32, 5, seed=REAL_SEED).captions()
    assert report.conditions == {"prompts": captions} and "labels" not in report.conditions
    assert report.clip_score is not None and 0 <= report.clip_score <= 100
    assert report.oracle is not None and report.oracle.accuracy is not None
    assert report.oracle.accuracy * 5 == pytest.approx(round(report.oracle.accuracy * 5))
    assert report.settings["clip"] == str(clip_dir) and report.settings["guidance"] == 1.0
    table = report.table()
    assert "CLIP score" in table and "oracle" in table and "FID / KID skipped" in table
    with pytest.raises(ValueError, match="not both"):
        evaluate_model(text_model, 5, data="shapes", reference="x.npz")


def _eval_worker(rank: int, world: int, port: int, root: str, model: str) -> None:
    import torch.distributed as dist

    from mdm.eval import evaluate_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    report = evaluate_model(
        model, 7, data="shapes", inception=Path(root) / "inception.pt", batch_size=2, steps=2, progress=False
    )
    (Path(root) / f"eval{rank}.json").write_text(json.dumps(report.to_dict()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_evaluate_their_shares_like_one_process(
    class_model: Path, inception_file: Path, tmp_path: Path
) -> None:
    from mdm.eval import evaluate_model

    mp.spawn(_eval_worker, args=(2, _free_port(), str(tmp_path), str(class_model)), nprocs=2)
    alone = evaluate_model(
        class_model, 7, data="shapes", inception=inception_file, batch_size=3, steps=2, progress=False
    )
    for rank in range(2):
        got = json.loads((tmp_path / f"eval{rank}.json").read_text())
        assert got["settings"]["world_size"] == 2 and got["conditions"] == alone.conditions
        for level, single in zip(got["levels"], alone.levels, strict=True):
            assert level["num_generated"] == 7
            assert level["fid"] == pytest.approx(single.fid, rel=1e-4)
            assert level["kid"] == pytest.approx(single.kid, rel=1e-3, abs=1e-6)
            assert level["psnr"] == (None if single.psnr is None else pytest.approx(single.psnr, rel=1e-4))


def test_eval_against_an_image_folder_spreads_over_its_sorted_classes(
    class_model: Path, inception_file: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from mdm.eval import evaluate_model
    from mdm.eval.evaluate import _spread

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "folder" / name / f"{i}.png")
    folder = str(tmp_path / "folder")
    report = evaluate_model(class_model, 4, data=folder, inception=inception_file, steps=2, progress=False)
    assert report.settings["num_data"] == 4 and report.settings["data"] == folder
    assert [_spread(i, 4, 6) for i in range(6)] == [0, 1, 3, 4, 0, 1]  # both class folders; repeats past n
    assert all(np.isfinite(lv.fid) and lv.fid > 0 and np.isfinite(lv.kid) for lv in report.levels)
    with pytest.raises(FileNotFoundError, match="absent"):
        evaluate_model(class_model, 4, data=str(tmp_path / "absent"), inception=inception_file, steps=2)
