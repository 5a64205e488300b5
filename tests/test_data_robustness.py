"""Hostile and malformed data: every problem a user's files can cause is a DataError (or an unusable sample) that
names the file, nothing outside the data folder is read or packed, labels are validated, odd image modes decode."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdm.data.check import check_data
from mdm.data.folder import BadSample, DataError, FolderDataset, ReadOptions, load_image
from mdm.data.shards import ShardDataset, pack

SECRET = b"root:$6$s3cr3t-hash:19000:0:99999:7:::\n"


def png(path: Path, rgb: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (16, 16)) -> Path:
    """A small RGB PNG at `path` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def png_bytes(rgb: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(out, format="PNG")
    return out.getvalue()


def metadata(root: Path, *rows: object, raw: bytes = b"") -> None:
    """Write `root/metadata.jsonl` from rows (dicts are dumped as JSON, strings written as they are)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) if not isinstance(r, str) else r for r in rows]
    (root / "metadata.jsonl").write_bytes(raw or "\n".join(lines).encode())


def tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


Build = Callable[[Path, Path], None]  # (the data folder to fill, a folder outside it holding secrets)


def lines(*rows: object) -> Build:
    """A builder writing `rows` as the folder's metadata.jsonl."""
    return lambda d, _: metadata(d, *rows)


def with_classes(text: bytes, *rows: object) -> Build:
    """A builder writing `rows` as metadata.jsonl and `text` as classes.txt."""

    def build(d: Path, _: Path) -> None:
        metadata(d, *rows)
        (d / "classes.txt").write_bytes(text)

    return build


def link(name: str, target: str, *images: str) -> Build:
    """A builder making `name` a symlink to `target` in the outside folder, beside the PNGs `images`."""

    def build(d: Path, out: Path) -> None:
        for image in images:
            png(d / image)
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).symlink_to(out / target)

    return build


def hidden_and_empty(d: Path, _: Path) -> None:
    png(d / ".ipynb_checkpoints/a.png")
    png(d / ".b.png")
    (d / "empty").mkdir()


def jsonl_linked_outside(d: Path, out: Path) -> None:
    (d / "metadata.jsonl").symlink_to(out / "shadow")


def jsonl_not_utf8(d: Path, _: Path) -> None:
    metadata(d, raw=b'{"file_name": "a.png"}\n{"file_name": "\xe9.png"}\n')


A = {"file_name": "a.png"}
# (description, how to build the bad folder, the message (a regex), the file it must name)
STARTUP_ERRORS: list[tuple[str, Build, str, str]] = [
    ("invalid JSON", lines(A, "{'file_name': 'b.png'}"), r"metadata\.jsonl:2: .*invalid JSON", "metadata.jsonl"),
    ("a JSON list", lines(["a.png"]), r"metadata\.jsonl:1: expected a JSON object", "metadata.jsonl"),
    ("a JSON string", lines('"a.png"'), r":1: expected a JSON object .*got str", "metadata.jsonl"),
    ("no file_name", lines({"text": "x"}), r":1: expected a JSON object .*got no 'file_name'", "metadata.jsonl"),
    ("file_name null", lines({"file_name": None}), r":1: 'file_name' must be a path .* got None", "metadata.jsonl"),
    ("file_name a number", lines(A, {"file_name": 7}), r":2: 'file_name' must be a path .* got 7", "metadata.jsonl"),
    ("file_name with NUL", lines({"file_name": "a\0.png"}), r":1: 'file_name' must be a path", "metadata.jsonl"),
    ("text a number", lines({**A, "text": 5}), r":1: 'text' must be a string, got 5", "metadata.jsonl"),
    ("text a list", lines({**A, "text": ["a"]}), r":1: 'text' must be a string", "metadata.jsonl"),
    (
        "label 0.7",
        lines({**A, "label": 0.7}),
        r":1: 'label' must be a class name or an integer >= 0, got 0\.7",
        "metadata",
    ),
    ("label true", lines({**A, "label": True}), r":1: 'label' must be .* got True", "metadata.jsonl"),
    ("label -1", lines({**A, "label": 0}, {**A, "label": -1}), r":2: 'label' must be .* got -1", "metadata.jsonl"),
    ("label blank", lines({**A, "label": " "}), r":1: 'label' must be", "metadata.jsonl"),
    ("label an object", lines({**A, "label": {"id": 1}}), r":1: 'label' must be", "metadata.jsonl"),
    (
        "names and integers mixed",
        lines({**A, "label": "cat"}, {**A, "label": 1}),
        r":2: label 1 but line 1 has the label 'cat'; use class names or integers, not both",
        "metadata.jsonl",
    ),
    (
        "an unlabelled line among labelled ones",
        lines({**A, "label": 1}, "", {**A, "text": "x"}),
        r":3: no 'label' but line 1 has one; label every line or none",
        "metadata.jsonl",
    ),
    (
        "an integer label beyond classes.txt",
        with_classes(b"x\ny\n", {**A, "label": 2}),
        r"metadata\.jsonl:1: label 2 is not one of the 2 classes of .*classes\.txt",
        "metadata.jsonl",
    ),
    (
        "a class name not in classes.txt",
        with_classes(b"x\n", {**A, "label": "cow"}),
        r":1: label 'cow' is not one of the 1 classes",
        "metadata.jsonl",
    ),
    (
        "a repeated name in classes.txt",
        with_classes(b"x\ny\nx\n", {**A, "label": 0}),
        r"classes\.txt:3: class 'x' is also on line 1",
        "classes.txt",
    ),
    (
        "classes.txt not UTF-8",
        with_classes(b"caf\xe9\n", {**A, "label": 0}),
        r"classes\.txt:1: not UTF-8",
        "classes.txt",
    ),
    ("metadata.jsonl not UTF-8", jsonl_not_utf8, r"metadata\.jsonl:2: not UTF-8 text", "metadata.jsonl"),
    ("metadata.jsonl linked outside", jsonl_linked_outside, r"jsonl: outside the data folder", "metadata.jsonl"),
    (
        "a class folder symlinked outside",
        link("dog", ".", "cat/a.png"),
        r"dog: a symlink to the folder .*outside, outside the data folder",
        "d/dog",
    ),
    ("a nested folder symlinked outside", link("cat/more", ".", "cat/a.png"), r"a symlink to the folder", "cat/more"),
    ("only hidden and empty folders", hidden_and_empty, r"no images found in", "/d"),
]


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """An empty data folder `d`, and beside it a folder of secrets (a valid PNG, so that only the containment rule
    keeps it out, and a text file) that must never be read through it."""
    out = png(tmp_path / "outside/secret.png", (1, 2, 3)).parent
    with open(out / "secret.png", "ab") as f:
        f.write(SECRET)  # PIL ignores trailing bytes; the marker shows whether the file was copied
    (out / "shadow").write_bytes(SECRET)
    (tmp_path / "d").mkdir()
    return tmp_path / "d", out


@pytest.mark.parametrize(("what", "build", "message", "names"), STARTUP_ERRORS, ids=[c[0] for c in STARTUP_ERRORS])
def test_malformed_folders_are_refused_naming_the_file(
    folders: tuple[Path, Path], what: str, build: Build, message: str, names: str
) -> None:
    root, out = folders
    build(root, out)
    packed = root.parent / "packed"
    for open_it in (
        lambda: FolderDataset(root, ReadOptions(8)),
        lambda: check_data(root, progress=False),
        lambda: pack(root, packed),
    ):
        with pytest.raises(DataError, match=message) as caught:
            open_it()
        assert names in str(caught.value), what
    assert not packed.exists()


def flat_link(d: Path, out: Path) -> None:
    png(d / "a.png")
    (d / "b.png").symlink_to(out / "secret.png")


def class_link(d: Path, out: Path) -> None:
    png(d / "a/x.png")
    png(d / "b/z.png")
    (d / "b/y.png").symlink_to(out / "shadow")


def rows_naming(file_name: Callable[[Path], str]) -> Build:
    """A builder listing a.png and `file_name(outside folder)` in metadata.jsonl."""

    def build(d: Path, out: Path) -> None:
        png(d / "a.png")
        metadata(d, A, {"file_name": file_name(out)})

    return build


def through_linked_folder(d: Path, out: Path) -> None:
    (d / "link").symlink_to(out)
    rows_naming(lambda _: "link/secret.png")(d, out)


def sidecar(make: Callable[[Path, Path], object]) -> Build:
    """A builder of a.png and b.png, `make(b.txt, outside folder)` writing b's caption file."""

    def build(d: Path, out: Path) -> None:
        png(d / "a.png")
        png(d / "b.png")
        make(d / "b.txt", out)

    return build


def folder_named_png(d: Path, out: Path) -> None:
    (d / "dir.png").mkdir()
    rows_naming(lambda _: "dir.png")(d, out)


def beside(name: str, data: Callable[[], bytes]) -> Build:
    """A builder of a.png and the file `name` holding `data()`."""

    def build(d: Path, _: Path) -> None:
        png(d / "a.png")
        (d / name).write_bytes(data())

    return build


def broken_link(d: Path, _: Path) -> None:
    png(d / "a.png")
    (d / "b.png").symlink_to(d / "gone.png")


# (description, how to build a folder of one usable and one unusable sample, the message (a regex), the file named)
BAD_SAMPLES: list[tuple[str, Build, str, str]] = [
    ("a file symlinked outside", flat_link, r"b\.png: outside the data folder .*secret\.png\); not read", "b.png"),
    ("a file in a class folder symlinked outside", class_link, r"y\.png: outside the data folder", "b/y.png"),
    ("a ../ file_name", rows_naming(lambda _: "../outside/secret.png"), r"outside the data folder", "../outside"),
    ("an absolute file_name", rows_naming(lambda o: str(o / "secret.png")), r"png: outside the data", "secret.png"),
    ("a file_name through a link", through_linked_folder, r"secret\.png: outside the data", "link/secret.png"),
    (
        "a sidecar linked outside",
        sidecar(lambda txt, out: txt.symlink_to(out / "shadow")),
        r"b\.txt: outside the data folder",
        "b.txt",
    ),
    (
        "a sidecar not UTF-8",
        sidecar(lambda txt, _: txt.write_bytes(b"un caf\xe9")),
        r"b\.txt:1: not UTF-8 text",
        "b.txt",
    ),
    ("a broken symlink", broken_link, r"b\.png: listed but missing", "b.png"),
    ("a folder named x.png", folder_named_png, r"dir\.png: not a regular file", "dir.png"),
    ("a name too long", rows_naming(lambda _: "n" * 300 + ".png"), r"n\.png: listed but missing", "nnnn.png"),
    ("a text file named .png", beside("b.png", lambda: SECRET), r"b\.png: not a readable image", "b.png"),
]


@pytest.mark.parametrize(("what", "build", "message", "names"), BAD_SAMPLES, ids=[c[0] for c in BAD_SAMPLES])
def test_unusable_samples_are_counted_named_and_never_packed(
    folders: tuple[Path, Path], what: str, build: Build, message: str, names: str
) -> None:
    root, out = folders
    build(root, out)
    ds = FolderDataset(root, ReadOptions(8))
    problems = []
    for i in range(len(ds)):
        try:
            ds.load(i)
        except BadSample as e:
            problems.append((i, str(e)))
    assert len(problems) == 1 and re.search(message, problems[0][1]) and names in problems[0][1], (what, problems)
    assert ds[problems[0][0]]["skipped"] == 1, "replaced by the next usable sample"
    assert check_data(root, progress=False).problems == [problems[0][1]]
    shards = pack(root, root.parent / "packed")
    packed = b"".join(p.read_bytes() for p in shards)
    assert SECRET not in packed and png_bytes((1, 2, 3)) not in packed
    back = ShardDataset(root.parent / "packed", ReadOptions(8))
    assert len(back) == len(ds) - 1 and not check_data(root.parent / "packed", progress=False).problems


def test_a_symlink_to_a_file_outside_is_not_packed(
    tmp_path: Path, folders: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    photos, secrets = folders
    png(photos / "a/x.png", (200, 0, 0))
    png(photos / "b/y.png", (0, 200, 0))
    (photos / "b/x.png").symlink_to(secrets / "shadow")  # ln -s /etc/shadow photos/b/x.png
    (photos / "b/z.png").symlink_to(secrets / "secret.png")
    shards = pack(photos, tmp_path / "shards", shard_size=1)
    assert len(shards) == 2
    for shard in shards:
        assert SECRET not in shard.read_bytes()
        with tarfile.open(shard) as t:
            assert all(SECRET not in t.extractfile(m).read() for m in t.getmembers())
    assert sum("outside the data folder" in r.getMessage() for r in caplog.records) == 2
    assert (tmp_path / "shards/classes.txt").read_text() == "a\nb\n"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/x.png").symlink_to(secrets / "secret.png")
    with pytest.raises(DataError, match=r"bad: none of its 1 images can be packed"):
        pack(tmp_path / "bad", tmp_path / "bad-shards")


def test_pack_removes_the_stale_shards_of_a_larger_run(tmp_path: Path) -> None:
    for i in range(5):
        png(tmp_path / "src" / f"{i}.png", (i, 0, 0))
    assert len(pack(tmp_path / "src", tmp_path / "out", shard_size=2)) == 3
    for i in range(3):
        (tmp_path / "src" / f"{i}.png").unlink()
    (tmp_path / "out/notes.tar").write_bytes(b"")  # not one of ours: kept
    assert [p.name for p in pack(tmp_path / "src", tmp_path / "out", shard_size=2)] == ["shard-000000.tar"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.tar", "shard-000000.tar"], "no temp files"


def test_followed_and_skipped_folders_agree_between_check_and_training(tmp_path: Path) -> None:
    root = tmp_path / "d"
    png(root / "cat/1.png")
    png(root / ".store/dog/2.png")
    (root / "dog").symlink_to(root / ".store/dog")  # a symlinked class folder inside the root: followed
    png(root / ".ipynb_checkpoints/3.png")
    png(root / "cat/.ipynb_checkpoints/4.png")
    png(root / "cat/._1.png")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes/readme.md").write_text("no images")
    (root / "cat/loop").symlink_to(root / "cat")  # a loop: not followed twice
    (root / "cat/all").symlink_to(root)
    ds = FolderDataset(root, ReadOptions(8))
    assert ds.class_names == ["cat", "dog"] and len(ds) == 2 and [ds[i]["label"] for i in range(2)] == [0, 1]
    (tmp_path / "alias").symlink_to(root)  # a data path that is itself a symlink: its target is the data folder
    assert [it.path.name for it in FolderDataset(tmp_path / "alias", ReadOptions(8)).items] == ["1.png", "2.png"]
    report = check_data(root, progress=False)
    assert report.class_names == ds.class_names and "classes (2): cat: 1, dog: 1" in report.lines()
    (root / "bird").mkdir()
    png(root / "bird/bad.png").write_bytes(b"junk")
    report = check_data(root, progress=False)
    ds = FolderDataset(root, ReadOptions(8))
    assert ds.num_classes == 3 and "classes (3): bird: 1, cat: 1, dog: 1" in report.lines()


@pytest.mark.parametrize(
    ("labels", "classes_txt", "names", "expected"),
    [
        ([2, 0, 2], None, ["0", "1", "2"], [2, 0, 2]),
        ([0, 1, 1], "cat\ndog\nbird\n", ["cat", "dog", "bird"], [0, 1, 1]),
        (["dog", "cat", "dog"], None, ["cat", "dog"], [1, 0, 1]),
        (["dog", "cat", "dog"], "dog\ncat\n", ["dog", "cat"], [0, 1, 0]),
        ([None, None, None], "ignored\n", [], [-1, -1, -1]),
    ],
)
def test_metadata_labels_give_the_class_count(
    tmp_path: Path, labels: list, classes_txt: str | None, names: list[str], expected: list[int]
) -> None:
    rows = []
    for i, label in enumerate(labels):
        png(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"image {i}", **({"label": label} if label is not None else {})})
    metadata(tmp_path, *rows)
    if classes_txt is not None:
        (tmp_path / "classes.txt").write_text(classes_txt)
    ds = FolderDataset(tmp_path, ReadOptions(8))
    assert ds.class_names == names and ds.num_classes == len(names)
    assert [ds[i]["label"] for i in range(3)] == expected
    report = check_data(tmp_path, progress=False)
    assert report.class_names == names and not report.problems
    back = ShardDataset(pack(tmp_path, tmp_path / "out")[0], ReadOptions(8))
    assert back.class_names == names and [back[i]["label"] for i in range(3)] == expected


def test_packed_members_are_named_by_format_when_the_file_name_is_not(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (1, 1, 1)).save(tmp_path / "no-suffix", format="PNG")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "photo.jfif", format="JPEG")
    metadata(tmp_path, {"file_name": "no-suffix"}, {"file_name": "photo.jfif"})
    with tarfile.open(pack(tmp_path, tmp_path / "out")[0]) as t:
        assert t.getnames() == ["000000000.png", "000000001.jpg"]
    assert len(ShardDataset(tmp_path / "out", ReadOptions(8))) == 2


def test_byte_order_marks_are_accepted(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    metadata(tmp_path, raw=b'\xef\xbb\xbf{"file_name": "a.png", "text": "caf\xc3\xa9"}\n')
    assert FolderDataset(tmp_path, ReadOptions(8))[0]["caption"] == "café"
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfa caption\n")
    assert FolderDataset(tmp_path, ReadOptions(8)).captions() == ["a caption"]


# (description, members of a labelled WebDataset shard's second sample, fragment naming the member)
SHARD_SAMPLES: list[tuple[str, dict[str, bytes], str]] = [
    ("no .cls among labelled samples", {"1.png": png_bytes()}, r"x\.tar:1\.png: no \.cls label"),
    ("a negative .cls", {"1.png": png_bytes(), "1.cls": b"-1"}, r"x\.tar:1\.cls: expected a class index .* '-1'"),
    ("a fractional .cls", {"1.png": png_bytes(), "1.cls": b"0.7"}, r"1\.cls: expected a class index .* '0\.7'"),
    ("a named .cls", {"1.png": png_bytes(), "1.cls": b"cat"}, r"1\.cls: expected a class index"),
    ("an empty .cls", {"1.png": png_bytes(), "1.cls": b""}, r"1\.cls: expected a class index"),
    ("a non-UTF-8 .txt", {"1.png": png_bytes(), "1.cls": b"0", "1.txt": b"caf\xe9"}, r"x\.tar:1\.txt:1: not UTF-8"),
    ("invalid .json", {"1.png": png_bytes(), "1.cls": b"0", "1.json": b"{caption"}, r"x\.tar:1\.json: invalid JSON"),
    ("a .json list", {"1.png": png_bytes(), "1.cls": b"0", "1.json": b"[1]"}, r"1\.json: expected a JSON object"),
    (
        "a number as the .json caption",
        {"1.png": png_bytes(), "1.cls": b"0", "1.json": b'{"caption": 5}'},
        r"1\.json: 'caption' / 'text' must be a string, got 5",
    ),
]


@pytest.mark.parametrize(("what", "members", "message"), SHARD_SAMPLES, ids=[c[0] for c in SHARD_SAMPLES])
def test_bad_shard_samples_are_counted_and_named(tmp_path: Path, what: str, members: dict, message: str) -> None:
    path = tar(tmp_path / "s/x.tar", {"0.png": png_bytes(), "0.cls": b"1", "0.txt": b"good", **members})
    ds = ShardDataset(path, ReadOptions(8))
    assert ds.class_names == ["0", "1"] and len(ds) == 2, what
    with pytest.raises(BadSample, match=message):
        ds.load(1)
    assert ds[1]["skipped"] == 1 and ds[1]["label"] == 1
    assert ds.captions()[0] == "good"
    report = check_data(tmp_path / "s", progress=False)
    assert (
        len(report.problems) == 1 and "x.tar:1." in report.problems[0] and "classes (2): 0: 0, 1: 1" in report.lines()
    )


def test_shard_folders_and_class_lists_are_checked(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    secrets = folders[1]
    tar(secrets / "theirs.tar", {"0.png": png_bytes()})
    tar(tmp_path / "s/a.tar", {"0.png": png_bytes(), "0.cls": b"0"})
    tar(tmp_path / "s/._a.tar", {"junk": b"x"})  # hidden (an AppleDouble file): skipped
    assert len(ShardDataset(tmp_path / "s", ReadOptions(8))) == 1
    (tmp_path / "s/b.tar").symlink_to(secrets / "theirs.tar")
    with pytest.raises(DataError, match=r"b\.tar: a symlink to .*theirs\.tar, outside the shard folder"):
        ShardDataset(tmp_path / "s", ReadOptions(8))
    assert len(ShardDataset(tmp_path / "s/b.tar", ReadOptions(8))) == 1, "a shard the user names is read"
    (tmp_path / "s/b.tar").unlink()
    for text, message in [
        (b"cat\n\ndog\n", r"classes\.txt:2: empty line"),
        (b"cat\ncat\n", r"classes\.txt:2: class 'cat' is also on line 1"),
        (b"\xff\xfe", r"classes\.txt:1: not UTF-8 text"),
    ]:
        (tmp_path / "s/classes.txt").write_bytes(text)
        with pytest.raises(DataError, match=message):
            check_data(tmp_path / "s", progress=False)
    (tmp_path / "s/classes.txt").write_bytes(b"\xef\xbb\xbfcat\n")
    assert ShardDataset(tmp_path / "s", ReadOptions(8)).class_names == ["cat"]


def _gray(arr: np.ndarray) -> np.ndarray:
    """The 8-bit gray levels load_image gives a one-channel image saved as TIFF from `arr`."""
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="TIFF")
    return np.asarray(load_image("x.tif", 1, 1 << 20, out.getvalue()))[..., 0]


@pytest.mark.parametrize(
    ("what", "values", "dtype", "expected"),
    [
        ("float in [0, 1]", [0.0, 0.25, 0.5, 1.0], np.float32, [0, 64, 128, 255]),
        ("float in [0, 0.5]", [0.0, 0.5], np.float32, [0, 128]),
        ("float in [0, 255]: by its range", [0.0, 51.0, 255.0], np.float32, [0, 51, 255]),
        ("float in [-1, 1]: by its range", [-1.0, 0.0, 1.0], np.float32, [0, 128, 255]),
        ("int32 in 0..255", [0, 100, 255], np.int32, [0, 100, 255]),
        ("int32 in 0..65535: 16-bit", [0, 32768, 65535], np.int32, [0, 128, 255]),
        ("signed int32: by its range", [-1000, 0, 1000], np.int32, [0, 128, 255]),
        ("int32 beyond 16 bits: by its range", [0, 50000, 100000], np.int32, [0, 128, 255]),
        ("uint16: 16-bit", [0, 257, 65535], np.uint16, [0, 1, 255]),
    ],
)
def test_wide_and_float_grayscale_maps_to_8_bits(what: str, values: list, dtype: type, expected: list[int]) -> None:
    arr = np.array(values, dtype=dtype).reshape(1, -1).repeat(2, axis=0)
    assert _gray(arr)[0].tolist() == expected, what


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_images_are_unusable(bad: float) -> None:
    with pytest.raises(BadSample, match=r"x\.tif: not a readable image .*NaN or infinite"):
        _gray(np.array([[0.0, bad]], dtype=np.float32))


def test_nonsense_arguments_are_refused(tmp_path: Path) -> None:
    png(tmp_path / "d/a.png")
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: ReadOptions(0), r"image_size: expected an integer >= 1, got 0"),
        (lambda: ReadOptions(8, min_size=-1), r"data\.min_size: expected an integer >= 0, got -1"),
        (lambda: ReadOptions(8, max_pixels=0), r"data\.max_pixels: expected an integer >= 1, got 0"),
        (lambda: ReadOptions(8, min_size=1.5), r"data\.min_size: .* got 1\.5"),
        (lambda: check_data(tmp_path / "d", min_size=-1, progress=False), r"^min_size: expected an integer >= 0"),
        (lambda: check_data(tmp_path / "d", max_pixels=0, progress=False), r"^max_pixels: expected an integer >= 1"),
        (lambda: pack(tmp_path / "d", tmp_path / "o", shard_size=0), r"^shard_size: expected an integer >= 1, got 0"),
        (lambda: pack(tmp_path / "d", tmp_path / "o", shard_size=-3), r"^shard_size: .* got -3"),
        (lambda: pack(tmp_path / "d", tmp_path / "o", shard_size=True), r"^shard_size: .* got True"),
        (lambda: pack(tmp_path / "d", tmp_path / "o", shard_size=2.5), r"^shard_size: .* got 2\.5"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert not (tmp_path / "o").exists(), "nothing is written before the arguments are checked"
