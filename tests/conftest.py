"""Shared test helpers: the reference fixtures in ../shared (skipped with a reason when absent) and tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mdm.config import MDMConfig, ModelConfig, UNetConfig

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
    return MDMConfig(model=model).validate("tiny")


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
