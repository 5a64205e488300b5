"""MDMPipeline: a NestedUNet, its diffusion settings and (optionally) a text encoder, shaped like a diffusers
pipeline: `from_pretrained`, `save_pretrained`, and a `__call__` that returns images at every level.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors.torch import save_file

from mdm import io
from mdm.conditions import Conditioner, Conditions, Labels
from mdm.config import MDMConfig, load_config, save_config
from mdm.config.schema import GuidedLevels
from mdm.diffusion.guidance import Guidance, guidance_on
from mdm.diffusion.process import MultiLevelDiffusion, Pyramid
from mdm.diffusion.samplers import (
    Generators,
    SampleResult,
    StepCallback,
    X0Callback,
    check_generators,
    per_sample_noise,
    run,
)
from mdm.diffusion.schedule import sampling_timesteps
from mdm.images import to_pil
from mdm.io import to_uint8
from mdm.models.temporal import fold
from mdm.models.unet import NestedUNet
from mdm.text.base import TextEncoder
from mdm.text.encoders import load_text_encoder

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"


OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class MDMPipelineOutput:
    """`images`: top-level results; `levels`: one entry per level, highest first (PIL lists, arrays or tensors);
    `titles`: what each sample was asked for (class, prompt, or 'sample i'); `nfe`: network calls made.

    `videos` (video models; None for image models): one entry per level, highest first, with per sample a list
    of T PIL frames ("pil"), uint8 (N, T, H, W, C) ("np") or floats (N, C, T, H, W) in [-1, 1] ("pt"); a video
    model's `levels` is this list and its `images` the top level's videos."""

    images: Any
    levels: list[Any]
    titles: list[str]
    nfe: int  # network evaluations (a guided call of both branches counts once)
    videos: list[Any] | None = None


@dataclass(frozen=True)
class SamplingSettings:
    """One call's sampling choices with the model's defaults filled in (`MDMPipeline.settle`)."""

    sampler: str
    spacing: str
    eta: float  # DDIM's noise level (0 for the other samplers)
    level_projection: bool
    guidance: Guidance


def _resolve_dir(path: str | os.PathLike) -> Path:
    """A local model directory, or a hub id fetched with huggingface_hub when it is installed."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{p}: expected a model directory ({CONFIG_NAME} + {WEIGHTS_NAME})")
    if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise FileNotFoundError(f"{path}: no such directory (install huggingface_hub to load hub ids)") from None
        try:
            return Path(snapshot_download(str(path), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
        except Exception as e:  # offline mode, a missing repo and network errors all land here
            raise FileNotFoundError(
                f"{path}: not a local directory, and the hub id could not be fetched ({type(e).__name__}); "
                f"loading a hub id needs the network (HF_HUB_OFFLINE unset), else give a local model directory"
            ) from None
    raise FileNotFoundError(f"{path}: no such model directory")


class MDMPipeline:
    """Sample Matryoshka Diffusion Models: `pipe(class_labels=[3, 7])`, `pipe(prompt="a red circle")`.

    Without an explicit `text_encoder`, the one the config names (`text.encoder`, `text.path`) is loaded the
    first time a prompt is encoded.
    """

    def __init__(
        self,
        unet: NestedUNet,
        config: MDMConfig,
        text_encoder: TextEncoder | None = None,
        provenance: dict[str, str] | None = None,
    ) -> None:
        self.unet = unet
        self.config = config
        self._text_encoder = text_encoder
        self.provenance = dict(provenance or {})
        self.diffusion = MultiLevelDiffusion(config.diffusion, config.model.level_shapes())
        self.progress = True

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        text_encoder: TextEncoder | None = None,
    ) -> MDMPipeline:
        """Load `config.yaml` + `model.safetensors` from a directory (or a hub id); nothing is unpickled."""
        d = _resolve_dir(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d}: missing {name}")
        config = load_config(d / CONFIG_NAME)
        with torch.device("meta"):
            unet = NestedUNet(config.model)
        state, metadata = io.read_safetensors(d / WEIGHTS_NAME)
        io.check_keys(unet.state_dict(), state, f"{d / WEIGHTS_NAME} does not match {d / CONFIG_NAME}")
        unet.load_state_dict(state, strict=True, assign=True)
        unet = unet.to(device=device, dtype=dtype).eval()
        provenance = {k: v for k, v in metadata.items() if k != "format"}
        return cls(unet, config, text_encoder=text_encoder, provenance=provenance)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `config.yaml` and `model.safetensors` into `path` (built in a temporary folder, then moved)."""
        with io.atomic_dir(path) as tmp:
            save_config(self.config, tmp / CONFIG_NAME)
            state = {k: v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "mdm/1", **self.provenance})
        return Path(path)

    @property
    def text_encoder(self) -> TextEncoder | None:
        """The prompt encoder: the one given, else the config's (loaded on first use), else None.

        A training feature cache (`text.cache`) is used when it is still there; without it the encoder runs.
        """
        text = self.config.text
        if self._text_encoder is None and text.encoder is not None:
            if text.cache is not None and not Path(text.cache).is_dir():
                text = dataclasses.replace(text, cache=None)
            self._text_encoder = load_text_encoder(text, self.device)
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, encoder: TextEncoder | None) -> None:
        self._text_encoder = encoder

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MDMPipeline:
        """Move the network (and a loaded text encoder; features are cast to the network's dtype)."""
        self.unet.to(device=device, dtype=dtype)
        if self._text_encoder is not None and device is not None:
            self._text_encoder.to(device)
        return self

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """Turn the sampling progress bar off or on."""
        self.progress = not disable

    @property
    def device(self) -> torch.device:
        """Where the network lives."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The network's parameter dtype."""
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------------------------------------------
    @property
    def conditioner(self) -> Conditioner:
        """Builds this model's conditions on its device and dtype (the text encoder is loaded when first needed)."""
        return Conditioner(self.config.model, lambda: self.text_encoder, self.device, self.dtype)

    def prepare_latents(self, n: int, generator: Generators, latents: Pyramid | None = None) -> Pyramid:
        """The starting noise of every level (highest first): `latents` checked, or drawn level by level (with one
        generator per sample, sample by sample); (N, C, H, W) per level, or (N, C, T, H, W) for a video model."""
        item_shapes = self.diffusion.item_shapes(self.config.model.in_channels)
        shapes = [(n, *shape) for shape in item_shapes]
        if latents is None and isinstance(generator, list):
            check_generators(generator, n)
            latents = per_sample_noise(generator, item_shapes)
        elif latents is None:
            latents = [torch.randn(shape, generator=generator, dtype=torch.float32) for shape in shapes]
        elif len(latents) != len(shapes) or any(tuple(z.shape) != sh for z, sh in zip(latents, shapes, strict=False)):
            raise ValueError(f"latents must be {len(shapes)} tensors of the shapes {shapes}")
        return [z.to(self.device, self.dtype) for z in latents]

    def timesteps(self, num_inference_steps: int, spacing: str | None = None) -> torch.Tensor:
        """The descending integer grid of `num_inference_steps` steps in `spacing` (default: the config's)."""
        base = self.diffusion.gammas(torch.float64)[-1]
        return sampling_timesteps(spacing or self.config.diffusion.spacing, num_inference_steps, base)

    def settle(
        self,
        guidance_scale: float,
        guidance_level_scales: list[float] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        sampler: str | None = None,
        spacing: str | None = None,
        eta: float | None = None,
        level_projection: bool | None = None,
        guided_levels: str | None = None,
    ) -> SamplingSettings:
        """The sampling choices of a call, None meaning the config's: `diffusion.sampler`, `.spacing`,
        `.level_projection`, DDIM's `.eta` (0 for another sampler), `.guidance_interval` ((-inf, inf) guides every
        step) and `.guided_levels` (applied under level projection only; without it every level is guided).
        `guidance_level_scales`, when given, decide instead: 'all' gives every level `guidance_scale`, 'lowest'
        gives it to the lowest level and 1 to the others."""
        d = self.config.diffusion
        sampler = sampler or d.sampler
        projection = d.level_projection if level_projection is None else level_projection
        if guided_levels is None:
            guided_levels = d.guided_levels if projection else "all"
        if guided_levels not in get_args(GuidedLevels):
            raise ValueError(f"guided_levels must be one of {', '.join(get_args(GuidedLevels))}, got {guided_levels!r}")
        if guidance_level_scales is None and guided_levels == "lowest":
            guidance_level_scales = [1.0] * (self.diffusion.num_levels - 1) + [guidance_scale]
        level_scales = None if guidance_level_scales is None else tuple(guidance_level_scales)
        interval = d.guidance_interval if guidance_interval is None else guidance_interval
        if interval is not None and tuple(interval) == (-math.inf, math.inf):
            interval = None
        return SamplingSettings(
            sampler=sampler,
            spacing=spacing or d.spacing,
            eta=(d.eta if sampler == "ddim" else 0.0) if eta is None else eta,
            level_projection=projection,
            guidance=Guidance(guidance_scale, level_scales, None if interval is None else (interval[0], interval[1])),
        )

    def denoise(
        self,
        latents: Pyramid,
        conditions: Conditions,
        grid: torch.Tensor,
        settings: SamplingSettings,
        thresholding: str | None,
        generator: Generators,
        callback: StepCallback | None,
        x0_callback: X0Callback | None = None,
    ) -> SampleResult:
        """Run the settled sampler over `grid` from `latents` to images at every level, guided when `conditions` has
        an unconditional branch."""
        dtype = self.dtype if self.dtype == torch.float64 else torch.float32
        return run(
            self.unet,
            latents,
            self.diffusion.gammas(dtype).to(self.device),
            grid,
            conditions.cond,
            conditions.uncond,
            sampler=settings.sampler,
            prediction_type=self.config.diffusion.prediction_type,
            thresholding=thresholding or self.config.diffusion.thresholding,
            guidance=settings.guidance if conditions.uncond is not None else 1.0,
            eta=settings.eta,
            generator=generator,
            progress=self.progress,
            callback=callback,
            x0_callback=x0_callback,
            level_projection=settings.level_projection,
            temporal_downsample=self.config.diffusion.temporal_downsample,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: Labels | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str | None = None,
        spacing: str | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_level_scales: list[float] | None = None,
        eta: float | None = None,
        thresholding: str | None = None,
        generator: Generators = None,
        latents: Pyramid | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        x0_callback: X0Callback | None = None,
        level_projection: bool | None = None,
        guided_levels: str | None = None,
    ) -> MDMPipelineOutput:
        """Generate images; every level of the pyramid is returned in `levels`.

        Text models take `prompt` (the first argument, as in diffusers) or `prompt_embeds`; class models take
        `class_labels` (indices or names). `batch_size` applies to unconditional models. `latents` are the
        starting noise per level (highest first); otherwise they are drawn from `generator` level by level (or
        from one generator per sample, as in diffusers: a sample is then the same whatever batch it is drawn in).
        `sampler`, `spacing` and DDIM's `eta` default to the config's (`diffusion.sampler`, `.spacing`, `.eta`);
        guidance applies `guidance_scale` to the `guided_levels` ('all' or 'lowest', default the config's; or one
        scale per level) within `guidance_interval` (base logSNR, lo..hi; default the config's) only; `settle` shows
        what a call resolves to.
        `output_type`: "pil", "np" (uint8 NHWC) or "pt" (float in [-1, 1]). The output reports the network calls.
        `callback(i, tau, state)` runs after each step, `x0_callback(i, x0)` after each call with every level's x0.
        `level_projection` (default `diffusion.level_projection`) makes every level's x0 estimate agree with the level
        below (its pyramid equals that level), so that the levels show one image.
        """
        # 1. Check the inputs that nothing below checks; settle the sampler, its grid and the guidance
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        settings = self.settle(
            guidance_scale,
            guidance_level_scales,
            guidance_interval,
            sampler,
            spacing,
            eta,
            level_projection,
            guided_levels,
        )
        grid = self.timesteps(num_inference_steps, settings.spacing)
        # 2. Build every sample's condition, and the unconditional branch when guidance is on
        conditions = self.conditioner.build(
            class_labels=class_labels,
            prompt=prompt,
            prompt_embeds=prompt_embeds,
            prompt_mask=prompt_mask,
            negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_mask=negative_prompt_mask,
            per_prompt=num_images_per_prompt,
            batch_size=batch_size,
            guided=guidance_on(settings.guidance, self.config.model.context_dim() > 0),
        )
        # 3. Prepare the starting noise of every level
        latents = self.prepare_latents(conditions.batch_size, generator, latents)
        # 4. Denoise every level jointly
        result = self.denoise(latents, conditions, grid, settings, thresholding, generator, callback, x0_callback)
        # 5. Convert to the requested output type
        return _output([lv.clamp(-1, 1) for lv in result.levels], conditions.titles, result.nfe, output_type)


def _video(x: torch.Tensor, output_type: str) -> Any:
    """N C T H W clips as floats ("pt"), uint8 N T H W C ("np"), or a list of T PIL frames per sample ("pil")."""
    n, frames = x.shape[0], x.shape[2]
    if output_type == "pt":
        return x
    if output_type == "np":
        return to_uint8(fold(x)).reshape(n, frames, *x.shape[-2:], x.shape[1])
    images = to_pil(fold(x))
    return [images[i * frames : (i + 1) * frames] for i in range(n)]


def _output(levels: Pyramid, titles: list[str], nfe: int, output_type: str) -> MDMPipelineOutput:
    """Every level as float tensors ("pt"), uint8 arrays ("np") or PIL images ("pil"); clips as videos."""
    if levels[0].dim() == 5:
        videos = [_video(lv, output_type) for lv in levels]
        return MDMPipelineOutput(images=videos[0], levels=videos, titles=titles, nfe=nfe, videos=videos)
    convert = {"pt": lambda x: x, "np": to_uint8, "pil": to_pil}[output_type]
    converted = [convert(lv) for lv in levels]
    return MDMPipelineOutput(images=converted[0], levels=converted, titles=titles, nfe=nfe)
