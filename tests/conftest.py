"""Shared test helpers: the reference fixtures in ../shared (skipped with a reason when absent) and tiny configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mdm.config import MDMConfig, ModelConfig, TrainConfig, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "mlmdm"


def fixture_dir(name: str = "") -> Path:
    """A folder of the ml-mdm reference fixtures; skips the test in a clone without ../shared."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (they live in the project's shared/ folder)")
    return path


def load_fixture(rel: str) -> dict:
    """torch.load a fixture file (plain tensors and containers only)."""
    return torch.load(fixture_dir() / rel, weights_only=True)


def inner_level(**kw: object) -> UNetConfig:
    """A tiny innermost UNet with attention, FFN, text projection and micro-conditioning."""
    base = dict(
        channels=[32, 32, 32],
        num_res_blocks=[1, 1, 1],
        attention_levels=[1, 2],
        num_attention_layers=[0, 1, 2],
        attention_ffn=True,
        temb_dim=64,
        mid_blocks=True,
        text_proj_dim=32,
        micro_conditioning={"scale": 8.0},
    )
    base.update(kw)
    return UNetConfig(**base)


def tiny_config(levels: int = 3, text_dim: int = 24, num_classes: int = 0, **model_kw: object) -> MDMConfig:
    """A validated tiny config with `levels` levels (8px base, each outer level x2)."""
    unet = inner_level()
    size = 8
    for i in range(levels - 1):
        unet = UNetConfig(
            channels=[32, 32],
            num_res_blocks=[1, 1],
            temb_dim=64,
            inner=unet,
            micro_conditioning={"scale": float(size * 2)},
            normalize_input=i % 2 == 0,
        )
        size *= 2
    model = ModelConfig(image_size=size, text_dim=text_dim, num_classes=num_classes, unet=unet, **model_kw)
    # fp32 whatever the CPU: the exactness tests compare runs bit for bit; bf16 is tested where it is asked for
    return MDMConfig(model=model, train=TrainConfig(mixed_precision="fp32")).validate("tiny")


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones included) a random value, so parity checks are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def sample_prompts_and_embeddings(pipe: object, prompts: list[str], encoder: object, **kwargs: object) -> tuple:
    """(images from `prompt=`, images from the same prompts encoded by `encoder` with '' as the negative), same seed."""
    out = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    emb, mask = encoder.encode(prompts)
    null, null_mask = encoder.encode([""])
    ref = pipe(
        prompt_embeds=emb,
        prompt_mask=mask,
        negative_prompt_embeds=null,
        negative_prompt_mask=null_mask,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kwargs,
    ).images
    return out, ref


WORDS = ["<pad>", "</s>", "<unk>", "▁", "a", "red", "green", "blue", "circle", "square", "on", "the", "left"]


def _word_tokenizer() -> object:
    """A word-level fast tokenizer over WORDS that appends </s> (pad 0, </s> 1), built without downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16
    )


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 48-wide T5 encoder (the fixtures' text width) and its tokenizer, saved like a hub download."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=32, d_model=48, d_kv=12, d_ff=64, num_layers=2, num_heads=4)
    transformers.T5EncoderModel(config).save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 32-wide CLIP text model and its tokenizer."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    transformers.CLIPTextModel(config).save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP start-up and contention costs on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test ever reaches the network: hub ids fail at once instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
