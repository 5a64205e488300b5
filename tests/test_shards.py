"""Tar shards (WebDataset and ml-mdm TSV layouts): brace patterns, packing, reading back, bad members, data check."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mdm.cli import main
from mdm.config import PhaseConfig
from mdm.data import shards as shards_module
from mdm.data.check import check_data
from mdm.data.folder import BadSample, FolderDataset, ReadOptions
from mdm.data.shards import ShardDataset, expand_braces, pack, shard_paths
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
    assert (tmp_path / "shards/classes.txt").read_text() == "a\nb\n"
    assert shards.class_names == folder.class_names == ["a", "b"]
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


def _png(rgb: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="PNG")
    return out.getvalue()


def _tar(path: Path, members: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members.items():
            _member(tar, name, data)


def test_classes_txt_names_labels_and_is_checked(tmp_path: Path) -> None:
    for i, name in enumerate(["cat", "dog", "cat"]):
        solid(tmp_path / "src" / name / f"{i}.png", (16, 16), (80 * i, 0, 0))
    pack(tmp_path / "src", tmp_path / "out")
    ds = ShardDataset(str(tmp_path / "out"), ReadOptions(16))
    assert ds.class_names == ["cat", "dog"] and [ds[i]["label"] for i in range(3)] == [0, 0, 1]
    (tmp_path / "out/classes.txt").write_text("cat\n")
    with pytest.raises(ValueError, match=r"classes\.txt: names 1 classes but the shards hold label 1"):
        ShardDataset(str(tmp_path / "out"), ReadOptions(16))
    (tmp_path / "out/classes.txt").unlink()
    assert ShardDataset(str(tmp_path / "out"), ReadOptions(16)).class_names == ["0", "1"]
    (tmp_path / "out/classes.txt").write_text("old\n")
    solid(tmp_path / "flat/x.png", (16, 16), (0, 0, 0))
    pack(tmp_path / "flat", tmp_path / "out")
    assert not (tmp_path / "out/classes.txt").exists(), "packing a folder without classes removes a stale classes.txt"


def test_fast_tar_index_matches_tarfile_for_every_format(tmp_path: Path) -> None:
    names = ["plain.png", "d" * 70 + "/" + "n" * 70 + ".png", "dir/x.cls"]
    for fmt, extra in [
        (tarfile.USTAR_FORMAT, []),
        (tarfile.GNU_FORMAT, ["l" * 120 + ".txt"]),
        (tarfile.PAX_FORMAT, ["ü.txt"]),
    ]:
        path = tmp_path / f"{fmt}.tar"
        _tar(path, {name: f"{name}!".encode() * (i + 1) for i, name in enumerate(names + extra)}, fmt)
        with tarfile.open(path) as tar:
            expected = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
        with open(path, "rb") as handle:
            if extra:  # GNU long names and pax headers are left to tarfile
                with pytest.raises(shards_module._NeedsTarfile):
                    list(shards_module._ustar_members(handle))
            else:
                assert [(n, *expected[n]) for n in names] == list(shards_module._ustar_members(handle))
        members, contents = shards_module._scan(path, read=(".cls",))
        assert members == expected and list(members) == names + extra
        assert contents == {"dir/x.cls": b"dir/x.cls!" * 3}


def _ml_mdm_layout(root: Path) -> Path:
    """index/index.tsv -> data/part-0.tsv and data/sub/part-1.tsv -> data/tars/{a,b}.tar (and a missing c.tar)."""
    _tar(root / "data/tars/a.tar", {"img/0.png": _png((200, 0, 0)), "img/1.png": _png((0, 200, 0))})
    _tar(root / "data/tars/b.tar", {"2.png": _png((0, 0, 200), (24, 20))})
    (root / "data/part-0.tsv").write_text(
        "tar\tfile\tcaption\ttext_tar\ttext_file\n"
        "tars/a.tar\timg/1.png\ta green square\t\t\n"
        "tars/a.tar\timg/9.png\tnot in the tar\t\t\n"
        "tars/a.tar\timg/0.png\ta red square\t\t\n"
    )
    (root / "data/sub").mkdir()
    (root / "data/sub/part-1.tsv").write_text(
        'caption\ttar\tfile\n"a ""blue"" square"\t../tars/b.tar\t2.png\nlost\t../tars/c.tar\t3.png\n'
    )
    (root / "index").mkdir()
    (root / "index/index.tsv").write_text("filename\n../data/part-0.tsv\n../data/sub/part-1.tsv\n")
    return root / "index/index.tsv"


def test_ml_mdm_index_and_shard_tsvs(tmp_path: Path, monkeypatch) -> None:
    index = _ml_mdm_layout(tmp_path)
    scanned = []
    scan = shards_module._scan
    monkeypatch.setattr(shards_module, "_scan", lambda tar, read=(): scanned.append(tar.name) or scan(tar, read))
    ds = ShardDataset(str(index), ReadOptions(16))
    assert scanned == ["a.tar", "b.tar", "c.tar"], "each tar is indexed once"
    assert ds.layout == "ml-mdm index TSV (2 shard TSVs, 3 tars)" and len(ds) == 5 and ds.num_classes == 0
    assert [ds.describe(i)[1:] for i in range(5)] == [
        ("a green square", -1),
        ("not in the tar", -1),
        ("a red square", -1),
        ('a "blue" square', -1),
        ("lost", -1),
    ]
    assert ds.captions() == ["a green square", "not in the tar", "a red square", 'a "blue" square', "lost"]
    assert ds.describe(3)[0] == f"{tmp_path}/data/tars/b.tar:2.png"
    first = ds[0]
    assert first["skipped"] == 0 and first["caption"] == "a green square"
    torch.testing.assert_close(
        first["image"], torch.tensor([-1.0, 200 / 127.5 - 1, -1.0])[:, None, None].expand(3, 16, 16)
    )
    item = ds[1]
    assert item["skipped"] == 1 and item["caption"] == "a red square"
    assert ds[3]["caption"] == 'a "blue" square' and ds[3]["image"][2].min() > 0.5
    assert ds[4]["skipped"] == 1 and ds[4]["caption"] == "a green square", "wraps around past the missing tar"
    with pytest.raises(BadSample, match=r"part-0\.tsv:3: .*a\.tar has no member 'img/9\.png'"):
        ds.load(1)
    with pytest.raises(BadSample, match=r"part-1\.tsv:3: .*c\.tar: not a readable tar shard"):
        ds.load(4)
    one = ShardDataset(str(tmp_path / "data/sub/part-1.tsv"), ReadOptions(16))
    assert one.layout == "ml-mdm shard TSV (2 tars)" and [one.describe(i)[1] for i in range(2)] == [
        'a "blue" square',
        "lost",
    ]


def test_tsv_that_cannot_be_parsed_is_rejected_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("path\ttext\nx.tar\t0.png\n")
    with pytest.raises(
        ValueError, match=r"bad\.tsv: expected a header row with the column 'filename' .* tar, file, caption"
    ):
        ShardDataset(str(bad), ReadOptions(16))
    (tmp_path / "index.tsv").write_text("filename\nbad.tsv\n")
    with pytest.raises(ValueError, match=r"bad\.tsv: expected a header row with the columns tar, file, caption; found"):
        ShardDataset(str(tmp_path / "index.tsv"), ReadOptions(16))
    (tmp_path / "index.tsv").write_text("filename\nmissing.tsv\nbad.tsv\n")
    bad.write_text("tar\tfile\tcaption\nx.tar\t0.png\tok\nx.tar\n")
    with pytest.raises(FileNotFoundError, match=r"index\.tsv:2: shard TSV .*missing\.tsv does not exist"):
        ShardDataset(str(tmp_path / "index.tsv"), ReadOptions(16))
    with pytest.raises(ValueError, match=r"bad\.tsv:3: expected the tab-separated fields tar, file, caption"):
        ShardDataset(str(bad), ReadOptions(16))
    with pytest.raises(FileNotFoundError, match=r"data\.path: .*nope\.tsv does not exist"):
        ShardDataset(str(tmp_path / "nope.tsv"), ReadOptions(16))


def test_data_check_reads_shards_and_tsvs(tmp_path: Path) -> None:
    solid(tmp_path / "src/cat/0.png", (300, 200), (0, 0, 0))
    (tmp_path / "src/cat/0.txt").write_text("a black cat")
    solid(tmp_path / "src/dog/1.png", (70, 90), (0, 0, 0))
    (tmp_path / "src/dog/2.png").write_bytes(b"")
    assert len(pack(tmp_path / "src", tmp_path / "shards", shard_size=1)) == 2, "the empty file is not packed"
    _tar(tmp_path / "shards/shard-000002.tar", {"2.png": b"", "2.txt": b"dog", "2.cls": b"1"})
    report = check_data(tmp_path / "shards", progress=False)
    lines = report.lines()
    assert lines[0] == f"{tmp_path / 'shards'}: WebDataset tar shards (3 shards)"
    assert "samples: 3, usable: 2, problems: 1" in lines and "classes (2): cat: 1, dog: 2" in lines
    assert "shorter side: <64: 0, 64-127: 1, 128-255: 1, 256-511: 0, 512-1023: 0, >=1024: 0" in lines
    assert "captions: 3 with text, words min 1 / median 1 / max 3" in lines
    assert report.problems == [f"{tmp_path / 'shards/shard-000002.tar'}:2.png: empty file"]
    pattern = str(tmp_path / "shards/shard-{000000..000002}.tar")
    assert check_data(pattern, progress=False).lines() == [f"{pattern}: WebDataset tar shards (3 shards)", *lines[1:]]
    report = check_data(_ml_mdm_layout(tmp_path / "mlmdm"), min_size=17, progress=False)
    assert report.layout == "ml-mdm index TSV (2 shard TSVs, 3 tars)" and report.samples == 5 and not report.classes
    assert report.words == [3, 4, 3, 3, 1] and report.sides == {0: 1}
    root = tmp_path / "mlmdm/data"
    assert report.problems == [
        f"{root}/tars/a.tar:img/1.png: 16x16 is smaller than data.min_size = 17",
        f"{root}/part-0.tsv:3: {root}/tars/a.tar has no member 'img/9.png'",
        f"{root}/tars/a.tar:img/0.png: 16x16 is smaller than data.min_size = 17",
        f"{root}/sub/part-1.tsv:3: {root}/tars/c.tar: not a readable tar shard ([Errno 2] No such file or directory: "
        f"'{root}/tars/c.tar'; expected an uncompressed tar)",
    ]
