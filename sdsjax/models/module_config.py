"""Flax modules built from a diffusers / transformers `config.json`.

The model modules name their fields exactly as the config keys, so one rule builds any of them:
keys that are not fields are ignored, null values take the field's default, and lists become
tuples (module fields must be hashable). Each model checks what it does not support first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

# Fields Flax adds to every module, and the dtype, which the caller picks.
_NOT_CONFIG = frozenset({"parent", "name", "dtype"})


def module_from_config(cls, config: Mapping[str, Any], dtype=jnp.float32, **overrides):
  """`cls(**fields of config, dtype=dtype, **overrides)`; see the module docstring."""
  names = {f.name for f in dataclasses.fields(cls)} - _NOT_CONFIG
  args = {
    key: tuple(value) if isinstance(value, list) else value
    for key, value in config.items()
    if key in names and value is not None
  }
  args.update(overrides)
  return cls(**args, dtype=dtype)
