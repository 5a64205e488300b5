"""Video data: the built-in moving shapes, clip files (GIF / APNG / MP4) and frame strips, user video folders with
their bad clips counted, the loader and the data config keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdm.cli import main
from mdm.config import ConfigError, DataConfig, MDMConfig
from mdm.data.check import check_data
from mdm.data.folder import DataError, ReadOptions
from mdm.data.loader import build_dataset, make_loader
from mdm.data.moving_shapes import MOTIONS, PHRASES, MovingShapesDataset
from mdm.data.shapes import EXTENT, ShapesDataset, render_frames
from mdm.data.video import VideoFolderDataset, natural_key
from mdm.io import to_pixels, to_uint8
from mdm.videos import frame_strip, read_clip, save_apng, save_gif, save_mp4

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------- moving shapes
def test_moving_shapes_deterministic_per_seed_and_index_in_range() -> None:
    a, b = MovingShapesDataset(16, 6, seed=3), MovingShapesDataset(16, 6, seed=3)
    for i in (0, 5, 999):
        assert torch.equal(a[i]["video"], b[i]["video"]) and a[i]["caption"] == b[i]["caption"]
        assert (a[i]["label"], a[i]["motion"]) == (b[i]["label"], b[i]["motion"])
    assert not torch.equal(a[0]["video"], a[1]["video"])
    assert not torch.equal(a[0]["video"], MovingShapesDataset(16, 6, seed=4)[0]["video"])
    for size, frames in ((8, 1), (17, 5), (32, 8)):
        clip = MovingShapesDataset(size, frames)[2]["video"]
        assert clip.shape == (3, frames, size, size) and clip.dtype == torch.float32
        assert clip.min() >= -1 and clip.max() <= 1


def test_labels_and_captions_name_shape_colour_motion_and_background() -> None:
    ds = MovingShapesDataset(16, 4, 60, shapes=["ring", "cross"], colors=["yellow", "red"], motions=["grow", "left"])
    assert ds.class_names == ShapesDataset(16, shapes=["ring", "cross"], colors=["yellow", "red"]).class_names
    assert ds.motion_names == ["grow", "left"] and ds.num_classes == 4
    seen = set()
    for i in range(40):
        clip, item = ds.scene(i), ds[i]
        s = clip.scene
        assert item["caption"] == f"a {s.color} {s.shape} {PHRASES[clip.motion]} on a {s.background} background"
        assert ds.class_names[item["label"]] == f"{s.color} {s.shape}"
        assert ds.motion_names[item["motion"]] == clip.motion
        seen.add(clip.motion)
    assert seen == {"grow", "left"}
    assert MovingShapesDataset(8, 2)[0]["caption"].count(" on a ") == 1
    assert PHRASES["still"] == "standing still" and PHRASES["shrink"] == "shrinking"
    prompts = ds.prompts(2)
    assert len(prompts) == 8 and all(ds.class_names[0].split()[1] in p for p in prompts[:2])
    assert [p.split(" on a ")[0].split()[-1] for p in ds.motion_prompts(1)] == ["growing", "left"]
    assert ds.captions()[:3] == [ds[i]["caption"] for i in range(3)]


def coverage(ds: MovingShapesDataset, index: int) -> np.ndarray:
    """Per frame and pixel, how much of the shape covers it (T, S, S): the clip unmixed against its background."""
    scene = ds.scene(index).scene
    clip = ds.render(index).double().numpy()
    far = np.array([-10.0])
    background = render_frames(scene, ds.image_size, far, far, np.array([0.1]))[:, 0].double().numpy()[:, None]
    colour = (np.asarray(scene.rgb) / 127.5 - 1)[:, None, None, None]
    return ((clip - background) * (colour - background)).sum(0) / ((colour - background) ** 2).sum(0)


@pytest.mark.parametrize(("size", "frames"), [(16, 8), (32, 4)])
def test_every_motion_is_clearly_visible_and_the_shape_stays_inside(size: int, frames: int) -> None:
    ds = MovingShapesDataset(size, frames, num_samples=400)
    checked = set()
    grid = np.arange(size) + 0.5
    for i in range(120):
        motion = ds.scene(i).motion
        cover = coverage(ds, i)
        area = cover.sum(axis=(1, 2))
        cx = (cover * grid[None, None, :]).sum(axis=(1, 2)) / area / size
        cy = (cover * grid[None, :, None]).sum(axis=(1, 2)) / area / size
        x, y, radius = ds.scene(i).trajectory(frames)
        for centre in (x, y):
            assert np.all(centre - EXTENT * radius >= 0) and np.all(centre + EXTENT * radius <= 1), f"clip {i} leaves"
        travel = {"left": cx[0] - cx[-1], "right": cx[-1] - cx[0], "up": cy[0] - cy[-1], "down": cy[-1] - cy[0]}
        if motion in travel:
            assert travel[motion] > 0.3, f"clip {i} moves {motion} only {travel[motion]:.2f} of the side"
            steps = np.diff(cx if motion in ("left", "right") else cy)
            assert np.all(np.sign(steps) == np.sign(steps[0])), "the shape moves steadily"
            assert np.ptp(area) < 0.03 * area.mean() and np.ptp(cx if motion in ("up", "down") else cy) < 0.02
        elif motion == "grow":
            assert area[-1] > 3 * area[0] and np.all(np.diff(area) > 0)
        elif motion == "shrink":
            assert area[0] > 3 * area[-1] and np.all(np.diff(area) < 0)
        else:
            clip = ds.render(i)
            assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(frames))
        checked.add(motion)
    assert checked == set(MOTIONS)


def test_keeping_every_kth_frame_gives_the_shorter_clip_and_one_frame_the_first() -> None:
    ds = MovingShapesDataset(16, 8)
    for i in range(12):
        clip = ds.render(i)
        assert torch.equal(clip[:, ::2], ds.render(i, num_frames=4))
        assert torch.equal(clip[:, :1], ds.render(i, num_frames=1))
        assert torch.equal(ds.render(i, 8)[:, ::4], ds.render(i, 8, num_frames=2))


def test_moving_shapes_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"moving_shapes dataset: motions must be distinct names .* got \['spin'\]"):
        MovingShapesDataset(16, 4, motions=["spin"])
    with pytest.raises(ValueError, match="moving_shapes dataset: shapes must be distinct names"):
        MovingShapesDataset(16, 4, shapes=["circle", "circle"])
    with pytest.raises(ValueError, match="need image_size >= 4 and num_frames >= 1, got 16, 0"):
        MovingShapesDataset(16, 0)
    with pytest.raises(ValueError, match="need num_samples >= 1"):
        MovingShapesDataset(16, 4, num_samples=0)
    with pytest.raises(IndexError, match="moving_shapes dataset has 3 clips, got index 3"):
        MovingShapesDataset(16, 4, num_samples=3)[3]


# ---------------------------------------------------------------------------------------------------------- files
def from_pixels(pixels: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> the (3, T, H, W) clip that writes exactly these pixels (p = x * 128 + 127)."""
    return (torch.from_numpy(pixels).permute(3, 0, 1, 2).double() - 127) / 128


def test_apng_round_trips_bitwise_and_keeps_repeated_frames(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 12, 20, 3), dtype=np.uint8)
    pixels[2] = pixels[1]  # a repeated frame is still a frame
    still = np.repeat(pixels[:1], 4, axis=0)
    for name, frames in (("noise.png", pixels), ("still.apng", still)):
        back = read_clip(save_apng(from_pixels(frames).float(), tmp_path / name, fps=5))
        assert back.shape == (3, len(frames), 12, 20)
        assert np.array_equal(to_pixels(back).permute(1, 2, 3, 0).numpy().astype(np.uint8), frames)
    assert not list(tmp_path.glob(".*")), "no temporary files are left"


def test_gif_round_trips_within_palette_tolerance_with_every_frame(tmp_path: Path) -> None:
    clip = MovingShapesDataset(24, 6)[2]["video"]
    clip = torch.cat([clip[:, :2], clip[:, 1:2], clip[:, 1:2], clip[:, 2:]], dim=1)  # frames 1-3 repeat
    back = read_clip(save_gif(clip, tmp_path / "a.gif", fps=8))
    assert back.shape == clip.shape
    error = (to_pixels(back) - to_pixels(clip)).abs()
    assert error.mean() < 2 and error.max() <= 24
    noise = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    back = read_clip(save_gif(noise, tmp_path / "noise.gif", fps=3))
    assert back.shape == noise.shape and (to_pixels(back) - to_pixels(noise)).abs().mean() < 24
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames < 8 and im.info["loop"] == 0  # the writer merged the repeats; read_clip restored them


def test_mp4_round_trip_or_a_clear_error_without_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = MovingShapesDataset(16, 5)[3]["video"]
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        pass
    else:
        back = read_clip(save_mp4(clip, tmp_path / "a.mp4", fps=5, min_side=32))
        assert back.shape == (3, 5, 32, 32)
        pooled = torch.nn.functional.avg_pool2d(back.transpose(0, 1), 2).transpose(0, 1)
        assert (to_pixels(pooled) - to_pixels(clip)).abs().mean() < 12
    monkeypatch.setitem(sys.modules, "imageio", None)
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    with pytest.raises(ImportError, match=r"needs the optional extra: pip install 'mdm\[video\]'"):
        save_mp4(clip, tmp_path / "b.mp4")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "x.mp4").write_bytes(b"\0" * 16)
    with pytest.raises(DataError, match=r"x\.mp4 .*mdm\[video\]"):
        VideoFolderDataset(tmp_path / "clips", ReadOptions(16), 2)


def test_frame_strip_size_layout_and_labels() -> None:
    top = MovingShapesDataset(32, 8)[0]["video"]
    levels = [top, top[:, ::2], top[:, :1, ::2, ::2]]  # 8 x 32, 4 x 32 and 1 x 16 px
    strip = frame_strip(levels)
    assert strip.size == (8 * 64, 3 * (64 + 12 + 2))  # 8 frames of 64 px; three rows with a label line each
    assert frame_strip([top[:, :3]], min_side=16).size == (3 * 32, 32 + 12 + 2)
    pixels = np.asarray(strip).astype(int)
    row = 64 + 12 + 2
    assert (pixels[row + 12 : row + 76, 4 * 64 :] == 255).all(), "the 4-frame row leaves white space"
    assert (pixels[2 * row + 12 : 2 * row + 76, 64:] == 255).all()
    frame = pixels[2 * row + 12 : 2 * row + 76, :64]  # the 16 px frame, upscaled 4x nearest
    assert np.array_equal(frame[::4, ::4], to_uint8(top[None, :, 0, ::2, ::2])[0])
    assert np.array_equal(frame[3::4, 3::4], frame[::4, ::4])
    with pytest.raises(ValueError, match=r"level 1: expected a \(C, T, H, W\) clip"):
        frame_strip([top, top[None]])


# -------------------------------------------------------------------------------------------------- video folders
def solid_frames(values: list[int], size: tuple[int, int] = (20, 16)) -> list[Image.Image]:
    """Frames of one grey level each."""
    return [Image.new("RGB", size, (v, v, v)) for v in values]


def write_gif(path: Path, frames: list[Image.Image]) -> None:
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def video_folder(root: Path) -> Path:
    """Flat clips with sidecar captions: good GIF, APNG and frame folder, a corrupt GIF and a 2-frame GIF."""
    root.mkdir()
    write_gif(root / "a.gif", solid_frames([10, 40, 70, 100, 130, 160]))
    (root / "a.txt").write_text("a brightening gif")
    frames = solid_frames([20 * k for k in range(10)])
    frames[0].save(root / "b.png", save_all=True, append_images=frames[1:5], duration=100)
    (root / "b.txt").write_text("an apng")
    (root / "c").mkdir()
    for k, im in enumerate(frames):
        im.save(root / "c" / f"frame{k + 1}.png")  # frame10 sorts after frame9
    (root / "c.txt").write_text("a frame folder")
    (root / "broken.gif").write_bytes(b"GIF89a" + b"\x00garbage" * 10)
    (root / "broken.txt").write_text("never read")
    write_gif(root / "short.gif", solid_frames([0, 255]))
    return root


def test_video_folder_loads_good_clips_with_captions_and_skips_bad_ones(tmp_path: Path) -> None:
    root = video_folder(tmp_path / "clips")
    ds = VideoFolderDataset(root, ReadOptions(8), num_frames=3, frame_stride=2)  # a clip needs 5 frames
    assert [item.path.name for item in ds.items] == ["a.gif", "b.png", "broken.gif", "c", "short.gif"]
    assert ds.layout == "video clips, flat folder with sidecar captions"
    items = [ds[i] for i in range(len(ds))]
    assert all(it["video"].shape == (3, 3, 8, 8) for it in items)
    captions = [it["caption"] for it in items]
    assert captions == ["a brightening gif", "an apng", "a frame folder", "a frame folder", "a brightening gif"]
    assert [it["skipped"] for it in items] == [0, 0, 1, 0, 1]  # the corrupt and the 2-frame GIF are passed over
    (tmp_path / "empty" / "stills").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "still.jpg")  # a still beside no clips is not a clip
    with pytest.raises(DataError, match=r"no clips found in .*empty \(looked for files \['\.apng'"):
        VideoFolderDataset(tmp_path / "empty", ReadOptions(8), 2)
    grey = [to_pixels(it["video"])[0, :, 0, 0].tolist() for it in items[:2] + items[3:4]]
    # Centred windows: frames 0, 2, 4 of the 6-frame GIF and of the 5-frame APNG; 2, 4, 6 of the 10 frames.
    assert grey == [[10, 70, 130], [0, 40, 80], [40, 80, 120]]


def test_data_check_reports_bad_and_short_clips(tmp_path: Path, capsys) -> None:
    root = video_folder(tmp_path / "clips")
    report = check_data(root, progress=False, num_frames=3, frame_stride=2)
    assert report.samples == 5 and len(report.problems) == 2
    assert "broken.gif: not a readable image" in report.problems[0]
    assert "short.gif: 2 frames, fewer than the 5" in report.problems[1]
    assert sorted(report.frames) == [5, 6, 10]
    text = "\n".join(report.lines())
    assert "samples: 5, usable: 3, problems: 2" in text and "frames per usable clip: min 5 / median 6 / max 10" in text
    assert main(["data", "check", str(root), "--num-frames", "3", "--frame-stride", "2", "--quiet"]) == 1
    assert capsys.readouterr().out.strip() == text


def test_class_folders_metadata_and_natural_frame_order(tmp_path: Path) -> None:
    root = tmp_path / "classes"
    (root / "cats" / "one").mkdir(parents=True)
    (root / "dogs").mkdir()
    for k, im in enumerate(solid_frames([50, 60, 70])):
        im.save(root / "cats" / "one" / f"{k}.jpg", quality=100)
    write_gif(root / "dogs" / "d.gif", solid_frames([1, 2, 3]))
    ds = VideoFolderDataset(root, ReadOptions(8), 3)
    assert ds.class_names == ["cats", "dogs"] and [ds[i]["label"] for i in range(2)] == [0, 1]
    assert [ds[i]["caption"] for i in range(2)] == ["cats", "dogs"]
    meta = tmp_path / "meta"
    (meta / "frames").mkdir(parents=True)
    for k, im in zip((1, 2, 10, 11), solid_frames([10, 20, 30, 40]), strict=True):
        im.save(meta / "frames" / f"f{k}.png")
    write_gif(meta / "g.gif", solid_frames([5, 6, 7, 8]))
    rows = [
        {"file_name": "frames", "text": "frames", "label": "x"},
        {"file_name": "g.gif", "text": "gif", "label": "y"},
    ]
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = VideoFolderDataset(meta, ReadOptions(8), 4)
    assert ds.layout == "video clips, metadata.jsonl" and ds.class_names == ["x", "y"]
    assert to_pixels(ds[0]["video"])[0, :, 0, 0].tolist() == [10, 20, 30, 40]
    assert natural_key("f10.png") > natural_key("f2.png")


def test_random_crop_and_flip_are_the_same_for_every_frame(tmp_path: Path) -> None:
    root = tmp_path / "clips"
    root.mkdir()
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 256, size=(1, 24, 40, 3), dtype=np.uint8), 6, axis=0)
    save_apng(from_pixels(still).float(), root / "a.png")
    crops = set()
    for seed in range(6):
        clip = VideoFolderDataset(root, ReadOptions(16, crop="random", flip=True, seed=seed), 6)[0]["video"]
        assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(6))
        crops.add(tuple(clip[0, 0, 0, :4].tolist()))
    assert len(crops) > 1, "the crop is random"


def test_loader_builds_video_datasets_and_collates_clips(tmp_path: Path) -> None:
    config = DataConfig(dataset="moving_shapes", num_samples=50, motions=["left", "still"])
    ds = build_dataset(config, 16, num_frames=4)
    assert isinstance(ds, MovingShapesDataset) and ds.motions == ["left", "still"] and ds.num_frames == 4
    batch = next(iter(make_loader(ds, batch_size=3, seed=0)))
    assert batch["video"].shape == (3, 3, 4, 16, 16) and batch["motion"].shape == (3,) and "image" not in batch
    assert len(batch["caption"]) == 3 and batch["skipped"] == 0
    root = video_folder(tmp_path / "clips")
    folder = build_dataset(DataConfig(dataset="video_folder", path=str(root), frame_stride=2), 8, True, num_frames=3)
    assert isinstance(folder, VideoFolderDataset) and folder.frame_stride == 2 and folder.options.need_captions
    with pytest.raises(ValueError, match=r"data\.dataset = moving_shapes gives clips: build it with num_frames"):
        build_dataset(config, 16)
    with pytest.raises(ValueError, match=r"data\.dataset = shapes gives images, but 8 frames were asked for"):
        build_dataset(DataConfig(), 16, num_frames=8)
    assert isinstance(build_dataset(DataConfig(), 16, num_frames=1), ShapesDataset)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (DataConfig(dataset="moving_shapes", motions=["left", "spin"]), "'data.motions' has unknown motions ['spin']"),
        (DataConfig(dataset="moving_shapes", motions=["up", "up"]), "'data.motions' must be distinct"),
        (DataConfig(frame_stride=0), "'data.frame_stride' must be >= 1, got 0"),
        (DataConfig(dataset="video_folder"), "'data.path' is required for data.dataset = video_folder"),
    ],
)
def test_config_errors_name_the_key(data: DataConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^t: {message}".replace("[", r"\[").replace("]", r"\]")):
        MDMConfig(data=data).validate("t")
    MDMConfig(data=DataConfig(dataset="moving_shapes")).validate("t")
