"""Text encoders (byte, T5, CLIP), the released models' tokenisation and the precomputed-feature cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mdm import MDMPipeline
from mdm.config import TextConfig
from mdm.models.unet import NestedUNet
from mdm.text.cache import CachedEncoder, EmbeddingCache, write_cache
from mdm.text.encoders import ByteEncoder, TransformersEncoder, encoder_name, load_text_encoder
from mdm.text.tokenizer import UnigramTokenizer
from tests.conftest import WORDS, randomize_, sample_prompts_and_embeddings, tiny_config

VOCAB = [
    ("<pad>", 0.0),
    ("</s>", 0.0),
    ("<unk>", 0.0),
    ("▁", -2.0),
    ("a", -3.0),
    ("b", -3.0),
    ("ab", -4.0),
    ("▁a", -2.5),
    ("c", -10.0),
    ("abc", -20.0),
    ("<extra_id_0>", 0.0),
]


def write_vocab(path: Path, pieces: list[tuple[str, float]]) -> Path:
    path.write_text("".join(f"{p}\t{s}\n" for p, s in pieces), encoding="utf-8")
    return path


def test_unigram_tokenizer_follows_the_released_convention(tmp_path: Path) -> None:
    tok = UnigramTokenizer.from_file(write_vocab(tmp_path / "t5.vocab", VOCAB))
    ids = {p: i for i, (p, _) in enumerate(VOCAB)}
    assert tok("") == [3, 1], "the empty prompt is [▁, </s>]"
    assert tok("ab") == [ids["▁a"], ids["b"], 1], "' ab': ▁a+b costs 5.5, ▁+ab 6, ▁+a+b 8"
    assert tok.segment("abc") == [ids["ab"], ids["c"]], "ab+c (14) beats the single piece abc (20)"
    assert tok("a  b") == [ids["▁a"], ids["▁"], ids["▁"], ids["b"], 1], "spaces are not collapsed"
    assert tok("a\u2603b") == [ids["▁a"], ids["b"], 1], "characters no piece covers are dropped"
    assert tok("ab ab ab", max_length=3) == [ids["▁a"], ids["b"], 1]
    assert tok("abab", max_chars=2) == tok("ab")
    assert ids["<extra_id_0>"] not in tok("<extra_id_0>"), "special pieces never match caption text"
    (tmp_path / "bad.vocab").write_text("▁\t-1\nbroken line\n")
    with pytest.raises(ValueError, match=r"bad.vocab:2: expected 'piece<TAB>log-prob'"):
        UnigramTokenizer.from_file(tmp_path / "bad.vocab")


def test_byte_encoder_features_and_mask() -> None:
    enc = ByteEncoder(max_length=4, patch=4)
    assert enc.tokens("hé  abcdefghij") == ["hé".encode(), b"abcd", b"efgh", b"\x00"], "long words: patches"
    emb, mask = enc.encode(["hé ab", ""])
    assert enc.dim == 4 * 256 + 64 and emb.shape == (2, 3, enc.dim)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    slots = emb[..., :1024].reshape(2, 3, 4, 256)
    assert slots[0, 0].nonzero().tolist() == [[k, b] for k, b in enumerate("hé".encode())]
    assert slots[0, 1].nonzero().tolist() == [[0, ord("a")], [1, ord("b")]]
    assert slots[0, 2].nonzero().tolist() == [[0, 0]] and slots[1, 0].nonzero().tolist() == [[0, 0]], "end token"
    assert emb[1, 1:].abs().sum() == 0, "padding rows are zero"
    pos = emb[..., 1024:]
    assert torch.equal(pos[0, 0], pos[1, 0]) and not torch.equal(pos[0, 0], pos[0, 1])
    assert enc.encode(["a b c d e f"])[0].shape[1] == 4, "max_length - 1 patches, then the end token"
    assert torch.equal(enc.encode(["a\x00b"])[0], enc.encode(["ab"])[0]), "NUL bytes cannot fake the end"
    assert torch.equal(enc.encode(["a  b\n"])[0], enc.encode(["a b"])[0]), "any whitespace separates words"


def test_byte_encoder_word_buckets_give_each_word_its_own_row() -> None:
    enc = ByteEncoder(max_length=8, patch=4, word_buckets=2048)
    assert enc.dim == 4 * 256 + 2048 + 64 and enc.name == "bytes:8:64:4:w2048"
    assert ByteEncoder(8, patch=4).name == "bytes:8:64:4", "no buckets: the spelling-only encoder, named as before"
    emb, _ = enc.encode(["red blue red", "blue"])
    buckets = emb[..., 1024 : 1024 + 2048]
    assert buckets.sum(-1).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]], "one bucket per token, none on the padding"
    hot = buckets.argmax(-1)
    assert hot[0, 0] == hot[0, 2] == enc.bucket(b"red") and hot[0, 1] == hot[1, 0] == enc.bucket(b"blue")
    assert hot[0, 0] != hot[0, 1]
    assert enc.bucket(b"red") == 269, "BLAKE2b, not Python's per-process salted hash: the same bucket everywhere"
    torch.testing.assert_close(emb[..., :1024], ByteEncoder(8, patch=4).encode(["red blue red", "blue"])[0][..., :1024])
    torch.testing.assert_close(emb[..., -64:], ByteEncoder(8, patch=4).encode(["red blue red", "blue"])[0][..., -64:])
    cfg = TextConfig(encoder="bytes", max_length=8, word_buckets=2048)
    assert load_text_encoder(cfg).dim == ByteEncoder(8, word_buckets=2048).dim
    assert encoder_name(cfg) == "bytes:8:64:12:w2048"
    with pytest.raises(ValueError, match="word_buckets >= 0"):
        ByteEncoder(word_buckets=-1)


def test_t5_encoder_masks_padding_and_matches_the_model(tiny_t5: Path) -> None:
    enc = TransformersEncoder("t5", str(tiny_t5))
    assert enc.dim == 48 and enc.unigram is None
    emb, mask = enc.encode(["a red circle", "blue"])
    assert emb.shape == (2, 4, 48) and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert emb[1, 2:].abs().sum() == 0
    alone, _ = enc.encode(["blue"])
    torch.testing.assert_close(emb[1, :2], alone[0], atol=1e-5, rtol=1e-5, msg="padding changes nothing")
    ids = torch.tensor([[WORDS.index(w) for w in ("a", "red", "circle", "</s>")]])
    direct = enc.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(emb[:1], direct, atol=1e-6, rtol=1e-6)
    half = TransformersEncoder("t5", str(tiny_t5), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    low, _ = half.encode(["a red circle"])
    assert low.dtype == torch.float32 and (low - emb[:1]).abs().max() < 0.1


def test_t5_with_t5_vocab_tokenises_like_the_released_models(tiny_t5: Path, tmp_path: Path) -> None:
    model = tmp_path / "t5"
    shutil.copytree(tiny_t5, model)
    pieces = [(w, 0.0) if w.startswith("<") or w.startswith("</") else (w, -1.0) for w in WORDS]
    pieces = [(p if p.startswith("<") or p == "▁" else "▁" + p, s) for p, s in pieces]
    write_vocab(model / "t5.vocab", pieces)
    enc = TransformersEncoder("t5", str(model))
    assert enc.unigram is not None and enc.name == encoder_name(TextConfig(encoder="t5", path=str(model)))
    assert enc.tokens("") == [3, 1] and enc.tokens("red circle") == [5, 8, 1]
    emb, mask = enc.encode([""])
    assert mask.tolist() == [[1, 1]]
    torch.testing.assert_close(emb, enc.model(input_ids=torch.tensor([[3, 1]])).last_hidden_state)
    with pytest.raises(ValueError, match="t5 encoder only"):
        TransformersEncoder("clip", str(model), vocab=str(model / "t5.vocab"))


def test_clip_encoder(tiny_clip: Path) -> None:
    enc = TransformersEncoder("clip", str(tiny_clip))
    assert enc.dim == 32 and enc.max_length == 16, "the tokenizer's own limit (CLIP: 77) caps max_length"
    emb, mask = enc.encode(["a green square", " ".join(["red"] * 40)])
    assert emb.shape == (2, 16, 32) and mask[0].sum() == 4 and mask[1].sum() == 16
    assert emb[0, 4:].abs().sum() == 0 and emb[0, :4].abs().sum() > 0


def test_missing_weights_fail_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        TransformersEncoder("t5", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"cannot load the T5 encoder.*download it once"):
        TransformersEncoder("t5", "google/flan-t5-xl")
    with pytest.raises(ValueError, match="expected 't5' or 'clip'"):
        TransformersEncoder("bert", str(tmp_path))
    with pytest.raises(ValueError, match=r"needs text\.path"):
        load_text_encoder(TextConfig(encoder="clip"))


def test_load_text_encoder_by_kind(tiny_t5: Path) -> None:
    assert load_text_encoder(TextConfig()) is None
    assert isinstance(load_text_encoder(TextConfig(encoder="bytes", max_length=16)), ByteEncoder)
    t5 = load_text_encoder(TextConfig(encoder="t5", path=str(tiny_t5)))
    assert isinstance(t5, TransformersEncoder) and t5.name == encoder_name(TextConfig(encoder="t5", path=str(tiny_t5)))


def test_cache_round_trip_equals_the_encoder(tmp_path: Path) -> None:
    enc = ByteEncoder(32)
    captions = ["a red circle", "blue", "a red circle", "a green square on the left"]
    write_cache(enc, captions, tmp_path / "cache", batch_size=2, dtype="float32", part_size=2, progress=False)
    assert len(list((tmp_path / "cache").glob("part-*.safetensors"))) == 2
    cache = EmbeddingCache(tmp_path / "cache")
    assert len(cache) == 4 and cache.dim == enc.dim and cache.get("never seen") is None
    loads = []

    def load() -> ByteEncoder:
        loads.append(1)
        return ByteEncoder(32)

    cached = CachedEncoder(tmp_path / "cache", enc.name, load)
    prompts = ["blue", "", "a green square on the left"]
    for got, want in zip(cached.encode(prompts), enc.encode(prompts), strict=True):
        assert torch.equal(got, want)
    assert not loads, "every prompt was cached: the encoder was never loaded"
    prompts = ["blue", "a new caption"]
    for got, want in zip(cached.encode(prompts), enc.encode(prompts), strict=True):
        assert torch.equal(got, want)
    cached.encode(["another new one"])
    assert len(loads) == 1 and cached.misses == 2, "the encoder is loaded once, on the first miss"
    with pytest.raises(ValueError, match="made by encoder 'bytes:32:64:12', but the config names"):
        CachedEncoder(tmp_path / "cache", ByteEncoder(64).name, load)
    with pytest.raises(FileNotFoundError, match="mdm data embed"):
        EmbeddingCache(tmp_path / "nothing")


def test_half_precision_cache_of_t5_features(tiny_t5: Path, tmp_path: Path) -> None:
    config = TextConfig(encoder="t5", path=str(tiny_t5), cache=str(tmp_path / "cache"))
    enc = TransformersEncoder("t5", str(tiny_t5))
    write_cache(enc, ["a red circle", "blue"], config.cache, progress=False)
    cached = load_text_encoder(config)
    assert isinstance(cached, CachedEncoder) and cached.dim == 48
    got, mask = cached.encode(["blue", "a red circle"])
    want, want_mask = enc.encode(["blue", "a red circle"])
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_pipeline_prompts_equal_their_embeddings_and_survive_save_load(tmp_path: Path) -> None:
    cfg = tiny_config(levels=2, text_dim=ByteEncoder().dim)
    cfg.text.encoder, cfg.text.max_length = "bytes", 32
    pipe = MDMPipeline(randomize_(NestedUNet(cfg.model)).eval(), cfg.validate())
    pipe.set_progress_bar_config(disable=True)
    common = {"num_inference_steps": 2, "guidance_scale": 3.0, "output_type": "pt"}
    prompts = ["a red circle", "blue"]
    out, by_embeds = sample_prompts_and_embeddings(
        pipe, prompts, ByteEncoder(32), num_inference_steps=2, guidance_scale=3.0
    )
    assert isinstance(pipe.text_encoder, ByteEncoder), "the config's encoder is loaded on first use"
    assert torch.equal(out, by_embeds)
    negative = pipe(prompt=prompts, negative_prompt="square", generator=torch.Generator().manual_seed(0), **common)
    assert not torch.allclose(negative.images, out), "the negative prompt replaces the empty one in the CFG branch"
    loaded = MDMPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.text == cfg.text
    assert torch.equal(loaded(prompt=prompts, generator=torch.Generator().manual_seed(0), **common).images, out)


def test_pipeline_uses_a_training_cache_only_while_it_exists(tmp_path: Path) -> None:
    cfg = tiny_config(levels=1, text_dim=ByteEncoder(16).dim)
    cfg.text.encoder, cfg.text.max_length, cfg.text.cache = "bytes", 16, str(tmp_path / "cache")
    pipe = MDMPipeline(NestedUNet(cfg.model).eval(), cfg.validate())
    assert isinstance(pipe.text_encoder, ByteEncoder), "no cache on disk: the encoder itself"
    write_cache(ByteEncoder(16), ["a red circle"], tmp_path / "cache", progress=False)
    pipe.text_encoder = None
    assert isinstance(pipe.text_encoder, CachedEncoder)
