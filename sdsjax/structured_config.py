"""Dataclass configs from a YAML file and dotted overrides, as threestudio loads its configs.

`load_structured(schema, path, overrides)` starts from `OmegaConf.structured(schema)`, merges
the YAML file and then each `key=value` override (dotted keys reach into sections), and returns
the dataclass instance. OmegaConf checks keys and types. The sections' own `__post_init__`
checks raise `ValueError` naming their field, and the section's key is added here. Every failure
is one `ConfigError` line naming the key, whatever the input: a size limit, alias bombs and
strings read exactly as typed are for hostile files and command lines.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from sdsjax.errors import ConfigError
from sdsjax.text_files import read_text_file


def load_structured(
  schema: type,
  path: str | os.PathLike | None = None,
  overrides: Sequence[str | Mapping[str, Any]] = (),
  max_bytes: int = 1 << 20,
):
  """An instance of the dataclass `schema`: its defaults, then the YAML file at `path`, then
  each override (a `KEY=VALUE` string or a mapping) in order."""
  from omegaconf import OmegaConf
  from omegaconf import errors as oc_errors

  hints = typing.get_type_hints(schema)
  sections = [f.name for f in dataclasses.fields(schema) if dataclasses.is_dataclass(hints[f.name])]
  layers = [] if path is None else [_read_yaml(path, max_bytes)]
  layers += [_override_node(schema, item) for item in overrides]
  for layer in layers:
    for section in sections:
      if section in layer and not OmegaConf.is_dict(layer[section]):
        raise ConfigError(
          f"config key '{section}' is a section: give a mapping, e.g. {section}.KEY=VALUE"
        )
  try:
    merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
  except oc_errors.OmegaConfBaseException as e:
    raise _config_error(schema, e) from None
  for section in sections:  # one at a time, so that a field's ValueError gets its section
    try:
      OmegaConf.to_object(merged[section])
    except ValueError as e:
      raise ConfigError(f"{section}.{e}") from None
  try:
    return OmegaConf.to_object(merged)
  except oc_errors.OmegaConfBaseException as e:
    raise _config_error(schema, e) from None


def field_type(schema: type, dotted: str):
  """The declared type of a dotted key (None when there is no such key)."""
  cls = schema
  for part in dotted.split("."):
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    if part not in hints:
      return None
    cls = hints[part]
  return cls


def _suggestion(schema: type, key: str) -> str:
  """' (did you mean 'raster.sigma'?)' for a near-miss key, else '' (OmegaConf's own guess
  misses transpositions such as 'stpes')."""
  parent, _, leaf = key.rpartition(".")
  cls = field_type(schema, parent) if parent else schema
  if not dataclasses.is_dataclass(cls):
    return ""
  names = [f.name for f in dataclasses.fields(cls)]
  near = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
  return f" (did you mean '{parent + '.' if parent else ''}{near[0]}'?)" if near else ""


def _first_line(e: Exception) -> str:
  """OmegaConf messages carry a multi-line context block; the first line says it all."""
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def _config_error(schema: type, e: Exception) -> ConfigError:
  from omegaconf import errors as oc_errors

  key = getattr(e, "full_key", None) or ""
  if isinstance(e, (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError)):
    return ConfigError(f"unknown config key '{key}'{_suggestion(schema, key)}")
  line = _first_line(e)
  return ConfigError(f"bad value for config key '{key}': {line}" if key else line)


def _read_yaml(path: str | os.PathLike, max_bytes: int):
  from omegaconf import DictConfig
  from omegaconf import OmegaConf

  text = read_text_file(path, "config file", max_bytes)
  try:
    data = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
  except Exception as e:  # YAML scanner and parser errors of every kind
    where = getattr(e, "problem_mark", None) or getattr(e.__cause__, "problem_mark", None)
    line = f" at line {where.line + 1}" if where else ""
    if "expansion exceeds" in str(e):  # OmegaConf's guard against alias bombs
      raise ConfigError(
        f"config file {path} expands YAML aliases (*name) into too many values{line}: "
        "write the values out"
      ) from None
    raise ConfigError(f"config file {path} is not valid YAML{line}") from None
  if not isinstance(data, DictConfig):
    raise ConfigError(f"config file {path} must hold a mapping of keys to values")
  return data


def _override_node(schema: type, item: str | Mapping[str, Any]):
  from omegaconf import OmegaConf

  if isinstance(item, Mapping):
    return OmegaConf.create(dict(item))
  key, _, value = item.partition("=") if isinstance(item, str) else ("", "", "")
  key = key.strip().replace("-", "_")
  if not key or "=" not in item or any(not part for part in key.split(".")):
    raise ConfigError(f"bad override '{item}': expected KEY=VALUE, e.g. guidance_scale=50")
  if field_type(schema, key) is str:
    # Strings are read as typed, never as YAML: `negative_prompt=1.5` or `=yes` is a prompt.
    node: Any = value
    for part in reversed(key.split(".")):
      node = {part: node}
    return OmegaConf.create(node)
  try:
    return OmegaConf.from_dotlist([f"{key}={value}"])
  except Exception as e:  # the dotlist grammar's errors
    raise ConfigError(f"bad override '{item}': {_first_line(e)}") from None
