"""mdm: Matryoshka Diffusion Models (Gu et al., ICLR 2024) for training, conversion and sampling."""

from mdm.config import (
    ConfigError,
    DiffusionConfig,
    MDMConfig,
    ModelConfig,
    UNetConfig,
    load_config,
    load_preset,
)
from mdm.models.conditioning import Conditioning
from mdm.models.unet import NestedUNet
from mdm.pipeline import MDMPipeline, MDMPipelineOutput

__all__ = [
    "Conditioning",
    "ConfigError",
    "DiffusionConfig",
    "MDMConfig",
    "MDMPipeline",
    "MDMPipelineOutput",
    "ModelConfig",
    "NestedUNet",
    "UNetConfig",
    "load_config",
    "load_preset",
]
