"""The configuration dataclasses, and reading and writing them: YAML files, shipped presets, `--set` overrides.

Every knob has the official MDM value as its default. Loading is strict and validates once: an unknown key, a
value of the wrong type or an impossible combination raises :class:`ConfigError` naming the file, the key and
what was expected. A loaded config is never changed afterwards; derived values are methods.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from mdm import io
from mdm.config.parse import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from mdm.config.validate import validate


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
    resample: Literal["space", "time"] = field(
        default="space",
        metadata={"help": "axis the stages halve: space (the side) or time (the frames; the side stays)"},
    )
    temporal_attention: bool = field(
        default=True,
        metadata={"help": "video: num_heads-head attention over frames after each ResNet of a stage with >1 frame"},
    )
    position_embedding: bool = field(
        default=False,
        metadata={"help": "a learned per-pixel embedding (2-D sinusoidal at init) added after conv_in: where it is"},
    )
    inner: UNetConfig | None = field(default=None, metadata={"help": "the network of the next lower level"})

    def __post_init__(self) -> None:
        """Normalise: a one-entry per-stage list means that value at every stage."""
        for name in ("num_res_blocks", "num_attention_layers"):
            values = getattr(self, name)
            if len(values) == 1:
                setattr(self, name, values * len(self.channels))

    def time_width(self) -> int:
        """Width of the time embedding: temb_dim, else 4 x channels[0]."""
        return self.temb_dim if self.temb_dim is not None else 4 * self.channels[0]

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
    num_frames: int = field(
        default=1, metadata={"help": "frames of the highest level; > 1 = a video model (N C T H W at every level)"}
    )
    frame_positions: Literal["rotary", "sinusoidal"] = field(
        default="rotary",
        metadata={"help": "how temporal attention sees frame order: rotary q/k, or sinusoids added to its input"},
    )
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

    def is_video(self) -> bool:
        """Whether the model takes clips (N C T H W at every level) rather than images (N C H W)."""
        return self.num_frames > 1

    def level_shapes(self) -> list[tuple[int, int]]:
        """(frames, side) of every level, highest first: a level's stages halve its `resample` axis."""
        shapes = [(self.num_frames, self.image_size)]
        for level in self.unet.levels()[:-1]:
            frames, side = shapes[-1]
            factor = 2 ** (len(level.channels) - 1)
            shapes.append((frames // factor, side) if level.resample == "time" else (frames, side // factor))
        return shapes

    def level_sizes(self) -> list[int]:
        """Side length of every level, highest first."""
        return [side for _, side in self.level_shapes()]

    def inner_model(self, levels: int) -> ModelConfig:
        """The model of the innermost `levels` levels: a progressive phase's, or the image model inside a video."""
        first = len(self.unet.levels()) - levels
        frames, side = self.level_shapes()[first]
        return dataclasses.replace(self, unet=self.unet.levels()[first], image_size=side, num_frames=frames)

    def context_dim(self) -> int:
        """Width of the conditioning tokens seen by cross-attention (0 when unconditional)."""
        inner = self.unet.levels()[-1]
        if inner.text_proj_dim > 0:
            return inner.text_proj_dim
        return self.text_dim


Schedule = Literal["cosine", "linear", "logsnr_cosine", "sigmoid"]
Prediction = Literal["v", "eps", "x0"]
Threshold = Literal["clip", "dynamic", "dynamic_if", "none"]
Sampler = Literal[
    "ddpm", "ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "renoise", "unipc", "unipc_3"
]
Spacing = Literal["mlmdm", "trailing", "logsnr", "karras"]
GuidedLevels = Literal["all", "lowest"]


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
    temporal_downsample: Literal["first", "middle", "mean"] = field(
        default="first",
        metadata={"help": "video pyramid: a time step keeps the first or middle frame of each group, or their mean"},
    )
    cond_drop_prob: float = field(default=0.1, metadata={"help": "condition dropout for classifier-free guidance"})
    thresholding: Threshold = field(default="clip", metadata={"help": "x0 thresholding while sampling"})
    sampler: Sampler = field(default="ddim", metadata={"help": "default sampler (see mdm.diffusion.samplers)"})
    spacing: Spacing = field(
        default="mlmdm", metadata={"help": "default sampling grid: mlmdm, trailing, logsnr, karras"}
    )
    level_projection: bool = field(
        default=False,
        metadata={"help": "sampling: correct each level's x0 so that its pyramid is the level below (levels agree)"},
    )
    guided_levels: GuidedLevels = field(
        default="all",
        metadata={
            "help": "levels guidance steers by default: all, or with level_projection only the lowest (the levels "
            "above take its guided content through the projection and keep their own detail unguided: less grain)"
        },
    )
    eta: float = field(
        default=0.0,
        metadata={
            "help": "DDIM's default noise level: 0 deterministic, 1 as much fresh noise per step as DDPM; more is "
            "capped per step at re-noising x0 afresh (sampler renoise)"
        },
    )
    guidance_interval: list[float] | None = field(
        default=None,
        metadata={
            "help": "default [lo, hi] of the lowest level's logSNR where guidance applies (None = every step; "
            "-.inf / .inf: no bound); unguided steps skip the unconditional half of the batch"
        },
    )


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
    word_buckets: int = field(
        default=0,
        metadata={"help": "bytes: each word also one-hot among this many hash buckets; 0 = spelling only"},
    )
    max_chars: int = field(default=512, metadata={"help": "prompts are cut to this many characters first"})
    cache: str | None = field(
        default=None, metadata={"help": "directory of precomputed features (`mdm data embed`), used when set"}
    )


@dataclass
class DataConfig:
    """Where training images (or clips) come from and how they are read."""

    dataset: Literal["shapes", "folder", "shards", "moving_shapes", "video_folder"] = field(
        default="shapes",
        metadata={
            "help": "shapes (built in), folder (class subfolders / metadata.jsonl / .txt), shards (tar or ml-mdm "
            "TSV); video: moving_shapes (built in), video_folder (clips or frame folders, laid out as folder)"
        },
    )
    path: str | None = field(
        default=None,
        metadata={
            "help": "folder / video_folder: the folder; shards: a .tar, directory, glob, {a..b} pattern or ml-mdm .tsv"
        },
    )
    crop: Literal["center", "random"] = field(default="center", metadata={"help": "folder: square crop"})
    flip: bool = field(default=False, metadata={"help": "folder: random horizontal flips"})
    min_size: int = field(default=0, metadata={"help": "folder: skip images whose shorter side is below (0 = size)"})
    max_pixels: int = field(default=89_478_485, metadata={"help": "folder: skip larger images (bomb guard)"})
    max_bad_fraction: float = field(
        default=0.01, metadata={"help": "stop when more than this share of read samples was unusable"}
    )
    num_samples: int = field(
        default=100_000, metadata={"help": "shapes / moving_shapes: images or clips per epoch (any size works)"}
    )
    shapes: list[str] = field(
        default_factory=lambda: ["circle", "square", "triangle", "cross"],
        metadata={"help": "shapes: the shape vocabulary; class = shape x colour"},
    )
    colors: list[str] = field(
        default_factory=lambda: ["red", "green", "blue"], metadata={"help": "shapes: the colour vocabulary"}
    )
    motions: list[str] = field(
        default_factory=lambda: ["left", "right", "up", "down", "grow", "shrink", "still"],
        metadata={"help": "moving_shapes: the motion vocabulary (the frames come from model.num_frames)"},
    )
    frame_stride: int = field(
        default=1, metadata={"help": "video_folder: take every n-th frame of a clip (model.num_frames of them)"}
    )
    seed: int = field(default=0, metadata={"help": "data seed: the images and the shuffling order"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per rank"})


@dataclass
class PhaseConfig:
    """One stage of progressive training: the innermost `levels` levels, trained for `steps` steps.

    A phase at as many levels as the one before refines that model (all of it trains). With `timesteps` and
    `loss_target` it can work on one end of the schedule: an eps loss weighs errors of x0 by the SNR, ~0 near pure
    noise (t >= 950 of 1000), so only a v or x0 loss teaches there what a caption says about the layout."""

    levels: int = field(default=1, metadata={"help": "how many levels (from the lowest) this phase trains"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps in this phase"})
    freeze_inner_steps: int = field(
        default=0, metadata={"help": "keep the carried levels (and the adapter feeding them) fixed this long"}
    )
    batch_size: int | None = field(default=None, metadata={"help": "per-process micro-batch (None = train's)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate of this phase (None = train's)"})
    mixed_ratio: list[float] | None = field(
        default=None, metadata={"help": "mixed-resolution ratio for this phase (None = the diffusion one)"}
    )
    timesteps: list[int] | None = field(
        default=None, metadata={"help": "draw network times t from [lo, hi) (None = all of 0..T-1)"}
    )
    timesteps_share: float = field(
        default=1.0, metadata={"help": "share of samples whose t comes from `timesteps`; the rest: all of 0..T-1"}
    )
    loss_target: Prediction | None = field(
        default=None, metadata={"help": "this phase's loss space (None = diffusion.loss_target)"}
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
        default="auto",
        metadata={"help": "auto: bf16 autocast where the hardware has it (CUDA, AVX-512 BF16 or AMX CPUs), else fp32"},
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the network"})
    channels_last: bool = field(
        default=False, metadata={"help": "NHWC convolutions: for bf16 on GPUs (on CPU they measured 2x slower)"}
    )
    strategy: Literal["ddp", "fsdp"] = field(default="ddp", metadata={"help": "multi-process wrapping"})
    grow_from: Literal["ema", "raw"] = field(
        default="ema", metadata={"help": "which weights of the previous phase seed the inner network"}
    )
    init_inner_from: str | None = field(
        default=None,
        metadata={"help": "model directory seeding the first phase's inner levels (or all of them: a fine-tune)"},
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
        """Check every rule (see `mdm.config.validate`); returns self so calls chain. Loading does this."""
        validate(self, source)
        return self

    def phase_mixed_ratio(self, phase: PhaseConfig) -> list[float] | None:
        """A phase's mixed-resolution ratio: its own, else the diffusion one cut to its levels (None: one level)."""
        if phase.mixed_ratio is not None:
            return list(phase.mixed_ratio)
        ratio = self.diffusion.mixed_ratio
        if ratio is None or phase.levels == 1:
            return None
        return ratio[len(ratio) - phase.levels :]


# ----------------------------------------------------------------------------------------------------------
# Files and presets


def config_from_dict(data: dict, source: str = "<dict>") -> MDMConfig:
    """Strictly parse and validate a full config mapping."""
    return from_dict(MDMConfig, data or {}, source).validate(source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> MDMConfig:
    """Read a YAML config file, apply `--set` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (it is not UTF-8)") from None
    data = read_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, diffusion, ...), got {type(data).__name__}")
    if overrides:
        apply_overrides(data, overrides)
    return config_from_dict(data, str(path))


def save_config(cfg: MDMConfig, path: str | Path) -> None:
    """Write the full resolved config as YAML, atomically."""
    io.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


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
