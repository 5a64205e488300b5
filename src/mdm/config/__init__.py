"""Configs: plain dataclasses (`schema`), read by a strict typed parser (`parse`) and checked by `validate`."""

from mdm.config.parse import ConfigError, apply_overrides, from_dict, to_dict
from mdm.config.ratios import mixed_fractions, mixed_rows
from mdm.config.schema import (
    DataConfig,
    DiffusionConfig,
    MDMConfig,
    ModelConfig,
    PhaseConfig,
    TextConfig,
    TrainConfig,
    UNetConfig,
    config_from_dict,
    list_presets,
    load_config,
    load_preset,
    preset_path,
    save_config,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "MDMConfig",
    "ModelConfig",
    "PhaseConfig",
    "TextConfig",
    "TrainConfig",
    "UNetConfig",
    "apply_overrides",
    "config_from_dict",
    "from_dict",
    "list_presets",
    "load_config",
    "load_preset",
    "mixed_fractions",
    "mixed_rows",
    "preset_path",
    "save_config",
    "to_dict",
]
