"""Dataclass fields that carry their valid values, so a default and its range sit on one line.

`bounded(default, lo, hi)` and `one_of(default, *others)` declare a field; `check_fields(obj)`,
called from `__post_init__` (or by the config layer), raises a plain `ValueError` naming the
first bad field. The CLI layer adds the config section to that name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def bounded(default: Any, lo: float, hi: float, **kwargs) -> Any:
  """A field that must be finite and within [lo, hi]; a tuple default is a [min, max] pair
  whose both ends must be, with min <= max."""
  metadata = dict(kwargs.pop("metadata", {}), range=(lo, hi))
  return dataclasses.field(default=default, metadata=metadata, **kwargs)


def one_of(default: str, *others: str, **kwargs) -> Any:
  """A string field that must be `default` or one of `others`."""
  metadata = dict(kwargs.pop("metadata", {}), choices=(default, *others))
  return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _number(x) -> str:
  return str(x) if isinstance(x, int) else f"{x:g}"


def in_range(value, lo, hi) -> bool:
  """A finite int or float (not a bool) within [lo, hi]."""
  return (
    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ) and lo <= value <= hi


def check_fields(obj) -> None:
  """Checks every `bounded` / `one_of` field of the dataclass instance `obj`."""
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if "choices" in f.metadata and value not in f.metadata["choices"]:
      raise ValueError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got '{value}'")
    if "range" not in f.metadata:
      continue
    lo, hi = f.metadata["range"]
    if isinstance(f.default, tuple):
      ok = isinstance(value, (tuple, list)) and len(value) == 2
      if not (ok and all(in_range(v, lo, hi) for v in value) and value[0] <= value[1]):
        raise ValueError(
          f"{f.name} must be [min, max] with min <= max, both in [{_number(lo)}, "
          f"{_number(hi)}], got {list(value) if isinstance(value, (tuple, list)) else value!r}"
        )
    elif not in_range(value, lo, hi):
      raise ValueError(f"{f.name} must be in [{_number(lo)}, {_number(hi)}], got {value!r}")
