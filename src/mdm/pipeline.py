"""MDMPipeline: a NestedUNet, its diffusion settings and (optionally) a text encoder, shaped like a diffusers
pipeline: `from_pretrained`, `save_pretrained`, and a `__call__` that returns images at every level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mdm.config import MDMConfig, load_config, save_config
from mdm.diffusion.process import MultiLevelDiffusion, Pyramid
from mdm.diffusion.samplers import StepCallback, sample
from mdm.diffusion.schedule import timestep_grid
from mdm.images import to_pil, to_uint8
from mdm.models.conditioning import Conditioning, null_labels
from mdm.models.unet import NestedUNet
from mdm.text.encoders import TextEncoder, load_text_encoder

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MDMPipelineOutput:
    """`images`: top-level results; `levels`: one entry per level, highest first (PIL lists, arrays or tensors)."""

    images: Any
    levels: list[Any]


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
        return Path(snapshot_download(str(path), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
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
        self.diffusion = MultiLevelDiffusion(config.diffusion, config.model.level_sizes())
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
        state = load_file(str(d / WEIGHTS_NAME))
        expected = unet.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{d / WEIGHTS_NAME} does not match {d / CONFIG_NAME}: missing {missing}, unexpected {unexpected}"
            )
        unet.load_state_dict(state, strict=True, assign=True)
        unet = unet.to(device=device, dtype=dtype).eval()
        with open(d / WEIGHTS_NAME, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        provenance = {k: v for k, v in header.get("__metadata__", {}).items() if k != "format"}
        return cls(unet, config, text_encoder=text_encoder, provenance=provenance)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `config.yaml` and `model.safetensors` into `path` (built in a temporary folder, then moved)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_config(self.config, tmp / CONFIG_NAME)
            state = {k: v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "mdm/1", **self.provenance})
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

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
    def _text(self, prompts: list[str]) -> Conditioning:
        encoder = self.text_encoder
        if encoder is None:
            raise ValueError(
                "this pipeline has no text encoder (config text.encoder is unset): pass text_encoder= to "
                "from_pretrained, or prompt_embeds/prompt_mask instead of prompt"
            )
        if encoder.dim != self.config.model.text_dim:
            raise ValueError(f"text encoder width {encoder.dim} != model.text_dim {self.config.model.text_dim}")
        emb, mask = encoder.encode(prompts)
        return Conditioning(text=emb, text_mask=mask).to(self.device, self.dtype)

    def label_ids(self, class_labels: list[int | str] | torch.Tensor | int | str) -> list[int] | torch.Tensor:
        """Class indices from indices or names (`model.class_names`, e.g. 'red circle')."""
        if isinstance(class_labels, torch.Tensor):
            return class_labels
        items = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
        names = self.config.model.class_names or []
        out = []
        for item in items:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"unknown class name {item!r}; this model's classes: {names or 'unnamed'}")
                item = names.index(item)
            out.append(item)
        return out

    def _conditions(
        self,
        class_labels: list[int | str] | torch.Tensor | None,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        prompt_mask: torch.Tensor | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_mask: torch.Tensor | None,
        per_prompt: int,
        guided: bool,
    ) -> tuple[Conditioning | None, Conditioning | None]:
        """(condition, unconditional condition) for the batch, each row repeated `per_prompt` times."""
        m = self.config.model
        given = [x is not None for x in (class_labels, prompt, prompt_embeds)]
        if sum(given) > 1:
            raise ValueError("give one of class_labels, prompt or prompt_embeds")
        if m.context_dim() == 0:
            if any(given):
                raise ValueError("this model is unconditional: it takes no labels or prompts")
            return Conditioning(), None
        if class_labels is not None:
            if m.num_classes == 0:
                raise ValueError("this model is text-conditional: pass prompt or prompt_embeds")
            labels = torch.as_tensor(self.label_ids(class_labels), dtype=torch.long).reshape(-1)
            if labels.min() < 0 or labels.max() >= m.num_classes:
                raise ValueError(f"class_labels must be in [0, {m.num_classes}), got {labels.tolist()}")
            labels = labels.repeat_interleave(per_prompt).to(self.device)
            return Conditioning(labels=labels), Conditioning(
                labels=null_labels(len(labels), m.num_classes, self.device)
            )
        if m.text_dim == 0:
            raise ValueError("this model is class-conditional: pass class_labels")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            cond = self._text([p for p in prompts for _ in range(per_prompt)])
        elif prompt_embeds is not None:
            cond = Conditioning(text=prompt_embeds, text_mask=prompt_mask).to(self.device, self.dtype)
            cond = cond.select(torch.arange(cond.batch_size).repeat_interleave(per_prompt))
        else:
            raise ValueError("this model is text-conditional: pass prompt or prompt_embeds")
        if not guided:
            return cond, None
        n = cond.batch_size
        if negative_prompt_embeds is not None:
            neg = Conditioning(text=negative_prompt_embeds, text_mask=negative_prompt_mask).to(self.device, self.dtype)
        else:
            negs = (
                [negative_prompt or ""]
                if negative_prompt is None or isinstance(negative_prompt, str)
                else list(negative_prompt)
            )
            if self._text_encoder is None and self.config.text.encoder is None:
                raise ValueError(
                    "guidance needs the unconditional text: pass negative_prompt_embeds (the encoded "
                    "empty prompt) or attach a text encoder"
                )
            neg = self._text(negs)
        if neg.batch_size == 1:
            neg = neg.select(torch.zeros(n, dtype=torch.long))
        elif neg.batch_size * per_prompt == n:
            neg = neg.select(torch.arange(neg.batch_size).repeat_interleave(per_prompt))
        if neg.batch_size != n:
            raise ValueError(f"negative condition has {neg.batch_size} rows, expected 1 or {n}")
        return cond, neg

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: list[int | str] | torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        eta: float = 0.0,
        thresholding: str | None = None,
        generator: torch.Generator | None = None,
        latents: Pyramid | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
    ) -> MDMPipelineOutput:
        """Generate images; every level of the pyramid is returned in `levels`.

        Text models take `prompt` (the first argument, as in diffusers) or `prompt_embeds`; class models take
        `class_labels` (indices or names). `batch_size` applies to unconditional models. `latents` are the
        starting noise per level (highest first); otherwise they are drawn from `generator` level by level.
        `output_type`: "pil", "np" (uint8 NHWC) or "pt" (float in [-1, 1]).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be >= 1")
        conditional = self.config.model.context_dim() > 0
        guided = conditional and guidance_scale != 1.0
        cond, uncond = self._conditions(
            class_labels,
            prompt,
            prompt_embeds,
            prompt_mask,
            negative_prompt,
            negative_prompt_embeds,
            negative_prompt_mask,
            num_images_per_prompt,
            guided,
        )
        n = cond.batch_size or batch_size * num_images_per_prompt
        sizes = self.config.model.level_sizes()
        channels = self.config.model.in_channels
        if latents is None:
            latents = [torch.randn((n, channels, s, s), generator=generator, dtype=torch.float32) for s in sizes]
        elif len(latents) != len(sizes) or any(
            tuple(z.shape) != (n, channels, s, s) for z, s in zip(latents, sizes, strict=False)
        ):
            raise ValueError(f"latents must be {len(sizes)} tensors of shape (N, {channels}, s, s) for s in {sizes}")
        latents = [z.to(self.device, self.dtype) for z in latents]
        dtype = self.dtype if self.dtype == torch.float64 else torch.float32
        grid = timestep_grid(num_inference_steps, self.diffusion.T)
        levels = sample(
            self.unet,
            latents,
            self.diffusion.gammas(dtype).to(self.device),
            grid,
            cond if conditional else None,
            uncond,
            prediction_type=self.config.diffusion.prediction_type,
            sampler=sampler,
            eta=eta,
            guidance_scale=guidance_scale if guided else 1.0,
            thresholding=thresholding or self.config.diffusion.thresholding,
            generator=generator,
            progress=self.progress,
            callback=callback,
        )
        levels = [lv.clamp(-1, 1) for lv in levels]
        if output_type == "pt":
            return MDMPipelineOutput(images=levels[0], levels=levels)
        if output_type == "np":
            arrays = [to_uint8(lv) for lv in levels]
            return MDMPipelineOutput(images=arrays[0], levels=arrays)
        pils: list[list[Image.Image]] = [to_pil(lv) for lv in levels]
        return MDMPipelineOutput(images=pils[0], levels=pils)
