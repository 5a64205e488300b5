"""CLIP score of images against their prompts, with a transformers CLIP loaded from a local directory only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mdm.eval.features import as_rgb
from mdm.io import to_pixels

if TYPE_CHECKING:
    from transformers import CLIPModel

PREPROCESSOR = "preprocessor_config.json"


class ClipScorer:
    """CLIP score (Hessel et al. 2021, torchmetrics' form): 100 * max(cos(image embedding, text embedding), 0)."""

    def __init__(
        self, model: CLIPModel, tokenizer: Any, mean: list[float], std: list[float], device: torch.device
    ) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to(self, device: str | torch.device) -> ClipScorer:
        """Move the model."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images as CLIP input: 8-bit pixels / 255, bicubic (antialiased) to the model size, normalised."""
        x = to_pixels(as_rgb(images.to(self.device))) / 255
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        return (x.clamp(0, 1) - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-pair scores (B,) in [0, 100] for images[i] and prompts[i]."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings, one per image")
        if len(prompts) != images.shape[0] or not prompts:
            raise ValueError(
                f"need one prompt per image and at least one pair: {images.shape[0]} images, {len(prompts)} prompts"
            )
        text = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=self.pixel_values(images)
        )
        cos = F.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)
        return 100 * cos.clamp(min=0)

    def score(self, images: torch.Tensor, prompts: list[str]) -> float:
        """The CLIP score of a set: 100 * mean(max(cos, 0)) over its pairs."""
        return float(self(images, prompts).mean())


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> ClipScorer:
    """A CLIPModel, its tokenizer and its preprocessor_config.json (image mean/std) from a local directory."""
    d = Path(path).expanduser()
    expected = f"a local transformers CLIP directory (config.json, weights, tokenizer files, {PREPROCESSOR})"
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory; expected {expected}")
    for name in ("config.json", PREPROCESSOR):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d}: missing {name}; expected {expected}")
    prep = json.loads((d / PREPROCESSOR).read_text())
    mean, std = prep.get("image_mean"), prep.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        raise ValueError(f"{d / PREPROCESSOR}: expected 'image_mean' and 'image_std' lists of 3 numbers")
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError:
        raise ImportError("CLIP score needs transformers: pip install 'mdm[text]'") from None
    model = CLIPModel.from_pretrained(d, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
    return ClipScorer(model, tokenizer, mean, std, torch.device(device))
