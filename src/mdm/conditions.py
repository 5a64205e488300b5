"""What samples are conditioned on, built in one place for every caller (pipeline, training batches and sample
grids, CLI, eval): class labels (indices or names), prompts, precomputed prompt features, or nothing, each with
the unconditional branch that classifier-free guidance and condition dropout use.

The unconditional branch of a class model is the reserved null class; of a text model, the negative prompt
(default: the encoded empty prompt, which is also what a dropped training caption becomes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mdm.config import ModelConfig
from mdm.models.conditioning import Conditioning, null_labels
from mdm.text.base import TextEncoder

Labels = Sequence[int | str] | torch.Tensor | int | str


@dataclass(frozen=True)
class Conditions:
    """The condition of every sample, the unconditional branch (None without guidance) and a title per sample."""

    cond: Conditioning | None
    uncond: Conditioning | None
    titles: list[str]

    @property
    def batch_size(self) -> int:
        """Samples to generate."""
        return len(self.titles)


class Conditioner:
    """Turns labels, prompts or features into `Conditioning` for one model, on its device and in its dtype.

    `encoder` returns the text encoder when a prompt first needs one (it may load it then), or None.
    """

    def __init__(
        self,
        model: ModelConfig,
        encoder: Callable[[], TextEncoder | None],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model, self._encoder, self.device, self.dtype = model, encoder, device, dtype
        self._empty: Conditioning | None = None

    # ------------------------------------------------------------------------------------------------------
    def label_ids(self, labels: Labels) -> torch.Tensor:
        """Class indices (N,) from indices or class names ('red circle'); out-of-range or unknown ones fail."""
        m = self.model
        if isinstance(labels, torch.Tensor):
            ids = labels.reshape(-1).long()
        else:
            items = [labels] if isinstance(labels, (int, str)) else list(labels)
            names = m.class_names or []
            for x in items:
                if isinstance(x, str) and x not in names:
                    raise ValueError(f"unknown class name {x!r}; this model's classes: {names or 'unnamed'}")
            ids = torch.tensor([names.index(x) if isinstance(x, str) else int(x) for x in items], dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= m.num_classes):
            raise ValueError(f"class_labels must be in [0, {m.num_classes}), got {ids.tolist()}")
        return ids

    def labels(self, labels: Labels) -> Conditioning:
        """The condition of class labels."""
        return Conditioning(labels=self.label_ids(labels).to(self.device))

    def text(self, prompts: list[str]) -> Conditioning:
        """The condition of prompts, through the model's text encoder."""
        encoder = self._encoder()
        if encoder is None:
            raise ValueError(
                "this model has no text encoder (config text.encoder is unset): pass text_encoder= to "
                "from_pretrained, or prompt_embeds/prompt_mask instead of prompt"
            )
        if encoder.dim != self.model.text_dim:
            raise ValueError(f"text encoder width {encoder.dim} != model.text_dim {self.model.text_dim}")
        emb, mask = encoder.encode(prompts)
        return Conditioning(text=emb, text_mask=mask).to(self.device, self.dtype)

    def features(self, text: torch.Tensor, mask: torch.Tensor | None) -> Conditioning:
        """The condition of precomputed text features (B, S, D) and their mask (B, S)."""
        return Conditioning(text=text, text_mask=mask).to(self.device, self.dtype)

    def null(self, n: int) -> Conditioning | None:
        """`n` rows of the unconditional condition: the null class, or the encoded empty prompt (None: no condition)."""
        m = self.model
        if m.num_classes > 0:
            return Conditioning(labels=null_labels(n, m.num_classes, self.device))
        if m.text_dim == 0:
            return None
        if self._empty is None:
            if self._encoder() is None:
                raise ValueError(
                    "the unconditional branch needs the encoded empty prompt: pass negative_prompt_embeds, or "
                    "attach a text encoder"
                )
            self._empty = self.text([""])
        return self._empty.select(torch.zeros(n, dtype=torch.long))

    def data(self, batch: dict) -> Conditioning | None:
        """The condition of a training batch: its labels, or its encoded captions (None for an unconditional model)."""
        if self.model.num_classes > 0:
            return self.labels(batch["label"])
        if self.model.text_dim > 0:
            with torch.no_grad():
                return self.text(list(batch["caption"]))
        return None

    # ------------------------------------------------------------------------------------------------------
    def build(
        self,
        *,
        class_labels: Labels | None = None,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        per_prompt: int = 1,
        batch_size: int = 1,
        guided: bool = False,
    ) -> Conditions:
        """The conditions of a request, each row repeated `per_prompt` times, with the unconditional branch when
        `guided`. Give one of class_labels, prompt or prompt_embeds; an unconditional model takes none and
        makes `batch_size` x `per_prompt` samples."""
        m = self.model
        given = [
            name
            for name, x in (("class_labels", class_labels), ("prompt", prompt), ("prompt_embeds", prompt_embeds))
            if x is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one of class_labels, prompt or prompt_embeds, not {' and '.join(given)}")
        if per_prompt < 1 or batch_size < 1:
            raise ValueError(f"num_images_per_prompt and batch_size must be >= 1, got {per_prompt} and {batch_size}")
        if m.context_dim() == 0:
            if given:
                raise ValueError("this model is unconditional: it takes no labels or prompts")
            return Conditions(None, None, [f"sample {i}" for i in range(batch_size * per_prompt)])
        if class_labels is not None:
            if m.num_classes == 0:
                raise ValueError("this model is text-conditional: pass prompt or prompt_embeds")
            items = class_labels.reshape(-1).tolist() if isinstance(class_labels, torch.Tensor) else class_labels
            items = [items] if isinstance(items, (int, str)) else list(items)
            cond = self.labels(class_labels)
            titles = [str(x) for x in items]
        elif m.text_dim == 0:
            raise ValueError("this model is class-conditional: pass class_labels")
        elif prompt is not None:
            titles = [prompt] if isinstance(prompt, str) else list(prompt)
            cond = self.text(titles)
        elif prompt_embeds is not None:
            cond = self.features(prompt_embeds, prompt_mask)
            titles = [f"prompt{i}" for i in range(cond.batch_size)]
        else:
            raise ValueError("this model is text-conditional: pass prompt or prompt_embeds")
        rows = torch.arange(len(titles)).repeat_interleave(per_prompt)
        cond = cond.select(rows.to(self.device))
        titles = [titles[i] for i in rows.tolist()]
        if not guided:
            return Conditions(cond, None, titles)
        uncond = self._negative(negative_prompt, negative_prompt_embeds, negative_prompt_mask, per_prompt, len(titles))
        return Conditions(cond, uncond, titles)

    def _negative(
        self,
        prompt: str | list[str] | None,
        embeds: torch.Tensor | None,
        mask: torch.Tensor | None,
        per_prompt: int,
        n: int,
    ) -> Conditioning:
        """The unconditional branch for `n` samples: the null class, or a negative prompt (one, or one per prompt)."""
        if self.model.num_classes > 0:
            return self.null(n)
        if embeds is not None:
            neg = self.features(embeds, mask)
        elif prompt is None or prompt == "":
            return self.null(n)
        else:
            neg = self.text([prompt] if isinstance(prompt, str) else list(prompt))
        if neg.batch_size == 1:
            return neg.select(torch.zeros(n, dtype=torch.long))
        if neg.batch_size * per_prompt == n:
            return neg.select(torch.arange(neg.batch_size).repeat_interleave(per_prompt))
        raise ValueError(f"negative condition has {neg.batch_size} rows, expected 1 or {n // per_prompt}")
