"""Configuration dataclasses, YAML presets and `--set a.b=c` overrides.

Every knob has the official MDM value as its default. Loading is strict: an unknown key, a value of the
wrong type or an impossible combination raises :class:`ConfigError` naming the file, the key and what
was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, misspelt, of the wrong type or impossible."""


@dataclass
class UNetConfig:
    """One level of a NestedUNet: a UNet whose bottleneck holds the network of the next lower level (`inner`)."""

    channels: list[int] = field(default_factory=lambda: [256, 512, 768], metadata={"help": "width per stage"})
    num_res_blocks: list[int] = field(
        default_factory=lambda: [2],
        metadata={"help": "ResNets per stage going down (up: one more); one value = every stage"},
    )
    attention_levels: list[int] = field(
        default_factory=list,
        metadata={"help": "stages (0 = this level's full resolution) with 2-D attention"},
    )
    num_attention_layers: list[int] = field(
        default_factory=lambda: [1],
        metadata={"help": "attention layers after each ResNet, per stage (one = all)"},
    )
    attention_ffn: bool = field(default=False, metadata={"help": "add a 4x feed-forward after each attention"})
    num_heads: int = field(default=8, metadata={"help": "attention heads"})
    num_groups: int = field(default=32, metadata={"help": "GroupNorm groups in ResNets and the output norm"})
    dropout: float = field(default=0.0, metadata={"help": "dropout inside ResNets"})
    temb_dim: int | None = field(default=None, metadata={"help": "time-embedding width; None = 4 x channels[0]"})
    mid_blocks: bool | None = field(
        default=None,
        metadata={"help": "ResNet+attention, ResNet at the bottleneck; innermost only (default on)"},
    )
    text_proj_dim: int = field(
        default=0, metadata={"help": "innermost: project text features to this width (0 = no projection)"}
    )
    num_lm_head_layers: int = field(default=0, metadata={"help": "innermost: transformer blocks on the text"})
    masked_cross_attention: bool = field(
        default=True, metadata={"help": "ignore padded text tokens in cross-attention (released models: off)"}
    )
    micro_conditioning: dict[str, float] = field(
        default_factory=dict, metadata={"help": "name -> default value, e.g. {scale: 64}"}
    )
    normalize_input: bool = field(
        default=False, metadata={"help": "outer levels: divide the noisy input by its per-sample std"}
    )
    inner: UNetConfig | None = field(default=None, metadata={"help": "the network of the next lower level"})

    def levels(self) -> list[UNetConfig]:
        """The per-level configs, highest resolution first."""
        out: list[UNetConfig] = [self]
        while out[-1].inner is not None:
            out.append(out[-1].inner)
        return out


@dataclass
class ModelConfig:
    """The network: image size, channels, conditioning widths and the recursive level tree."""

    image_size: int = field(default=64, metadata={"help": "side of the highest-resolution level"})
    in_channels: int = field(default=3, metadata={"help": "image channels"})
    out_channels: int = field(default=3, metadata={"help": "prediction channels"})
    text_dim: int = field(default=0, metadata={"help": "width of the text-encoder features (0 = no text)"})
    num_classes: int = field(default=0, metadata={"help": "class-conditional: number of classes (0 = none)"})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "a name per class, for `class_labels` given as text and for titles"}
    )
    fp32_islands: bool = field(
        default=True,
        metadata={"help": "time frequencies, attention softmax and x2 upsampling in float32, as ml-mdm does"},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})
    unet: UNetConfig = field(default_factory=UNetConfig, metadata={"help": "the level tree"})

    def level_sizes(self) -> list[int]:
        """Side length of every level, highest first."""
        sizes = [self.image_size]
        for level in self.unet.levels()[:-1]:
            sizes.append(sizes[-1] // 2 ** (len(level.channels) - 1))
        return sizes

    def context_dim(self) -> int:
        """Width of the conditioning tokens seen by cross-attention (0 when unconditional)."""
        inner = self.unet.levels()[-1]
        if inner.text_proj_dim > 0:
            return inner.text_proj_dim
        return self.text_dim


Schedule = Literal["cosine", "linear", "logsnr_cosine", "sigmoid"]
Prediction = Literal["v", "eps", "x0"]
Threshold = Literal["clip", "dynamic", "dynamic_if", "none"]


@dataclass
class DiffusionConfig:
    """The forward process, the training objective and the default sampling settings."""

    schedule: Schedule = field(default="cosine", metadata={"help": "base schedule (cosine = squaredcos_cap_v2)"})
    num_train_timesteps: int = field(default=1000, metadata={"help": "T"})
    beta_start: float = field(default=1e-4, metadata={"help": "linear schedule: first beta"})
    beta_end: float = field(default=0.02, metadata={"help": "linear schedule: last beta"})
    logsnr_min: float = field(default=-5.0, metadata={"help": "logsnr_cosine / sigmoid: lowest logSNR"})
    logsnr_max: float = field(default=5.0, metadata={"help": "logsnr_cosine / sigmoid: highest logSNR"})
    schedule_fp32: bool = field(
        default=True,
        metadata={"help": "hold the schedule and compute level shifts in float32 (ml-mdm parity)"},
    )
    snr_shift: Literal["shift", "none"] = field(
        default="shift",
        metadata={"help": "per-level SNR shift SNR/s**p, or the same schedule at every level"},
    )
    shift_power: float = field(default=1.0, metadata={"help": "p in SNR_l = SNR / s_l**p"})
    shift_base_size: int | None = field(
        default=None,
        metadata={"help": "side s_l is relative to (s_l = side / this); None = the lowest level (no shift on it)"},
    )
    prediction_type: Prediction = field(default="v", metadata={"help": "what the network outputs"})
    loss_target: Prediction = field(default="eps", metadata={"help": "space the loss is measured in"})
    level_weights: list[float] | None = field(
        default=None, metadata={"help": "per-level loss weights, highest first (None = all 1)"}
    )
    loss_on_all_levels: bool = field(default=True, metadata={"help": "False: only the top level's loss"})
    mixed_ratio: list[float] | None = field(
        default=None, metadata={"help": "mixed-resolution batches 'a:b[:c]', highest first (None = off)"}
    )
    cond_drop_prob: float = field(default=0.1, metadata={"help": "condition dropout for classifier-free guidance"})
    thresholding: Threshold = field(default="clip", metadata={"help": "x0 thresholding while sampling"})


@dataclass
class TextConfig:
    """Which text encoder produces the conditioning features, and how prompts are tokenised."""

    encoder: Literal["bytes", "t5", "clip"] | None = field(
        default=None,
        metadata={
            "help": "bytes (built in, trained with the model), t5 or clip (transformers, frozen); None = no text"
        },
    )
    path: str | None = field(default=None, metadata={"help": "t5/clip: local directory or hub id of the weights"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "t5/clip: weight dtype"})
    vocab: str | None = field(
        default=None,
        metadata={"help": "t5: ml-mdm's t5.vocab for the released models' tokenisation (default: PATH/t5.vocab)"},
    )
    max_length: int = field(default=128, metadata={"help": "token limit (the end token included)"})
    max_chars: int = field(default=512, metadata={"help": "prompts are cut to this many characters first"})
    cache: str | None = field(
        default=None, metadata={"help": "directory of precomputed features (`mdm data embed`), used when set"}
    )


@dataclass
class DataConfig:
    """Where training images come from and how they are read."""

    dataset: Literal["shapes", "folder", "shards"] = field(
        default="shapes",
        metadata={
            "help": "shapes (built in), folder (class subfolders / metadata.jsonl / .txt) or shards (tar or ml-mdm TSV)"
        },
    )
    path: str | None = field(
        default=None,
        metadata={"help": "folder: the image folder; shards: a .tar, directory, glob, {a..b} pattern or ml-mdm .tsv"},
    )
    crop: Literal["center", "random"] = field(default="center", metadata={"help": "folder: square crop"})
    flip: bool = field(default=False, metadata={"help": "folder: random horizontal flips"})
    min_size: int = field(default=0, metadata={"help": "folder: skip images whose shorter side is below (0 = size)"})
    max_pixels: int = field(default=89_478_485, metadata={"help": "folder: skip larger images (bomb guard)"})
    max_bad_fraction: float = field(
        default=0.01, metadata={"help": "stop when more than this share of read samples was unusable"}
    )
    num_samples: int = field(default=100_000, metadata={"help": "shapes: images per epoch (any size works)"})
    shapes: list[str] = field(
        default_factory=lambda: ["circle", "square", "triangle", "cross"],
        metadata={"help": "shapes: the shape vocabulary; class = shape x colour"},
    )
    colors: list[str] = field(
        default_factory=lambda: ["red", "green", "blue"], metadata={"help": "shapes: the colour vocabulary"}
    )
    seed: int = field(default=0, metadata={"help": "data seed: the images and the shuffling order"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per rank"})


@dataclass
class PhaseConfig:
    """One stage of progressive training: the innermost `levels` levels, trained for `steps` steps."""

    levels: int = field(default=1, metadata={"help": "how many levels (from the lowest) this phase trains"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps in this phase"})
    freeze_inner_steps: int = field(
        default=0, metadata={"help": "keep the levels carried over from the previous phase fixed this long"}
    )
    batch_size: int | None = field(default=None, metadata={"help": "per-process micro-batch (None = train's)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate of this phase (None = train's)"})
    mixed_ratio: list[float] | None = field(
        default=None, metadata={"help": "mixed-resolution ratio for this phase (None = the diffusion one)"}
    )


@dataclass
class TrainConfig:
    """The optimisation loop: optimizer, schedule, EMA, precision, phases, checkpoints and logging."""

    batch_size: int = field(default=32, metadata={"help": "micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    steps: int = field(default=10_000, metadata={"help": "optimizer steps when no phases are listed"})
    phases: list[PhaseConfig] = field(
        default_factory=list, metadata={"help": "progressive phases, lowest resolution first (empty = all levels)"}
    )
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (AdamW)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    warmup_steps: int = field(default=10_000, metadata={"help": "linear LR warm-up per phase"})
    lr_schedule: Literal["constant", "cosine"] = field(
        default="constant", metadata={"help": "after warm-up: constant, or cosine decay to min_lr_ratio * lr"}
    )
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine: final LR as a fraction of lr"})
    grad_clip: float = field(default=2.0, metadata={"help": "clip the global gradient norm (0 = off)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay of the weights"})
    ema_warmup: bool = field(
        default=False, metadata={"help": "EMA decay min(ema_decay, (1 + n) / (10 + n)) at update n"}
    )
    mixed_precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto", metadata={"help": "auto: bf16 autocast on GPU, fp32 on CPU"}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the network"})
    strategy: Literal["ddp", "fsdp"] = field(default="ddp", metadata={"help": "multi-process wrapping"})
    grow_from: Literal["ema", "raw"] = field(
        default="ema", metadata={"help": "which weights of the previous phase seed the inner network"}
    )
    init_inner_from: str | None = field(
        default=None, metadata={"help": "model directory whose weights seed the inner levels of the first phase"}
    )
    seed: int = field(default=0, metadata={"help": "seed of initialisation, noise, timesteps and dropout"})
    log_every: int = field(default=10, metadata={"help": "log.jsonl / TensorBoard interval in steps"})
    checkpoint_every: int = field(default=1000, metadata={"help": "checkpoint interval in steps (0 = phase ends)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "how many checkpoints to keep"})
    sample_every: int = field(default=0, metadata={"help": "sample PNG interval in steps (0 = phase ends only)"})
    sample_steps: int = field(default=25, metadata={"help": "DDIM steps of the training samples"})
    sample_guidance: float = field(default=3.0, metadata={"help": "guidance scale of the training samples"})
    sample_count: int = field(default=12, metadata={"help": "images in each sample grid"})
    max_nonfinite: int = field(default=20, metadata={"help": "stop after this many non-finite losses in a row"})


@dataclass
class MDMConfig:
    """Everything a model directory or a run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, source: str = "<config>") -> MDMConfig:
        """Check every cross-field constraint; returns self so calls chain."""
        validate(self, source)
        return self


# ----------------------------------------------------------------------------------------------------------
# Generic dataclass <-> dict conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and convert (str ratios, ints to floats, nested dataclasses)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], key, source)
        for arg in options:
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item in (int, float):
            sep = ":" if ":" in value else ","
            value = [v.strip() for v in value.split(sep) if v.strip()]
            try:
                value = [item(float(v)) if item is float else int(v) for v in value]
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and item in (int, float):
            value = [value]
        if not isinstance(value, list):
            raise bad
        return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad
        return {_convert(k, kt, key, source): _convert(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, source, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_dict(cls: type, data: dict, source: str = "<dict>", prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(prefix + str(k) for k in unknown)}; "
            f"expected one of: {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(v, hints[k], prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain YAML-ready dict of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict, creating sub-dicts as needed."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: cannot set {path}: '{k}' is not a mapping")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


# ----------------------------------------------------------------------------------------------------------
# Validation


def _check(cond: bool, source: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: '{key}' {msg}")


def _validate_level(level: UNetConfig, key: str, source: str, innermost: bool, temb_dim: int) -> None:
    n = len(level.channels)
    _check(n >= 1, source, f"{key}.channels", "must list at least one width")
    for i, c in enumerate(level.channels):
        _check(c > 0, source, f"{key}.channels[{i}]", f"must be positive, got {c}")
        _check(
            c % level.num_groups == 0,
            source,
            f"{key}.channels[{i}]",
            f"= {c} is not divisible by num_groups = {level.num_groups}",
        )
    for name in ("num_res_blocks", "num_attention_layers"):
        values = getattr(level, name)
        if len(values) == 1:
            setattr(level, name, values * n)
        _check(
            len(getattr(level, name)) == n,
            source,
            f"{key}.{name}",
            f"must have one entry or one per stage ({n}), got {values}",
        )
    _check(all(r >= 1 for r in level.num_res_blocks), source, f"{key}.num_res_blocks", "entries must be >= 1")
    for a in level.attention_levels:
        _check(0 <= a < n, source, f"{key}.attention_levels", f"entry {a} is not a stage index in [0, {n})")
        c = level.channels[a]
        _check(
            c % level.num_heads == 0,
            source,
            f"{key}.channels[{a}]",
            f"= {c} (an attention stage) is not divisible by num_heads = {level.num_heads}",
        )
        _check(c % 32 == 0, source, f"{key}.channels[{a}]", f"= {c} (an attention stage) must be divisible by 32")
    own_temb = level.temb_dim if level.temb_dim is not None else 4 * level.channels[0]
    _check(own_temb % 8 == 0, source, f"{key}.temb_dim", f"= {own_temb} must be divisible by 8")
    _check(
        own_temb == temb_dim,
        source,
        f"{key}.temb_dim",
        f"= {own_temb} must equal the innermost level's time width {temb_dim} (the pooled text is shared)",
    )
    _check(0.0 <= level.dropout < 1.0, source, f"{key}.dropout", f"must be in [0, 1), got {level.dropout}")
    scale = level.micro_conditioning.get("scale")
    _check(scale is None or scale > 0, source, f"{key}.micro_conditioning.scale", f"must be > 0, got {scale}")
    if innermost:
        _check(not level.normalize_input, source, f"{key}.normalize_input", "applies to outer levels only")
    else:
        _check(
            level.mid_blocks is not True,
            source,
            f"{key}.mid_blocks",
            "must be unset on a nested level (its bottleneck is the inner network)",
        )
        for name in ("text_proj_dim", "num_lm_head_layers"):
            _check(getattr(level, name) == 0, source, f"{key}.{name}", "belongs to the innermost level only")


def validate(cfg: MDMConfig, source: str = "<config>") -> None:
    """Cross-field checks: divisibility of sizes and widths, level ordering, diffusion settings."""
    m, d = cfg.model, cfg.diffusion
    levels = m.unet.levels()
    inner = levels[-1]
    temb = inner.temb_dim if inner.temb_dim is not None else 4 * inner.channels[0]
    key = "model.unet"
    for i, level in enumerate(levels):
        _validate_level(level, key, source, innermost=i == len(levels) - 1, temb_dim=temb)
        key += ".inner"
    _check(m.image_size > 0, source, "model.image_size", "must be positive")
    factor = 1
    for level in levels:
        factor *= 2 ** (len(level.channels) - 1)
    _check(
        m.image_size % factor == 0,
        source,
        "model.image_size",
        f"= {m.image_size} is not divisible by {factor}, the product of every level's down-sampling "
        f"(2**(stages-1) per level)",
    )
    for name in ("in_channels", "out_channels"):
        _check(getattr(m, name) > 0, source, f"model.{name}", "must be positive")
    _check(m.text_dim >= 0 and m.num_classes >= 0, source, "model.text_dim/num_classes", "must be >= 0")
    _check(
        inner.text_proj_dim >= 0 and inner.num_lm_head_layers >= 0,
        source,
        "model.unet...text_proj_dim",
        "must be >= 0",
    )
    if m.class_names is not None:
        _check(
            len(m.class_names) == m.num_classes,
            source,
            "model.class_names",
            f"needs one name per class ({m.num_classes}), got {len(m.class_names)}",
        )
    if m.num_classes > 0:
        _check(
            m.context_dim() > 0,
            source,
            "model.num_classes",
            "needs a conditioning width: set the innermost level's text_proj_dim (or model.text_dim)",
        )
    ctx = m.context_dim()
    if ctx > 0 and inner.num_lm_head_layers > 0:
        _check(
            ctx % inner.num_heads == 0,
            source,
            "model.unet...num_lm_head_layers",
            "needs width % num_heads == 0",
        )
    n_levels = len(levels)
    if d.level_weights is not None:
        _check(
            len(d.level_weights) == n_levels,
            source,
            "diffusion.level_weights",
            f"needs one weight per level ({n_levels}), got {d.level_weights}",
        )
    if d.mixed_ratio is not None:
        _check(
            len(d.mixed_ratio) == n_levels and all(r > 0 for r in d.mixed_ratio),
            source,
            "diffusion.mixed_ratio",
            f"needs {n_levels} positive parts (highest level first), got {d.mixed_ratio}",
        )
    _check(d.num_train_timesteps >= 2, source, "diffusion.num_train_timesteps", "must be >= 2")
    _check(0.0 <= d.cond_drop_prob < 1.0, source, "diffusion.cond_drop_prob", "must be in [0, 1)")
    _check(d.shift_power >= 0, source, "diffusion.shift_power", "must be >= 0")
    _check(d.shift_base_size is None or d.shift_base_size > 0, source, "diffusion.shift_base_size", "must be positive")
    _check(0 < d.beta_start < d.beta_end < 1, source, "diffusion.beta_start/beta_end", "need 0 < start < end < 1")
    _check(d.logsnr_min < d.logsnr_max, source, "diffusion.logsnr_min", "must be below logsnr_max")
    _validate_text(cfg, source)
    _validate_train(cfg, source)


def _validate_text(cfg: MDMConfig, source: str) -> None:
    t = cfg.text
    _check(t.max_length > 0, source, "text.max_length", "must be positive")
    _check(t.max_chars > 0, source, "text.max_chars", "must be positive")
    if t.encoder is not None:
        _check(
            cfg.model.text_dim > 0, source, "text.encoder", "is set, but model.text_dim = 0 (the model takes no text)"
        )
    if t.encoder in ("t5", "clip"):
        _check(
            t.path is not None, source, "text.path", f"is needed for text.encoder = {t.encoder} (a directory or hub id)"
        )
    _check(t.vocab is None or t.encoder == "t5", source, "text.vocab", "applies to text.encoder = t5 only")


def mixed_fractions(ratio: list[float]) -> list[float]:
    """'a:b:c' (highest first) -> cumulative fractions [a/s, (a+b)/s, 1]: level l trains on that share of rows."""
    total = sum(ratio)
    out, acc = [], 0.0
    for r in ratio:
        acc += r
        out.append(acc / total)
    return out


def phase_mixed_ratio(cfg: MDMConfig, levels: int, own: list[float] | None) -> list[float] | None:
    """The mixed-resolution ratio of a phase training the innermost `levels` levels: its own, else the
    diffusion one restricted to those levels (None for a single level)."""
    if own is not None:
        return list(own)
    ratio = cfg.diffusion.mixed_ratio
    if ratio is None or levels == 1:
        return None
    return ratio[len(ratio) - levels :]


def _validate_train(cfg: MDMConfig, source: str) -> None:
    """Training and data settings: positive sizes, phases that grow one level at a time."""
    tr, data = cfg.train, cfg.data
    n_levels = len(cfg.model.unet.levels())
    for name in ("batch_size", "grad_accum", "steps", "keep_checkpoints", "max_nonfinite", "sample_steps"):
        _check(getattr(tr, name) >= 1, source, f"train.{name}", f"must be >= 1, got {getattr(tr, name)}")
    for name in ("warmup_steps", "log_every", "checkpoint_every", "sample_every", "sample_count"):
        _check(getattr(tr, name) >= 0, source, f"train.{name}", f"must be >= 0, got {getattr(tr, name)}")
    _check(tr.lr > 0, source, "train.lr", f"must be positive, got {tr.lr}")
    _check(
        len(tr.betas) == 2 and all(0 <= b < 1 for b in tr.betas), source, "train.betas", "needs two values in [0, 1)"
    )
    _check(0 <= tr.ema_decay < 1, source, "train.ema_decay", f"must be in [0, 1), got {tr.ema_decay}")
    _check(0 <= tr.min_lr_ratio <= 1, source, "train.min_lr_ratio", "must be in [0, 1]")
    _check(tr.grad_clip >= 0, source, "train.grad_clip", "must be >= 0")
    _check(tr.log_every > 0, source, "train.log_every", "must be positive")
    prev = 0
    for i, ph in enumerate(tr.phases):
        key = f"train.phases[{i}]"
        _check(
            prev < ph.levels <= n_levels,
            source,
            f"{key}.levels",
            f"= {ph.levels} must grow from the previous phase ({prev}) and be at most the model's {n_levels} levels",
        )
        _check(ph.steps >= 1, source, f"{key}.steps", "must be >= 1")
        _check(0 <= ph.freeze_inner_steps <= ph.steps, source, f"{key}.freeze_inner_steps", "must be in [0, steps]")
        _check(ph.batch_size is None or ph.batch_size >= 1, source, f"{key}.batch_size", "must be >= 1")
        _check(ph.lr is None or ph.lr > 0, source, f"{key}.lr", "must be positive")
        if ph.mixed_ratio is not None:
            _check(
                len(ph.mixed_ratio) == ph.levels and all(r > 0 for r in ph.mixed_ratio),
                source,
                f"{key}.mixed_ratio",
                f"needs {ph.levels} positive parts (highest level first), got {ph.mixed_ratio}",
            )
        ratio = phase_mixed_ratio(cfg, ph.levels, ph.mixed_ratio)
        if ratio is not None:
            batch = ph.batch_size or tr.batch_size
            for j, fraction in enumerate(mixed_fractions(ratio)):
                _check(
                    int(fraction * batch) >= 1,
                    source,
                    f"{key}.batch_size",
                    f"= {batch} gives level {j} of the mixed ratio {ratio} no rows; raise the batch size",
                )
        prev = ph.levels
    _check(data.num_samples >= 1, source, "data.num_samples", "must be >= 1")
    _check(data.num_workers >= 0, source, "data.num_workers", "must be >= 0")
    _check(0 <= data.max_bad_fraction < 1, source, "data.max_bad_fraction", "must be in [0, 1)")
    _check(
        data.dataset == "shapes" or bool(data.path),
        source,
        "data.path",
        f"is required for data.dataset = {data.dataset}",
    )


# ----------------------------------------------------------------------------------------------------------
# Files and presets


def config_from_dict(data: dict, source: str = "<dict>") -> MDMConfig:
    """Strictly parse and validate a full config mapping."""
    cfg = from_dict(MDMConfig, data or {}, source)
    return cfg.validate(source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> MDMConfig:
    """Read a YAML config file, apply `--set` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        apply_overrides(data, overrides)
    return config_from_dict(data, str(path))


def save_config(cfg: MDMConfig, path: str | Path) -> None:
    """Write the full resolved config as YAML (to a temporary name, then renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def list_presets() -> list[str]:
    """Names of the presets shipped in `mdm/presets`."""
    return sorted(p.name[:-5] for p in resources.files("mdm.presets").iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    """Path of a shipped preset; unknown names list the available ones."""
    path = Path(str(resources.files("mdm.presets") / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return path


def load_preset(name: str, overrides: list[str] | None = None) -> MDMConfig:
    """Load a shipped preset by name."""
    return load_config(preset_path(name), overrides)
