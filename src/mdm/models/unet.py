"""The NestedUNet: a UNet whose bottleneck is the UNet of the next lower resolution, any depth.

A one-level config gives a plain UNet. Levels are joined by zero-initialised 3x3 adapters (`in_adapter` into
the inner network's first features, `out_adapter` back), so growing a model by one outer level leaves the
inner predictions unchanged. Module names follow ml-mdm, so its state dicts load by identity.

A video model (`num_frames` > 1) takes N C T H W clips at every level. Inside, frames are folded into the batch
so the 2-D layers run per frame; stages with more than one frame add temporal attention, and the stages of a
"time" level halve the frames instead of the side. Its one-frame levels are exactly an image model's levels
(same modules, same keys), so a trained image model loads into them.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mdm.config import ModelConfig, UNetConfig
from mdm.models.blocks import (
    Attention1D,
    Attention2D,
    ResNet,
    TextBlock,
    position_code,
    sinusoidal_embedding,
    timestep_frequencies,
    zero_,
)
from mdm.models.conditioning import Conditioning
from mdm.models.temporal import TemporalAttention, TemporalDownsample, TemporalUpsample, fold, unfold


def _embed_dtype(weight: torch.Tensor) -> torch.dtype:
    """Sinusoids are evaluated in float64 for float64 models and in float32 otherwise (never in bf16/fp16)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class LevelBlock(nn.Module):
    """One stage of a UNet path: ResNets (each followed by its attention layers), then optional resampling.

    On the up path each ResNet first concatenates [x, skip]. Returns the output and every recorded activation
    (after each ResNet+attention, and after resampling), which the down path hands to the up path as skips.
    With `frames` > 1, x holds (N T) frames: the time embedding, context and mask (N rows) are repeated per frame,
    temporal attention (when enabled) follows each ResNet's attention layers, and a "time" block resamples frames.
    """

    def __init__(
        self,
        widths: list[tuple[int, int]],
        temb_dim: int,
        groups: int,
        dropout: float,
        attn_layers: int,
        heads: int,
        context_dim: int,
        ffn: bool,
        resample: str | None,
        fp32_islands: bool,
        frames: int = 1,
        resample_axis: str = "space",
        temporal_attention: bool = False,
        frame_positions: str = "rotary",
    ) -> None:
        super().__init__()
        self.fp32_islands = fp32_islands
        self.attn_layers = attn_layers
        self.frames = frames
        self.resnets = nn.ModuleList(ResNet(ci, co, temb_dim, groups, dropout) for ci, co in widths)
        if attn_layers > 0:
            self.attn = nn.ModuleList(
                Attention2D(co, heads, context_dim, ffn, fp32_islands) for _, co in widths for _ in range(attn_layers)
            )
        self.temporal_attn = (
            nn.ModuleList(TemporalAttention(co, heads, frames, frame_positions, ffn, fp32_islands) for _, co in widths)
            if temporal_attention and frames > 1
            else None
        )
        self.resample_mode = resample
        self.resample_axis = resample_axis
        if resample is not None:
            c = widths[-1][1]
            if resample_axis == "time":
                self.resample = (TemporalDownsample if resample == "down" else TemporalUpsample)(c, frames)
            else:
                self.resample = nn.Conv2d(c, c, 3, stride=2 if resample == "down" else 1, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor | None,
        mask: torch.Tensor | None,
        skips: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.frames > 1:
            temb = temb.repeat_interleave(self.frames, dim=0)
            context = None if context is None else context.repeat_interleave(self.frames, dim=0)
            mask = None if mask is None else mask.repeat_interleave(self.frames, dim=0)
        acts = []
        for r, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips[-1 - r]], dim=1)
            x = resnet(x, temb)
            for j in range(self.attn_layers):
                x = self.attn[r * self.attn_layers + j](x, context, mask)
            if self.temporal_attn is not None:
                x = self.temporal_attn[r](x)
            acts.append(x)
        if self.resample_mode == "up" and self.resample_axis == "space":
            if self.fp32_islands and x.dtype == torch.float64:
                x = F.interpolate(x.float(), scale_factor=2, mode="nearest").to(x.dtype)
            else:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample_mode is not None:
            x = self.resample(x)
            acts.append(x)
        return x, acts


class NestedUNet(nn.Module):
    """Denoiser over a pyramid: `unet(z_levels, t, cond) -> predictions`, lists highest resolution first."""

    def __init__(
        self, config: ModelConfig, level: UNetConfig | None = None, nested: bool = False, frames: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        level = config.unet if level is None else level
        self.level = level
        self.nested = nested
        self.frames = config.num_frames if frames is None else frames  # frames this level takes (1: an image level)
        depth = next(i for i, lv in enumerate(config.unet.levels()) if lv is level)
        self.side = config.level_shapes()[depth][1]  # the side of this level's frames
        self.innermost = level.inner is None
        islands = config.fp32_islands
        ctx = config.context_dim()
        temb = level.time_width()
        self.temb_dim = temb
        groups, drop = level.num_groups, level.dropout

        self.temb_layer1 = nn.Linear(temb // 4, temb)
        self.temb_layer2 = nn.Linear(temb, temb)
        if level.micro_conditioning:
            self.cond_layers = nn.ModuleDict(
                {
                    name: nn.ModuleList([nn.Linear(temb // 4, temb), zero_(nn.Linear(temb, temb))])
                    for name in level.micro_conditioning
                }
            )
        conditioned = self.innermost and ctx > 0  # the condition enters at the innermost level only
        self.cond_emb = nn.Linear(ctx, temb, bias=False) if conditioned else None
        projected = conditioned and config.text_dim > 0 and level.text_proj_dim > 0
        self.lm_proj = nn.Linear(config.text_dim, level.text_proj_dim) if projected else None
        classes = conditioned and config.num_classes > 0
        self.class_emb = nn.Embedding(config.num_classes + 1, ctx) if classes else None  # + the null class
        heads = level.num_lm_head_layers if conditioned else 0
        self.lm_head = nn.ModuleList(TextBlock(ctx, 8, islands) for _ in range(heads))

        ch = level.channels
        n = len(ch)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        # Zero padding tells a pixel little of where it is: a condition that says where things go (a motion word that
        # fixes where a clip starts) is learnt only with an absolute position. It starts as a 2-D sinusoidal code: from
        # zero it grew too slowly to stand out of the noise at the start of sampling, where the layout is decided.
        self.position_embedding = nn.Parameter(position_code(ch[0], self.side)) if level.position_embedding else None
        skip_widths = [ch[0]]
        c = ch[0]
        down = []
        for i in range(n):
            widths = []
            for _ in range(level.num_res_blocks[i]):
                widths.append((c, ch[i]))
                c = ch[i]
                skip_widths.append(c)
            if i != n - 1:
                skip_widths.append(c)
            down.append(self._block(widths, i, ctx, "down" if i != n - 1 else None))
        self.down_blocks = nn.ModuleList(down)

        self.mid_blocks = None  # innermost bottleneck: ResNet + attention, then ResNet (optional)
        if self.innermost and level.mid_blocks is not False:
            mid = dict(
                widths=[(c, c)],
                temb_dim=temb,
                groups=groups,
                dropout=drop,
                heads=level.num_heads,
                resample=None,
                frames=self._stage_frames(n - 1),
                temporal_attention=level.temporal_attention,
                frame_positions=config.frame_positions,
            )
            self.mid_blocks = nn.ModuleList(
                [
                    LevelBlock(**mid, attn_layers=1, context_dim=ctx, ffn=level.attention_ffn, fp32_islands=islands),
                    LevelBlock(**mid, attn_layers=0, context_dim=0, ffn=False, fp32_islands=islands),
                ]
            )
        self.inner_fixed = False  # see fix_inner
        if not self.innermost:
            self.inner_unet = NestedUNet(config, level.inner, nested=True, frames=self._stage_frames(n - 1))
            inner_c0 = level.inner.channels[0]
            self.in_adapter = zero_(nn.Conv2d(c, inner_c0, 3, padding=1))
            self.out_adapter = zero_(nn.Conv2d(inner_c0, c, 3, padding=1))

        up = []
        for i in reversed(range(n)):
            widths = []
            for _ in range(level.num_res_blocks[i] + 1):
                widths.append((c + skip_widths.pop(), ch[i]))
                c = ch[i]
            up.append(self._block(widths, i, ctx, "up" if i != 0 else None))
        self.up_blocks = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = zero_(nn.Conv2d(c, config.out_channels, 3, padding=1))

    def _block(self, widths: list[tuple[int, int]], stage: int, ctx: int, resample: str | None) -> LevelBlock:
        lv = self.level
        attn = lv.num_attention_layers[stage] if stage in lv.attention_levels else 0
        return LevelBlock(
            widths=widths,  # (in, out) channels of each ResNet
            temb_dim=self.temb_dim,  # time-embedding width
            groups=lv.num_groups,  # GroupNorm groups
            dropout=lv.dropout,  # dropout inside the ResNets
            attn_layers=attn,  # attention layers after each ResNet
            heads=lv.num_heads,  # attention heads
            context_dim=ctx,  # cross-attention width (0 = none)
            ffn=lv.attention_ffn,  # feed-forward after each attention
            resample=resample,  # "down", "up" or None
            fp32_islands=self.config.fp32_islands,  # float32 x2 upsampling and softmax
            frames=self._stage_frames(stage),  # frames at this stage, folded into the batch
            resample_axis=lv.resample,  # the axis `resample` halves or doubles: "space" or "time"
            temporal_attention=lv.temporal_attention,  # attention over frames after each ResNet (> 1 frame)
            frame_positions=self.config.frame_positions,  # how that attention sees frame order
        )

    def _stage_frames(self, stage: int) -> int:
        """Frames at `stage` of this level: a time level halves them per stage, a space level keeps them."""
        return self.frames // 2**stage if self.level.resample == "time" else self.frames

    # ------------------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        """Number of resolution levels."""
        return len(self.level.levels())

    def levels(self) -> list[NestedUNet]:
        """The level modules, outermost first."""
        out = [self]
        while not out[-1].innermost:
            out.append(out[-1].inner_unet)
        return out

    def inner_parameters(self) -> list[nn.Parameter]:
        """The inner levels' parameters and the adapter feeding them this level's features: what freezing the
        inner levels holds fixed (the adapter starts at zero, so held there they predict exactly as before)."""
        return [*self.inner_unet.parameters(), *self.in_adapter.parameters()]

    def fix_inner(self) -> None:
        """Make `inner_parameters` a fixed function: no gradients, and no autograd graph through them, so training
        only this level skips the inner network's backward. Exact while the adapter is zero, as when this level is
        new: no gradient could then reach this level through the inner ones."""
        for p in self.inner_parameters():
            p.requires_grad_(False)
        self.inner_fixed = True

    def set_fp32_islands(self, enabled: bool) -> None:
        """Switch ml-mdm's float32 islands (time frequencies, softmax, upsampling) on or off everywhere."""
        for module in self.modules():
            if isinstance(module, NestedUNet):
                module.config = dataclasses.replace(module.config, fp32_islands=enabled)
            elif isinstance(module, (Attention1D, Attention2D, LevelBlock, TemporalAttention)):
                module.fp32_islands = enabled

    def _sinusoid_mlp(self, values: torch.Tensor, l1: nn.Linear, l2: nn.Linear) -> torch.Tensor:
        freqs = timestep_frequencies(self.temb_dim, self.config.fp32_islands).to(values.device, _embed_dtype(l1.weight))
        emb = sinusoidal_embedding(values, freqs).to(l1.weight.dtype)
        return l2(F.silu(l1(emb)))

    def _time_embedding(self, t: torch.Tensor, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """Time MLP(t) plus one sinusoid MLP per micro-conditioning value ('scale' is capped at its default)."""
        temb = self._sinusoid_mlp(t, self.temb_layer1, self.temb_layer2)
        for name, default in self.level.micro_conditioning.items():
            value = micro.get(name)
            value = torch.full(t.shape, default, device=t.device) if value is None else value.to(t.device)
            value = (value / default).clamp(max=1) * default if name == "scale" else value * 1000
            temb = temb + self._sinusoid_mlp(value, *self.cond_layers[name])
        return temb

    def _condition(
        self, cond: Conditioning | None, batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Innermost only: (pooled embedding, context tokens, cross-attention mask or None)."""
        if self.cond_emb is None:
            if cond is not None and cond.batch_size is not None:
                raise ValueError("this model is unconditional: it takes no labels or text")
            return None, None, None
        if cond is None or cond.batch_size is None:
            raise ValueError("this model is conditional: pass Conditioning(labels=...) or Conditioning(text=...)")
        if cond.batch_size != batch:
            raise ValueError(f"condition batch {cond.batch_size} does not match the input batch {batch}")
        dtype = self.cond_emb.weight.dtype
        if cond.labels is not None:
            if self.class_emb is None:
                raise ValueError("this model takes text, not class labels (model.num_classes = 0)")
            n = self.config.num_classes
            if cond.labels.min() < 0 or cond.labels.max() > n:
                raise ValueError(f"class labels must be in [0, {n}] ({n} = null class), got {cond.labels.tolist()}")
            tokens = self.class_emb(cond.labels)[:, None]
            mask = None
        else:
            if self.config.text_dim == 0:
                raise ValueError("this model takes class labels, not text (model.text_dim = 0)")
            if cond.text.shape[-1] != self.config.text_dim:
                raise ValueError(f"text features must be {self.config.text_dim} wide, got {cond.text.shape[-1]}")
            tokens = cond.text.to(dtype)
            if self.lm_proj is not None:
                tokens = self.lm_proj(tokens)
            mask = cond.text_mask
        masked = self.level.masked_cross_attention
        for block in self.lm_head:
            tokens = block(tokens, mask if masked else None)
        if mask is None or (not masked and len(self.lm_head) > 0):
            pooled = tokens.mean(dim=1)
        else:
            m = mask.to(tokens.dtype)[..., None]
            pooled = (m * tokens).sum(1) / m.sum(1)
        return self.cond_emb(pooled), tokens, (mask if masked else None)

    def _run(self, block: nn.Module, *args: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _denoise(
        self,
        zs: list[torch.Tensor],
        t: torch.Tensor,
        cemb: torch.Tensor | None,
        ctx: torch.Tensor | None,
        mask: torch.Tensor | None,
        micro: dict[str, torch.Tensor],
        feat: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Denoise this level and everything inside it; returns predictions and pre-`norm_out` features.

        Clips arrive folded, (N T) C H W per level; `t`, `cemb`, `ctx` and `mask` have one row per sample."""
        temb = self._time_embedding(t, micro)
        if cemb is not None:
            temb = temb + cemb
        z = zs[0]
        bh = z.shape[0] // self.frames  # samples at this level (lower levels may have more)
        if self.level.normalize_input and self.frames == 1:
            z = z / z.std(dim=(1, 2, 3), keepdim=True)
        elif self.level.normalize_input:
            clips = z.unflatten(0, (bh, self.frames))
            z = (clips / clips.std(dim=(1, 2, 3, 4), keepdim=True)).flatten(0, 1)
        x = self.conv_in(z.to(self.conv_in.weight.dtype))
        if self.position_embedding is not None:
            if x.shape[-2:] != self.position_embedding.shape[-2:]:
                raise ValueError(
                    f"this level's position embedding is for {self.side}x{self.side} frames (model.image_size = "
                    f"{self.config.image_size}); it cannot take {x.shape[-2]}x{x.shape[-1]}"
                )
            x = x + self.position_embedding.to(x.dtype)
        if feat is not None:
            x = x + feat
        temb_h = temb[:bh]
        ctx_h = None if ctx is None else ctx[:bh]
        mask_h = None if mask is None else mask[:bh]
        skips = [x]
        for block in self.down_blocks:
            x, acts = self._run(block, x, temb_h, ctx_h, mask_h)
            skips.extend(acts)
        if self.innermost:
            lower: list[torch.Tensor] = []
            for block in self.mid_blocks or []:
                x, _ = self._run(block, x, temb_h, ctx_h, mask_h)
        else:
            a = self.in_adapter(x)
            own, bl = a.shape[0], zs[1].shape[0]
            if bl > own:
                a = torch.cat([a, a.new_zeros(bl - own, *a.shape[1:])])
            with torch.no_grad() if self.inner_fixed else contextlib.nullcontext():
                lower, inner_feat = self.inner_unet._denoise(zs[1:], t, cemb, ctx, mask, micro, a)
            x = x + self.out_adapter(inner_feat)[:own]
        for block in self.up_blocks:
            k = len(block.resnets)
            x, _ = self._run(block, x, temb_h, ctx_h, mask_h, skips[-k:])
            del skips[-k:]
        out = self.conv_out(F.silu(self.norm_out(x)))
        return [out, *lower], x

    def forward(
        self,
        z_levels: list[torch.Tensor] | torch.Tensor,
        t: torch.Tensor | int,
        cond: Conditioning | None = None,
    ) -> list[torch.Tensor]:
        """Predict every level from the noisy pyramid `z_levels` (highest first) at network time input `t`.

        Images are (B, C, H, W) per level; a video model's levels are (B, C, T, H, W), T its configured frames
        (1 at image levels). Lower levels may carry more rows than higher ones (mixed-resolution batches): level
        l then denoises the first rows only, and `t` and `cond` follow the largest batch.
        """
        if self.nested:
            raise RuntimeError("call the outermost NestedUNet, not an inner level")
        zs = [z_levels] if isinstance(z_levels, torch.Tensor) else list(z_levels)
        shapes = self.config.level_shapes()
        sizes = [side for _, side in shapes]
        if len(zs) != len(sizes):
            raise ValueError(
                f"expected {len(sizes)} levels (sides {sizes} for image_size {self.config.image_size}), got {len(zs)}"
            )
        ratio = [sizes[i] // sizes[-1] for i in range(len(sizes))]
        base = zs[-1].shape[-1]
        video, c = self.config.is_video(), self.config.in_channels
        for i, (z, (frames, _)) in enumerate(zip(zs, shapes, strict=True)):
            if video and (z.dim() != 5 or z.shape[1] != c or z.shape[2] != frames):
                raise ValueError(f"level {i} must be (B, {c}, {frames}, H, W) (a video model), got {tuple(z.shape)}")
            if not video and (z.dim() != 4 or z.shape[1] != c):
                raise ValueError(f"level {i} must be (B, {c}, H, W), got {tuple(z.shape)}")
            if z.shape[-1] != base * ratio[i] or z.shape[-2] != zs[-1].shape[-2] * ratio[i]:
                raise ValueError(
                    f"level {i} has side {tuple(z.shape[-2:])}; sides must keep the ratios {ratio} "
                    f"of the model (got lowest {tuple(zs[-1].shape[-2:])})"
                )
            if i and z.shape[0] < zs[i - 1].shape[0]:
                raise ValueError("a lower level may not have fewer rows than the level above it")
        batch = zs[-1].shape[0]
        t = torch.as_tensor(t, device=zs[-1].device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        cemb, ctx, mask = self.levels()[-1]._condition(cond, batch)
        micro = {} if cond is None else cond.micro
        if not video:
            return self._denoise(zs, t, cemb, ctx, mask, micro)[0]
        outs, _ = self._denoise([fold(z) for z in zs], t, cemb, ctx, mask, micro)
        return [unfold(o, frames) for o, (frames, _) in zip(outs, shapes, strict=True)]
