"""The built-in shapes dataset: deterministic scenes, captions, any resolution, anti-aliased levels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdm.data.shapes import BACKGROUNDS, COLORS, SIZES, ShapesDataset


def test_default_has_at_least_ten_named_classes() -> None:
    ds = ShapesDataset(32)
    assert ds.num_classes == 12
    assert len(set(ds.class_names)) == 12
    assert ds.class_names[0] == "red circle" and ds.class_names[-1] == "blue cross"
    labels = torch.tensor([ds.scene(i).label for i in range(2400)])
    counts = torch.bincount(labels, minlength=12).float()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()


def test_deterministic_per_seed_and_index() -> None:
    a, b = ShapesDataset(24, seed=3), ShapesDataset(24, seed=3)
    for i in (0, 7, 999):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["image"], ib["image"]) and ia["caption"] == ib["caption"]
        assert ia["label"] == ib["label"]
    other = ShapesDataset(24, seed=4)
    assert not torch.equal(a[0]["image"], other[0]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])


def test_caption_names_shape_colour_size_position_background() -> None:
    ds = ShapesDataset(32, shapes=["circle", "ring"], colors=["yellow", "red"])
    for i in range(50):
        s = ds.scene(i)
        cap = ds[i]["caption"]
        assert s.shape in cap and s.color in cap and s.size in cap and s.background in cap
        assert s.position in cap
        assert s.size in SIZES and s.background in BACKGROUNDS
        assert ds.class_names[s.label] == f"{s.color} {s.shape}"


@pytest.mark.parametrize("size", [8, 17, 48, 256])
def test_any_resolution_in_range(size: int) -> None:
    img = ShapesDataset(32).render(5, size)
    assert img.shape == (3, size, size) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1


def test_shape_colour_is_rendered_and_edges_are_antialiased() -> None:
    ds = ShapesDataset(64, shapes=["circle"], colors=["red", "blue"])
    for i in range(10):
        s = ds.scene(i)
        img = ds.render(i)
        centre = img[:, int(s.cy * 64), int(s.cx * 64)]
        assert torch.allclose(centre, torch.tensor(s.rgb) / 127.5 - 1, atol=1e-4)
        rgb = torch.tensor(COLORS[s.color]) / 127.5 - 1
        assert (centre - rgb).abs().max() < 0.15
        # Anti-aliasing: some pixels lie strictly between the shape and the background.
        d_fg = (img - centre[:, None, None]).abs().amax(0)
        mixed = (d_fg > 0.1) & (d_fg < (centre[:, None, None] - img).abs().amax(0).max() - 0.1)
        assert mixed.sum() > 4


def test_half_size_render_matches_pooled_full_size() -> None:
    ds = ShapesDataset(64, shapes=["circle", "square", "triangle", "cross", "ring"])
    err = torch.stack([(F.avg_pool2d(ds.render(i)[None], 2)[0] - ds.render(i, 32)).abs() for i in range(30)])
    assert err.mean() < 0.002 and err.max() < 0.1


def test_bad_vocabulary_and_index_rejected() -> None:
    with pytest.raises(ValueError, match="hexagon"):
        ShapesDataset(32, shapes=["circle", "hexagon"])
    with pytest.raises(ValueError, match="colour"):
        ShapesDataset(32, colors=["red", "red"])
    with pytest.raises(IndexError, match="10 images"):
        ShapesDataset(32, num_samples=10)[10]
