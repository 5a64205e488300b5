"""Text encoders: one interface, `encode(prompts) -> (features (B, S, D), mask (B, S))`.

* `ByteEncoder`: no download. A prompt's UTF-8 bytes become one-hot vectors plus sinusoidal positions; the
  network's own text layers (`lm_proj`, then `num_lm_head_layers` transformer blocks) turn them into
  features. Those layers are part of the model, so the byte transformer trains, averages (EMA),
  checkpoints and ships with it.
* `TransformersEncoder`: a frozen T5 encoder (FLAN-T5 XL for the released models) or CLIP text model from
  a local directory or a hub id, in float32 or bfloat16.

Padding and the interface live in `mdm.text.base`.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch

from mdm import io
from mdm.config import TextConfig
from mdm.text.base import TextEncoder, lengths_mask, pad_ids
from mdm.text.cache import CachedEncoder
from mdm.text.tokenizer import PAD_ID, UnigramTokenizer


class ByteEncoder:
    """Words of UTF-8 bytes: one token per whitespace-separated word (longer words: one per `patch` bytes), its
    bytes one-hot by slot, optionally a one-hot of its hash among `word_buckets` buckets, plus sinusoidal
    position features; a NUL token marks the end.

    Width 256 x `patch` + `word_buckets` + `position_dim`. A linear layer on these rows is a learned embedding of
    every spelling plus a learned position embedding, which is what the model's `lm_proj` applies before its
    transformer blocks: no vocabulary, and a caption is a dozen tokens rather than sixty bytes, so the cross-
    attention and the pooled embedding are not diluted by per-byte tokens. Spellings share slot features ("blue",
    "black" and "background" all start with b), so telling words apart is learned slowly; the hash bucket gives
    each word a row of its own (a word embedding that learns as fast as a class embedding), and the slots still
    cover words the buckets confuse.
    """

    def __init__(self, max_length: int = 128, position_dim: int = 64, patch: int = 12, word_buckets: int = 0) -> None:
        if max_length < 1 or position_dim % 2 or patch < 1 or word_buckets < 0:
            raise ValueError(
                "ByteEncoder: need max_length >= 1, an even position_dim, patch >= 1 and word_buckets >= 0"
            )
        self.max_length, self.position_dim, self.patch = max_length, position_dim, patch
        self.word_buckets = word_buckets
        self.dim = 256 * patch + word_buckets + position_dim
        self.name = f"bytes:{max_length}:{position_dim}:{patch}" + (f":w{word_buckets}" if word_buckets else "")
        self.device = torch.device("cpu")

    def bucket(self, token: bytes) -> int:
        """The hash bucket of a token: BLAKE2b of its bytes modulo word_buckets, the same in every process."""
        return int.from_bytes(hashlib.blake2b(token, digest_size=8).digest(), "little") % self.word_buckets

    def tokens(self, prompt: str) -> list[bytes]:
        """The prompt's byte patches (NUL bytes removed, at most max_length - 1), then the NUL end token."""
        words = prompt.encode("utf-8").replace(b"\x00", b"").split()
        patches = [w[i : i + self.patch] for w in words for i in range(0, len(w), self.patch)]
        return [*patches[: self.max_length - 1], b"\x00"]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Byte patches, word buckets and positions (B, S, dim), zero on the padding; mask (B, S)."""
        rows = [self.tokens(p) for p in prompts]
        mask = lengths_mask([len(r) for r in rows])
        length = mask.shape[1]
        feats = torch.zeros(len(rows), length, self.dim)
        words = 256 * self.patch
        hot = [
            (i, j, column)
            for i, row in enumerate(rows)
            for j, token in enumerate(row)
            for column in [256 * k + b for k, b in enumerate(token)]
            + ([words + self.bucket(token)] if self.word_buckets else [])
        ]
        feats[tuple(torch.tensor(hot).T)] = 1
        half = self.position_dim // 2
        freqs = torch.exp(-math.log(self.max_length) * torch.arange(half) / half)
        angles = torch.arange(length)[:, None] * freqs[None]
        feats[..., words + self.word_buckets :] = torch.cat([angles.sin(), angles.cos()], dim=1) * mask[..., None]
        return feats.to(self.device), mask.to(self.device)

    def to(self, device: str | torch.device) -> ByteEncoder:
        """Where `encode` puts its tensors."""
        self.device = torch.device(device)
        return self


def _require_transformers() -> object:
    try:
        import transformers
    except ImportError:
        raise ImportError("T5 and CLIP text encoders need transformers: pip install 'mdm[text]'") from None
    return transformers


def _pretrained(cls: type, path: str, what: str, **kwargs: object) -> object:
    """`cls.from_pretrained(path)` from a local directory or a hub id, with a clear error when it is missing."""
    local = Path(path).expanduser().is_dir()
    if not local and (path.startswith((".", "/", "~")) or Path(path).exists()):
        raise FileNotFoundError(f"text.path = {path!r}: no such directory (expected a saved {what})")
    offline = local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return cls.from_pretrained(str(Path(path).expanduser()) if local else path, local_files_only=offline, **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"text.path = {path!r}: cannot load the {what} ({str(e).splitlines()[0]}). Without network access, "
            f"download it once (`huggingface-cli download {path if not local else 'google/flan-t5-xl'} "
            f"--local-dir DIR`) and set text.path to DIR"
        ) from None


class TransformersEncoder:
    """A frozen transformers T5 encoder or CLIP text model; `last_hidden_state` times the mask.

    T5 prompts are tokenised like the released models when ml-mdm's `t5.vocab` is given (`vocab`, or a
    `t5.vocab` file in the model directory): one leading space, `</s>`, no BOS, pad 0, so '' -> [3, 1].
    Otherwise the model's own transformers tokenizer is used.
    """

    def __init__(
        self,
        kind: str,
        path: str,
        dtype: str = "float32",
        max_length: int = 128,
        max_chars: int = 512,
        vocab: str | None = None,
    ) -> None:
        tf = _require_transformers()
        if kind not in ("t5", "clip"):
            raise ValueError(f"text.encoder: expected 't5' or 'clip', got {kind!r}")
        torch_dtype = io.dtype(dtype, ("float32", "bfloat16"), "text.dtype")
        self.kind, self.path, self.max_length, self.max_chars = kind, path, max_length, max_chars
        self.name = _transformers_name(kind, path, vocab, max_length, max_chars)
        model_cls = tf.T5EncoderModel if kind == "t5" else tf.CLIPTextModel
        what = "T5 encoder" if kind == "t5" else "CLIP text model"
        self.model = _pretrained(model_cls, path, what, dtype=torch_dtype).eval().requires_grad_(False)
        vocab = resolve_vocab(kind, path, vocab)
        if vocab is not None:
            if kind != "t5":
                raise ValueError("text.vocab (ml-mdm's t5.vocab) applies to the t5 encoder only")
            self.unigram: UnigramTokenizer | None = UnigramTokenizer.from_file(vocab)
            self.pad_id = PAD_ID
        else:
            self.unigram = None
            self.tokenizer = _pretrained(tf.AutoTokenizer, path, f"{what} tokenizer")
            self.pad_id = self.tokenizer.pad_token_id or 0
            self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", None) or max_length)
        cfg = self.model.config
        self.dim = int(cfg.d_model if kind == "t5" else cfg.hidden_size)

    def tokens(self, prompt: str) -> list[int]:
        """Token ids of one prompt, at most max_length of them."""
        if self.unigram is not None:
            return self.unigram(prompt, self.max_length, self.max_chars)
        return self.tokenizer(prompt[: self.max_chars], truncation=True, max_length=self.max_length)["input_ids"]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, S, D) float32, zero on the padding, and the mask (B, S)."""
        ids, mask = pad_ids([self.tokens(p) for p in prompts], self.pad_id)
        device = self.model.device
        ids, mask = ids.to(device), mask.to(device)
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out.float() * mask[..., None], mask

    def to(self, device: str | torch.device) -> TransformersEncoder:
        """Move the encoder's weights."""
        self.model.to(device)
        return self


def load_text_encoder(config: TextConfig, device: str | torch.device | None = None) -> TextEncoder | None:
    """The encoder a config names (None for models without text), read through `text.cache` when set.

    With a cache the encoder itself is loaded only if a prompt is missing from it, so training on cached
    captions needs neither transformers nor the encoder's weights.
    """
    if config.encoder is None:
        return None
    if config.cache is not None:
        encoder: TextEncoder = CachedEncoder(config.cache, encoder_name(config), lambda: build_encoder(config))
    else:
        encoder = build_encoder(config)
    return encoder.to(device) if device is not None else encoder


def build_encoder(config: TextConfig) -> ByteEncoder | TransformersEncoder:
    """The encoder itself (no cache) of a config whose text.encoder is set."""
    if config.encoder == "bytes":
        return byte_encoder(config)
    if config.path is None:
        raise ValueError(f"text.encoder = {config.encoder!r} needs text.path (a local directory or a hub id)")
    return TransformersEncoder(
        config.encoder, config.path, config.dtype, config.max_length, config.max_chars, config.vocab
    )


def byte_encoder(config: TextConfig) -> ByteEncoder:
    """The ByteEncoder a config's text settings describe (its token limit and word buckets)."""
    return ByteEncoder(config.max_length, word_buckets=config.word_buckets)


def resolve_vocab(kind: str, path: str, vocab: str | None) -> str | None:
    """ml-mdm's t5.vocab for a T5 encoder: `vocab` if given, else `t5.vocab` in the model directory, else None."""
    if vocab is not None or kind != "t5":
        return vocab
    local = Path(path) / "t5.vocab"
    return str(local) if local.is_file() else None


def encoder_name(config: TextConfig) -> str:
    """The `name` the configured encoder reports, without loading it (caches are keyed by it)."""
    if config.encoder == "bytes":
        return byte_encoder(config).name
    return _transformers_name(config.encoder, config.path, config.vocab, config.max_length, config.max_chars)


def _transformers_name(kind: str, path: str | None, vocab: str | None, max_length: int, max_chars: int) -> str:
    mode = "t5.vocab" if path is not None and resolve_vocab(kind, path, vocab) else "hf"
    return f"{kind}:{path}:{mode}:{max_length}:{max_chars}"
