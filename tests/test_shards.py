"""Tar shards (WebDataset layout): brace patterns, packing a folder, reading it back, bad members."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from mdm.cli import main
from mdm.config import PhaseConfig
from mdm.data.folder import FolderDataset, ReadOptions
from mdm.data.shards import ShardDataset, expand_braces, shard_paths
from mdm.train.trainer import Trainer
from tests.conftest import tiny_config
from tests.test_folder import solid


def test_brace_expansion_and_shard_lookup(tmp_path: Path) -> None:
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    for name in ("s-0.tar", "s-1.tar"):
        (tmp_path / name).write_bytes(b"")
    assert shard_paths(str(tmp_path)) == [tmp_path / "s-0.tar", tmp_path / "s-1.tar"]
    assert shard_paths(str(tmp_path / "s-{0..1}.tar")) == [tmp_path / "s-0.tar", tmp_path / "s-1.tar"]
    assert shard_paths(str(tmp_path / "s-*.tar")) == [tmp_path / "s-0.tar", tmp_path / "s-1.tar"]
    with pytest.raises(FileNotFoundError, match=r"s-2\.tar does not exist"):
        shard_paths(str(tmp_path / "s-{0..2}.tar"))


def test_pack_then_read_matches_the_folder(tmp_path: Path, capsys) -> None:
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90), (10, 20, 30)]
    for i, rgb in enumerate(colours):
        solid(tmp_path / "src" / ("a" if i % 2 else "b") / f"{i}.png", (24 + i, 20), rgb)
    (tmp_path / "src/b/0.txt").write_text("first caption")
    assert main(["data", "pack", str(tmp_path / "src"), str(tmp_path / "shards"), "--shard-size", "2"]) == 0
    assert "wrote 3 shard(s)" in capsys.readouterr().out
    folder = FolderDataset(tmp_path / "src", ReadOptions(16))
    shards = ShardDataset(str(tmp_path / "shards/shard-{000000..000002}.tar"), ReadOptions(16))
    assert len(shards) == len(folder) == 5 and shards.num_classes == 2
    for i in range(5):
        a, b = folder[i], shards[i]
        assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"] and a["caption"] == b["caption"]
    assert (
        shards[folder.items.index(next(x for x in folder.items if x[0].name == "0.png"))]["caption"] == "first caption"
    )


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_members_are_skipped_and_json_captions_read(tmp_path: Path) -> None:
    solid(tmp_path / "ok.png", (16, 16), (5, 6, 7))
    good = (tmp_path / "ok.png").read_bytes()
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        _member(tar, "0.png", good)
        _member(tar, "0.json", json.dumps({"caption": "from json"}).encode())
        _member(tar, "1.png", good[:30])
        _member(tar, "2.txt", b"caption without an image")
        _member(tar, "3.jpg", b"")
        _member(tar, "4.png", good)
        _member(tar, "4.txt", b"four")
    ds = ShardDataset(str(tmp_path / "x.tar"), ReadOptions(16))
    assert len(ds) == 5 and ds.num_classes == 0
    assert ds[0]["caption"] == "from json" and ds[0]["skipped"] == 0
    item = ds[1]
    assert item["skipped"] == 3 and item["caption"] == "four"
    with pytest.raises(ValueError, match="not a readable image"):
        ds.load(1)
    with pytest.raises(ValueError, match="no image member"):
        ds.load(2)
    with pytest.raises(ValueError, match="empty file"):
        ds.load(3)
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="not a readable tar shard"):
        ShardDataset(str(tmp_path / "broken.tar"), ReadOptions(16))


def test_trainer_reads_shards(tmp_path: Path) -> None:
    for i in range(6):
        solid(tmp_path / "src" / ("x" if i % 2 else "y") / f"{i}.png", (20, 20), (40 * i, 0, 0))
    main(["data", "pack", str(tmp_path / "src"), str(tmp_path / "shards"), "--shard-size", "4"])
    cfg = tiny_config(levels=2, text_dim=0, num_classes=2)
    cfg.data.dataset, cfg.data.path = "shards", str(tmp_path / "shards")
    t = cfg.train
    t.batch_size, t.warmup_steps, t.sample_count, t.sample_steps = 4, 1, 2, 2
    t.phases = [PhaseConfig(levels=1, steps=1), PhaseConfig(levels=2, steps=1)]
    final = Trainer(cfg.validate("test"), tmp_path / "run", progress=False).fit()
    assert (final / "model.safetensors").is_file()
