"""Shipped YAML presets (see `mdm.config.list_presets`)."""
