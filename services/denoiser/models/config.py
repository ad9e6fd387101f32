"""Reading a family's architecture config from diffusers' transformer/config.json."""

from __future__ import annotations


def from_config_json(cls, config: dict):
    """`cls` (a frozen dataclass of architecture fields) from a config.json dict: the keys it has
    fields for, JSON lists as tuples (hashable, like the dataclass's own defaults)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                  if k in cls.__dataclass_fields__})
