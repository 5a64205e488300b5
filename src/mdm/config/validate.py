"""The rules a config must satisfy, one line each; checked once, when a config is loaded, and never mutating it.

A broken rule raises :class:`ConfigError` naming the source, the key and what was expected.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mdm.config.parse import ConfigError
from mdm.config.ratios import mixed_rows
from mdm.data.moving_shapes import MOTIONS

if TYPE_CHECKING:
    from mdm.config.schema import MDMConfig, UNetConfig


class _Rules:
    """`rule(ok, key, message)` raises naming the config source and the key when `ok` is false."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{self.source}: '{key}' {message}")

    def finite(self, values: object, key: str) -> None:
        """Every number in `values` (a number, a list or None) is finite."""
        items = values if isinstance(values, list) else [values]
        bad = [v for v in items if isinstance(v, float) and not math.isfinite(v)]
        self(not bad, key, f"must be finite, got {values}")


# fmt: off
# One rule per line reads better here than the formatter's wrapping (E501 is off for this file in pyproject).


def validate(cfg: MDMConfig, source: str = "<config>") -> None:
    """Every cross-field rule of a full config."""
    rule = _Rules(source)
    _model(cfg, rule)
    _diffusion(cfg, rule)
    _text(cfg, rule)
    _train(cfg, rule)
    _data(cfg, rule)


def _level(level: UNetConfig, key: str, rule: _Rules, innermost: bool, temb: int) -> None:
    n = len(level.channels)
    rule(n >= 1, f"{key}.channels", "must list at least one width")
    for i, c in enumerate(level.channels):
        rule(c > 0, f"{key}.channels[{i}]", f"must be positive, got {c}")
        rule(c % level.num_groups == 0, f"{key}.channels[{i}]", f"= {c} is not divisible by num_groups = {level.num_groups}")
    for name in ("num_res_blocks", "num_attention_layers"):
        values = getattr(level, name)
        rule(len(values) == n, f"{key}.{name}", f"must have one entry or one per stage ({n}), got {values}")
    rule(all(r >= 1 for r in level.num_res_blocks), f"{key}.num_res_blocks", "entries must be >= 1")
    rule(all(r >= 0 for r in level.num_attention_layers), f"{key}.num_attention_layers", "entries must be >= 0")
    rule(level.num_heads >= 1, f"{key}.num_heads", f"must be >= 1, got {level.num_heads}")
    rule(level.num_groups >= 1, f"{key}.num_groups", f"must be >= 1, got {level.num_groups}")
    for a in level.attention_levels:
        rule(0 <= a < n, f"{key}.attention_levels", f"entry {a} is not a stage index in [0, {n})")
        c = level.channels[a]
        rule(c % level.num_heads == 0, f"{key}.channels[{a}]", f"= {c} (an attention stage) is not divisible by num_heads = {level.num_heads}")
        rule(c % 32 == 0, f"{key}.channels[{a}]", f"= {c} (an attention stage) must be divisible by 32")
    own = level.time_width()
    rule(own % 8 == 0, f"{key}.temb_dim", f"= {own} must be divisible by 8")
    rule(own == temb, f"{key}.temb_dim", f"= {own} must equal the innermost level's time width {temb} (the pooled text is shared)")
    rule(0.0 <= level.dropout < 1.0, f"{key}.dropout", f"must be in [0, 1), got {level.dropout}")
    for name, value in level.micro_conditioning.items():
        rule(math.isfinite(value), f"{key}.micro_conditioning.{name}", f"must be finite, got {value}")
    scale = level.micro_conditioning.get("scale")
    rule(scale is None or scale > 0, f"{key}.micro_conditioning.scale", f"must be > 0, got {scale}")
    if innermost:
        rule(not level.normalize_input, f"{key}.normalize_input", "applies to outer levels only")
        return
    rule(level.mid_blocks is not True, f"{key}.mid_blocks", "must be unset on a nested level (its bottleneck is the inner network)")
    for name in ("text_proj_dim", "num_lm_head_layers"):
        rule(getattr(level, name) == 0, f"{key}.{name}", "belongs to the innermost level only")


def _model(cfg: MDMConfig, rule: _Rules) -> None:
    m = cfg.model
    levels = m.unet.levels()
    inner = levels[-1]
    key = "model.unet"
    for i, level in enumerate(levels):
        _level(level, key, rule, innermost=i == len(levels) - 1, temb=inner.time_width())
        key += ".inner"
    factor = math.prod(2 ** (len(level.channels) - 1) for level in levels if level.resample == "space")
    rule(m.image_size > 0, "model.image_size", "must be positive")
    rule(m.image_size % factor == 0, "model.image_size", f"= {m.image_size} is not divisible by {factor}, the product of every level's down-sampling (2**(stages-1) per space level)")
    _frames(cfg, rule)
    rule(m.in_channels > 0, "model.in_channels", "must be positive")
    rule(m.out_channels > 0, "model.out_channels", "must be positive")
    rule(m.text_dim >= 0 and m.num_classes >= 0, "model.text_dim/num_classes", "must be >= 0")
    rule(inner.text_proj_dim >= 0 and inner.num_lm_head_layers >= 0, "model.unet...text_proj_dim", "must be >= 0")
    if m.class_names is not None:
        rule(len(m.class_names) == m.num_classes, "model.class_names", f"needs one name per class ({m.num_classes}), got {len(m.class_names)}")
    if m.num_classes > 0:
        rule(m.context_dim() > 0, "model.num_classes", "needs a conditioning width: set the innermost level's text_proj_dim (or model.text_dim)")
    if m.context_dim() > 0 and inner.num_lm_head_layers > 0:
        rule(m.context_dim() % inner.num_heads == 0, "model.unet...num_lm_head_layers", "needs width % num_heads == 0")


def _frames(cfg: MDMConfig, rule: _Rules) -> None:
    """Video layouts: a time level halves its frames once per stage, and temporal attention splits into heads."""
    m = cfg.model
    rule(m.num_frames >= 1, "model.num_frames", f"must be >= 1, got {m.num_frames}")
    key = "model.unet"
    for level, (frames, _) in zip(m.unet.levels(), m.level_shapes(), strict=True):
        halvings = len(level.channels) - 1
        if level.resample == "time":
            rule(frames >= 2**halvings, f"{key}.resample", f"= time halves the frames {halvings} time(s), but this level gets {frames} frame(s) (model.num_frames = {m.num_frames}, after the outer time levels): fewer than one would be left")
            rule(frames % 2**halvings == 0, f"{key}.resample", f"= time halves the frames {halvings} time(s): this level's {frames} frames are not divisible by {2**halvings}")
        for i, c in enumerate(level.channels):
            stage_frames = frames // 2**i if level.resample == "time" else frames
            if level.temporal_attention and stage_frames > 1:
                rule(c % (2 * level.num_heads) == 0, f"{key}.channels[{i}]", f"= {c} (a stage with temporal attention) is not divisible by 2 x num_heads = {2 * level.num_heads}")
        key += ".inner"
    if m.is_video():
        rule(cfg.diffusion.mixed_ratio is None, "diffusion.mixed_ratio", "is not supported for video models (model.num_frames > 1)")


def _diffusion(cfg: MDMConfig, rule: _Rules) -> None:
    d, n = cfg.diffusion, len(cfg.model.unet.levels())
    for name in ("beta_start", "beta_end", "logsnr_min", "logsnr_max", "shift_power", "cond_drop_prob", "eta"):
        rule.finite(getattr(d, name), f"diffusion.{name}")
    if d.level_weights is not None:
        rule.finite(d.level_weights, "diffusion.level_weights")
        rule(len(d.level_weights) == n, "diffusion.level_weights", f"needs one weight per level ({n}), got {d.level_weights}")
        rule(all(w >= 0 for w in d.level_weights), "diffusion.level_weights", f"must be >= 0, got {d.level_weights}")
    if d.mixed_ratio is not None:
        rule.finite(d.mixed_ratio, "diffusion.mixed_ratio")
        rule(len(d.mixed_ratio) == n and all(r > 0 for r in d.mixed_ratio), "diffusion.mixed_ratio", f"needs {n} positive parts (highest level first), got {d.mixed_ratio}")
    rule(d.num_train_timesteps >= 2, "diffusion.num_train_timesteps", "must be >= 2")
    rule(0.0 <= d.cond_drop_prob < 1.0, "diffusion.cond_drop_prob", "must be in [0, 1)")
    rule(d.shift_power >= 0, "diffusion.shift_power", "must be >= 0")
    rule(d.shift_base_size is None or d.shift_base_size > 0, "diffusion.shift_base_size", "must be positive")
    rule(0 < d.beta_start < d.beta_end < 1, "diffusion.beta_start/beta_end", "need 0 < start < end < 1")
    rule(d.logsnr_min < d.logsnr_max, "diffusion.logsnr_min", "must be below logsnr_max")
    rule(d.eta >= 0, "diffusion.eta", f"must be >= 0, got {d.eta}")
    rule(d.eta == 0 or d.sampler == "ddim", "diffusion.eta", f"is DDIM's noise level; diffusion.sampler = {d.sampler} takes none")
    gi = d.guidance_interval
    if gi is not None:
        rule(len(gi) == 2 and gi[0] <= gi[1], "diffusion.guidance_interval", f"needs [lo, hi] with lo <= hi (the lowest level's logSNR; -.inf / .inf for no bound), got {gi}")
    rule(d.guided_levels == "all" or d.level_projection, "diffusion.guided_levels", "= lowest needs diffusion.level_projection = true (the levels above take the guided content only through it)")


def _text(cfg: MDMConfig, rule: _Rules) -> None:
    t = cfg.text
    rule(t.max_length > 0, "text.max_length", "must be positive")
    rule(t.max_chars > 0, "text.max_chars", "must be positive")
    if t.encoder is not None:
        rule(cfg.model.text_dim > 0, "text.encoder", "is set, but model.text_dim = 0 (the model takes no text)")
    if t.encoder in ("t5", "clip"):
        rule(t.path is not None, "text.path", f"is needed for text.encoder = {t.encoder} (a directory or hub id)")
    rule(t.vocab is None or t.encoder == "t5", "text.vocab", "applies to text.encoder = t5 only")
    rule(t.word_buckets >= 0, "text.word_buckets", "must be >= 0")
    rule(t.word_buckets == 0 or t.encoder == "bytes", "text.word_buckets", "applies to text.encoder = bytes only")


def _train(cfg: MDMConfig, rule: _Rules) -> None:
    tr, n_levels = cfg.train, len(cfg.model.unet.levels())
    for name in ("lr", "eps", "weight_decay", "min_lr_ratio", "grad_clip", "ema_decay", "sample_guidance"):
        rule.finite(getattr(tr, name), f"train.{name}")
    rule.finite(tr.betas, "train.betas")
    for name in ("batch_size", "grad_accum", "steps", "keep_checkpoints", "max_nonfinite", "sample_steps", "log_every"):
        rule(getattr(tr, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(tr, name)}")
    for name in ("warmup_steps", "checkpoint_every", "sample_every", "sample_count"):
        rule(getattr(tr, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(tr, name)}")
    rule(tr.lr > 0, "train.lr", f"must be positive, got {tr.lr}")
    rule(tr.eps > 0, "train.eps", f"must be positive, got {tr.eps}")
    rule(tr.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {tr.weight_decay}")
    rule(len(tr.betas) == 2 and all(0 <= b < 1 for b in tr.betas), "train.betas", "needs two values in [0, 1)")
    rule(0 <= tr.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {tr.ema_decay}")
    rule(0 <= tr.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    rule(tr.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    rule(tr.sample_guidance >= 0, "train.sample_guidance", f"must be >= 0, got {tr.sample_guidance}")
    previous = 0
    for i, ph in enumerate(tr.phases):
        key = f"train.phases[{i}]"
        rule.finite(ph.lr, f"{key}.lr")
        rule(max(previous, 1) <= ph.levels <= n_levels, f"{key}.levels", f"= {ph.levels} must be at least 1 and the previous phase's {previous}, and at most the model's {n_levels} levels")
        rule(ph.levels > previous or ph.freeze_inner_steps == 0, f"{key}.freeze_inner_steps", f"must be 0: the phase refines the previous phase's {previous} level(s), with nothing new around them")
        span, T = ph.timesteps, cfg.diffusion.num_train_timesteps
        rule(span is None or (len(span) == 2 and 0 <= span[0] < span[1] <= T), f"{key}.timesteps", f"needs [lo, hi] with 0 <= lo < hi <= diffusion.num_train_timesteps ({T}), got {span}")
        rule.finite(ph.timesteps_share, f"{key}.timesteps_share")
        rule(0 < ph.timesteps_share <= 1, f"{key}.timesteps_share", f"must be in (0, 1], got {ph.timesteps_share}")
        rule(span is not None or ph.timesteps_share == 1, f"{key}.timesteps_share", "needs timesteps: [lo, hi] to draw that share from")
        rule(ph.steps >= 1, f"{key}.steps", "must be >= 1")
        rule(0 <= ph.freeze_inner_steps <= ph.steps, f"{key}.freeze_inner_steps", "must be in [0, steps]")
        rule(ph.batch_size is None or ph.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        rule(ph.lr is None or ph.lr > 0, f"{key}.lr", "must be positive")
        if ph.mixed_ratio is not None:
            rule.finite(ph.mixed_ratio, f"{key}.mixed_ratio")
            rule(len(ph.mixed_ratio) == ph.levels and all(r > 0 for r in ph.mixed_ratio), f"{key}.mixed_ratio", f"needs {ph.levels} positive parts (highest level first), got {ph.mixed_ratio}")
        ratio, batch = cfg.phase_mixed_ratio(ph), ph.batch_size or tr.batch_size
        rule(ratio is None or not cfg.model.inner_model(ph.levels).is_video(), f"{key}.mixed_ratio", "is not supported for a phase that trains video levels (more than one frame)")
        for j, rows in enumerate(mixed_rows(ratio, batch, ph.levels)):
            rule(rows >= 1, f"{key}.batch_size", f"= {batch} gives level {j} of the mixed ratio {ratio} no rows; raise the batch size")
        previous = ph.levels


def _data(cfg: MDMConfig, rule: _Rules) -> None:
    data = cfg.data
    rule.finite(data.max_bad_fraction, "data.max_bad_fraction")
    rule(data.num_samples >= 1, "data.num_samples", "must be >= 1")
    rule(data.num_workers >= 0, "data.num_workers", "must be >= 0")
    rule(data.min_size >= 0, "data.min_size", f"must be >= 0, got {data.min_size}")
    rule(data.max_pixels >= 1, "data.max_pixels", f"must be >= 1, got {data.max_pixels}")
    rule(0 <= data.max_bad_fraction < 1, "data.max_bad_fraction", "must be in [0, 1)")
    rule(data.dataset in ("shapes", "moving_shapes") or bool(data.path), "data.path", f"is required for data.dataset = {data.dataset}")
    rule(data.frame_stride >= 1, "data.frame_stride", f"must be >= 1, got {data.frame_stride}")
    unknown = [m for m in data.motions if m not in MOTIONS]
    rule(not unknown, "data.motions", f"has unknown motions {unknown}; expected names from {list(MOTIONS)}")
    rule(bool(data.motions) and len(set(data.motions)) == len(data.motions), "data.motions", f"must be distinct and not empty, got {data.motions}")
