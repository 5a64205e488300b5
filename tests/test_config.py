from pathlib import Path

import pytest
import torch
import yaml

from mdm.config import (
    ConfigError,
    MDMConfig,
    apply_overrides,
    config_from_dict,
    list_presets,
    load_config,
    load_preset,
    save_config,
    to_dict,
)
from mdm.models.unet import NestedUNet
from tests.conftest import tiny_config

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ml-mdm-keys"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base_dict() -> dict:
    return to_dict(tiny_config(levels=2))


def test_round_trip_through_yaml(tmp_path):
    cfg = tiny_config(levels=3, num_classes=5)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["model"].update(imagesize=32), "unknown key(s) model.imagesize"),
        (lambda d: d["model"]["unet"]["inner"].update(chanels=[32]), "model.unet.inner.chanels"),
        (lambda d: d.update(trainer={}), "unknown key(s) trainer"),
        (lambda d: d["model"].update(image_size="big"), "'model.image_size' must be int"),
        (lambda d: d["diffusion"].update(schedule="cosin"), "'diffusion.schedule' must be 'cosine'"),
        (lambda d: d["model"]["unet"].update(channels=[32, 48]), "= 48 is not divisible by num_groups = 32"),
        (lambda d: d["model"].update(image_size=20), "model.image_size' = 20 is not divisible by 8"),
        (lambda d: d["model"]["unet"].update(temb_dim=128), "must equal the innermost level's time width 64"),
        (lambda d: d["model"]["unet"]["inner"].update(attention_levels=[3]), "entry 3 is not a stage index"),
        (
            lambda d: d["model"]["unet"]["inner"].update(num_res_blocks=[1, 1]),
            "one entry or one per stage (3)",
        ),
        (lambda d: d["model"]["unet"].update(mid_blocks=True), "must be unset on a nested level"),
        (lambda d: d["model"]["unet"].update(text_proj_dim=8), "belongs to the innermost level only"),
        (lambda d: d["diffusion"].update(level_weights=[1.0]), "needs one weight per level (2)"),
        (lambda d: d["diffusion"].update(mixed_ratio="2:1:1"), "needs 2 positive parts"),
        (lambda d: d["diffusion"].update(cond_drop_prob=1.5), "cond_drop_prob' must be in [0, 1)"),
        (lambda d: d["diffusion"].update(eta=-0.5), "'diffusion.eta' must be >= 0, got -0.5"),
        (lambda d: d["diffusion"].update(eta=float("nan")), "'diffusion.eta' must be finite"),
        (lambda d: d["diffusion"].update(eta=1.0, sampler="euler"), "diffusion.sampler = euler takes none"),
        (lambda d: d["diffusion"].update(guided_levels="top"), "'diffusion.guided_levels' must be 'all'"),
        (lambda d: d["diffusion"].update(guided_levels="lowest"), "needs diffusion.level_projection = true"),
        (lambda d: d["diffusion"].update(guidance_interval=[5.0, -5.0]), "needs [lo, hi] with lo <= hi"),
        (lambda d: d["diffusion"].update(guidance_interval=[1.0]), "needs [lo, hi] with lo <= hi"),
        (lambda d: d["diffusion"].update(guidance_interval=[float("nan"), 1.0]), "needs [lo, hi] with lo <= hi"),
        (
            lambda d: d["model"]["unet"]["inner"].update(channels=[32, 32, 40], num_groups=8),
            "attention stage",
        ),
        (lambda d: d["model"].update(fp32_islands="yes"), "'model.fp32_islands' must be bool"),
        (lambda d: d["model"]["unet"].update(micro_conditioning={"scale": 0}), "micro_conditioning.scale' must be > 0"),
        (lambda d: d.update(text={"word_buckets": -1}), "'text.word_buckets' must be >= 0"),
        (lambda d: d.update(text={"word_buckets": 64}), "'text.word_buckets' applies to text.encoder = bytes only"),
    ],
)
def test_bad_configs_name_file_key_and_expectation(tmp_path, mutate, needle):
    data = base_dict()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_string_ratios_and_scalar_broadcast():
    data = base_dict()
    data["diffusion"]["mixed_ratio"] = "2:1"
    data["model"]["unet"]["inner"]["num_attention_layers"] = 2
    cfg = config_from_dict(data)
    assert cfg.diffusion.mixed_ratio == [2.0, 1.0]
    assert cfg.model.unet.inner.num_attention_layers == [2, 2, 2]


def test_overrides(tmp_path):
    path = write(tmp_path, base_dict())
    cfg = load_config(path, ["diffusion.shift_power=2", "model.unet.inner.dropout=0.1", "text.max_chars=77"])
    assert cfg.diffusion.shift_power == 2.0 and cfg.model.unet.inner.dropout == 0.1 and cfg.text.max_chars == 77
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_overrides({}, ["diffusion.shift_power"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["diffusion.shift_pwr=2"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: "):
        load_preset("nope")


def test_every_preset_loads_and_builds():
    assert {"demo", "cc12m-64", "cc12m-256", "cc12m-1024", "imagenet64", "imagenet256"} <= set(list_presets())
    for name in list_presets():
        cfg = load_preset(name)
        assert isinstance(cfg, MDMConfig)
        with torch.device("meta"):
            NestedUNet(cfg.model)


@pytest.mark.parametrize(
    ("preset", "keys", "params"),
    [
        ("cc12m-64", "keys_64x64_unet.tsv", 461_359_107),
        ("cc12m-256", "keys_256x256_nested_unet.tsv", 476_613_958),
        ("cc12m-1024", "keys_1024x1024_nested2_unet.tsv", 480_970_057),
    ],
)
def test_released_presets_match_reference_keys_and_sizes(preset, keys, params):
    if not REFERENCE.exists():
        pytest.skip(f"reference key listings not found at {REFERENCE}")
    cfg = load_preset(preset)
    with torch.device("meta"):
        model = NestedUNet(cfg.model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = {}
    for line in (REFERENCE / keys).read_text().splitlines():
        key, shape = line.split("\t")
        ref[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    assert ours == ref
    assert sum(p.numel() for p in model.parameters()) == params
