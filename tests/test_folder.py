"""Image folders: layouts, colour modes, EXIF orientation, crops, and unusable files skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdm.config import PhaseConfig
from mdm.data.check import check_data
from mdm.data.folder import BadSample, FolderDataset, ReadOptions
from mdm.train.checkpoint import TrainingError
from mdm.train.trainer import Trainer
from tests.conftest import tiny_config


def solid(path: Path, size: tuple[int, int], rgb: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).convert(mode).save(path)


def expected(rgb: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 127.5 - 1


def test_class_folders_modes_and_sidecars(tmp_path: Path) -> None:
    solid(tmp_path / "cats/a.png", (40, 30), (200, 10, 10))
    solid(tmp_path / "cats/b.jpg", (30, 30), (128, 128, 128), "L")
    (tmp_path / "cats/b.txt").write_text("a grey cat\n")
    Image.new("RGBA", (32, 32), (0, 0, 255, 0)).save(tmp_path / "cats/c.png")
    solid(tmp_path / "dogs/d.png", (16, 20), (10, 200, 10), "P")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "dogs/e.png")
    ds = FolderDataset(tmp_path, ReadOptions(16))
    assert ds.class_names == ["cats", "dogs"] and len(ds) == 5
    items = [ds[i] for i in range(5)]
    assert [it["label"] for it in items] == [0, 0, 0, 1, 1]
    assert [it["caption"] for it in items] == ["cats", "a grey cat", "cats", "dogs", "dogs"]
    assert all(it["image"].shape == (3, 16, 16) and it["skipped"] == 0 for it in items)
    torch.testing.assert_close(items[0]["image"], expected((200, 10, 10)).expand(3, 16, 16))
    assert (items[1]["image"] - expected((128, 128, 128))).abs().max() < 0.02
    torch.testing.assert_close(items[2]["image"], torch.ones(3, 16, 16))  # transparent -> white
    torch.testing.assert_close(items[4]["image"], torch.ones(3, 16, 16))  # 16-bit white


def test_exif_orientation_and_crops(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # blue left half, red right half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "x.jpg", exif=exif, quality=100)
    (tmp_path / "x.txt").write_text("rotated")
    ds = FolderDataset(tmp_path, ReadOptions(20))
    out = ds[0]["image"]
    assert out.shape == (3, 20, 20)
    top, bottom = out[:, :5].mean((1, 2)), out[:, -5:].mean((1, 2))
    assert top[2] > 0.5 > top[0] and bottom[0] > 0.5 > bottom[2], "after EXIF rotation blue is on top"
    rand = FolderDataset(tmp_path, ReadOptions(10, crop="random", flip=True, seed=3))
    assert torch.equal(
        rand[0]["image"], FolderDataset(tmp_path, ReadOptions(10, crop="random", flip=True, seed=3))[0]["image"]
    )


def test_metadata_jsonl_with_named_labels(tmp_path: Path) -> None:
    for name in ("1.png", "2.png", "3.png"):
        solid(tmp_path / "img" / name, (16, 16), (0, 0, 0))
    rows = [
        {"file_name": "img/1.png", "text": "one", "label": "b"},
        {"file_name": "img/2.png", "text": "two", "label": "a"},
        {"file_name": "img/3.png", "text": "three", "label": "b"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = FolderDataset(tmp_path, ReadOptions(8))
    assert ds.class_names == ["a", "b"]
    assert [(ds[i]["caption"], ds[i]["label"]) for i in range(3)] == [("one", 1), ("two", 0), ("three", 1)]
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: expected a JSON object with 'file_name'"):
        FolderDataset(tmp_path, ReadOptions(8))


def test_unusable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    solid(tmp_path / "0_good.png", (16, 16), (1, 2, 3))
    (tmp_path / "1_empty.png").write_bytes(b"")
    good = (tmp_path / "0_good.png").read_bytes()
    (tmp_path / "2_truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "3_text.png").write_text("not an image")
    solid(tmp_path / "4_small.png", (8, 8), (0, 0, 0))
    solid(tmp_path / "5_huge.png", (64, 64), (0, 0, 0))
    solid(tmp_path / "6_good.png", (16, 16), (9, 9, 9))
    ds = FolderDataset(tmp_path, ReadOptions(16, max_pixels=32 * 32))
    assert len(ds) == 7
    assert ds[0]["skipped"] == 0
    item = ds[1]
    assert item["skipped"] == 5 and torch.allclose(item["image"], expected((9, 9, 9)).expand(3, 16, 16))
    assert ds[6]["skipped"] == 0
    for i, why in [
        (1, "empty file"),
        (2, "not a readable image"),
        (3, "not a readable image"),
        (4, "smaller than"),
        (5, "exceeds data.max_pixels"),
    ]:
        with pytest.raises(ValueError, match=why):
            ds.load(i)
    captions = FolderDataset(tmp_path, ReadOptions(16, max_pixels=32 * 32, need_captions=True))
    with pytest.raises(ValueError, match="none of the 7 samples is usable"):
        captions[0]
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        FolderDataset(tmp_path / "nope", ReadOptions(16))


def test_a_listed_but_missing_file_is_an_unusable_sample(tmp_path: Path) -> None:
    solid(tmp_path / "a.png", (16, 16), (1, 2, 3))
    rows = [{"file_name": "gone.png", "text": "lost"}, {"file_name": "a.png", "text": "a dark square"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = FolderDataset(tmp_path, ReadOptions(16))
    item = ds[0]
    assert item["skipped"] == 1 and item["caption"] == "a dark square"
    assert ds.captions() == ["lost", "a dark square"]
    with pytest.raises(BadSample, match=r"gone\.png: listed but missing"):
        ds.load(0)
    report = check_data(tmp_path, progress=False)
    assert report.layout == "metadata.jsonl" and report.samples == 2 and report.words == [1, 3]
    assert report.problems == [f"{tmp_path / 'gone.png'}: listed but missing"]


def _folder_config(root: Path, bad_fraction: float):
    cfg = tiny_config(levels=2, text_dim=0, num_classes=2)
    cfg.data.dataset, cfg.data.path, cfg.data.max_bad_fraction = "folder", str(root), bad_fraction
    t = cfg.train
    t.batch_size, t.warmup_steps, t.sample_count, t.sample_steps, t.log_every = 4, 1, 2, 2, 1
    t.phases = [PhaseConfig(levels=1, steps=1), PhaseConfig(levels=2, steps=2)]
    return cfg.validate("test")


def test_trainer_reads_a_folder_and_stops_on_too_many_bad_files(tmp_path: Path) -> None:
    for i in range(6):
        solid(tmp_path / "data" / ("red" if i % 2 else "blue") / f"{i}.png", (20, 24), (200, 0, 0))
    (tmp_path / "data/red/broken.png").write_bytes(b"junk")
    final = Trainer(_folder_config(tmp_path / "data", 0.5), tmp_path / "run", progress=False).fit()
    assert final is not None and (final / "model.safetensors").is_file()
    records = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert records[-1]["bad_samples"] >= 1
    with pytest.raises(TrainingError, match=r"unusable \(more than data.max_bad_fraction = 0.0\)"):
        Trainer(_folder_config(tmp_path / "data", 0.0), tmp_path / "run2", progress=False).fit()


def test_data_check_reports_counts_resolutions_captions_and_problems(tmp_path: Path, capsys) -> None:
    from mdm.cli import main

    solid(tmp_path / "a/1.png", (300, 200), (0, 0, 0))
    (tmp_path / "a/1.txt").write_text("a black square on black")
    solid(tmp_path / "a/2.png", (70, 90), (0, 0, 0))
    solid(tmp_path / "b/3.png", (40, 40), (0, 0, 0))
    assert main(["data", "check", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "class folders (2 classes)" in out and "samples: 3, usable: 3, problems: 0" in out
    assert "classes (2): a: 2, b: 1" in out
    assert "shorter side: <64: 1, 64-127: 1, 128-255: 1, 256-511: 0" in out
    assert "captions: 3 with text, words min 1 / median 1 / max 5" in out
    (tmp_path / "b/4.png").write_bytes(b"")
    assert main(["data", "check", str(tmp_path), "--quiet", "--min-size", "64"]) == 1
    out = capsys.readouterr().out
    assert "samples: 4, usable: 2, problems: 2" in out
    assert "3.png: 40x40 is smaller than data.min_size = 64" in out and "4.png: empty file" in out


def test_bad_crop_rejected() -> None:
    with pytest.raises(ValueError, match=r"data\.crop must be 'center' or 'random'"):
        ReadOptions(16, crop="middle")
