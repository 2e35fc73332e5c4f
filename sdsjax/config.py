"""Fit configuration: plain data, loaded from YAML with command-line overrides.

A config is a `FitConfig` dataclass. `load_config(path, overrides)` starts from the defaults,
applies a YAML file from `configs/`, then `key=value` overrides (dotted keys reach into the
`camera`, `light` and `raster` sections). Unknown keys and bad values raise `ConfigError`
with one line naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import typing
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import yaml

from sdsjax.errors import ConfigError


@dataclasses.dataclass
class CameraConfig:
  """Random camera ranges (degrees; distance in units of the head's bounding radius)."""

  azimuth_spread: float = 70.0  # std of the face-biased azimuth (0 = looking at the face)
  back_view_prob: float = 0.2  # share of uniformly drawn azimuths, so the back is seen too
  elevation_range: tuple[float, float] = (-10.0, 45.0)
  distance_range: tuple[float, float] = (2.6, 3.2)
  fov_range: tuple[float, float] = (40.0, 45.0)


@dataclasses.dataclass
class LightConfig:
  """DreamFusion-style random diffuse lighting."""

  ambient: float = 0.3
  diffuse: float = 0.7
  shading_prob: float = 0.75  # else albedo only (ambient 1, diffuse 0)
  textureless_prob: float = 0.5  # grey albedo when shaded (texture mode only)
  ambient_only_steps: int = 0  # albedo-only renders for the first steps (texture mode)


@dataclasses.dataclass
class RasterConfig:
  """Soft rasterizer settings (SoftRas σ in NDC², γ, K faces per pixel)."""

  sigma: float = 3e-5
  gamma: float = 1e-4
  faces_per_pixel: int = 8


@dataclasses.dataclass
class FitConfig:
  """Everything a fit needs besides the prompts. Field names are the YAML keys."""

  # What to fit.
  model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  head: str = "builtin"
  num_components: int = 50
  texture: bool = False
  texture_resolution: int = 256
  # Prompts.
  negative_prompt: str = ""
  view_prompts: bool = True  # append ", front view" etc. from the sampled camera
  # Schedule.
  steps: int = 1000
  seed: int = 0
  # SDS.
  guidance_scale: float = 100.0
  t_range: tuple[float, float] = (0.02, 0.98)
  t_max_end: float = 0.5  # max t anneals linearly to this over the run
  weighting: str = "sds"  # sds: 1-ᾱ | uniform: 1 | fantasia3d: √ᾱ(1-ᾱ)
  sds_samples: int = 1  # camera/t/noise draws averaged per step and prompt
  render_resolution: int = 128
  sd_resolution: int = 512  # the render is upsampled to this before the VAE
  dtype: str = "float32"  # UNet/VAE compute dtype: float32 | bfloat16
  # Optimiser: clip_by_global_norm -> L2 towards 0 -> Adam.
  lr: float = 0.05
  lr_schedule: str = "cosine"  # constant | cosine
  warmup_steps: int = 20
  adam_b1: float = 0.9
  adam_b2: float = 0.99
  grad_clip: float = 1.0
  weight_decay: float = 1e-3
  texture_lr: float = 0.02
  texture_start_step: int = 0  # tune the texture jointly (0) or after this step
  texture_smoothness: float = 1.0  # weight of the squared-gradient (Laplacian) prior
  # Output.
  checkpoint_every: int = 100
  evolution_every: int = 10  # steps between frames of evolution.gif
  preview_resolution: int = 256  # turntable / GIF render size
  # Sections.
  camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)
  light: LightConfig = dataclasses.field(default_factory=LightConfig)
  raster: RasterConfig = dataclasses.field(default_factory=RasterConfig)


def to_dict(cfg) -> dict[str, Any]:
  """The config as plain YAML-able data (tuples become lists)."""

  def plain(v):
    if isinstance(v, tuple):
      return [plain(x) for x in v]
    return v

  out = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else plain(v)
  return out


def _coerce(name: str, value: Any, annotation: Any) -> Any:
  """Checks and converts one value to the field's declared type."""
  origin = typing.get_origin(annotation)
  try:
    if origin is tuple:
      args = typing.get_args(annotation)
      if not isinstance(value, (list, tuple)) or len(value) != len(args):
        raise ValueError(f"expected a list of {len(args)} numbers")
      return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if annotation is bool:
      if isinstance(value, bool):
        return value
      raise ValueError("expected true or false")
    if annotation is int:
      if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer")
      return int(value)
    if annotation is float:
      if isinstance(value, bool):
        raise ValueError("expected a number")
      return float(value)
    if annotation is str:
      if not isinstance(value, str):
        raise ValueError("expected a string")
      return value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"bad value for config key '{name}': {value!r} ({e})") from None
  raise ConfigError(f"config key '{name}' cannot be set")


def _apply(cfg, updates: Mapping[str, Any], prefix: str = "") -> None:
  hints = typing.get_type_hints(type(cfg))
  known = {f.name for f in dataclasses.fields(cfg)}
  for key, value in updates.items():
    name = prefix + str(key)
    if key not in known:
      raise ConfigError(f"unknown config key '{name}' (known: {', '.join(sorted(known))})")
    current = getattr(cfg, key)
    if dataclasses.is_dataclass(current):
      if not isinstance(value, Mapping):
        raise ConfigError(
          f"config key '{name}' is a section: give a mapping, e.g. {name}.KEY=VALUE"
        )
      _apply(current, value, prefix=name + ".")
    else:
      setattr(cfg, key, _coerce(name, value, hints[key]))


def parse_override(text: str) -> dict[str, Any]:
  """'raster.sigma=1e-5' -> {'raster': {'sigma': 1e-05}}; values are parsed as YAML."""
  if "=" not in text:
    raise ConfigError(f"bad override '{text}': expected KEY=VALUE, e.g. guidance_scale=50")
  key, raw = text.split("=", 1)
  key = key.strip().lstrip("-").replace("-", "_")
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    value = raw
  # YAML reads '1e-5' as a string; accept it as the number the user meant.
  if isinstance(value, str):
    with contextlib.suppress(ValueError):
      value = float(value) if any(c in value for c in ".eE") else value
  out: dict[str, Any] = {}
  node = out
  parts = key.split(".")
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  node[parts[-1]] = value
  return out


def load_config(
  path: str | os.PathLike | None = None, overrides: Sequence[str | Mapping[str, Any]] = ()
) -> FitConfig:
  """Defaults, then the YAML file at `path`, then each override in order."""
  cfg = FitConfig()
  if path is not None:
    try:
      with open(path) as f:
        data = yaml.safe_load(f)
    except FileNotFoundError:
      raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
      where = getattr(e, "problem_mark", None)
      line = f" at line {where.line + 1}" if where else ""
      raise ConfigError(f"config file {path} is not valid YAML{line}") from None
    if data is not None:
      if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
      _apply(cfg, data)
  for item in overrides:
    _apply(cfg, parse_override(item) if isinstance(item, str) else item)
  validate(cfg)
  return cfg


def validate(cfg: FitConfig) -> None:
  """Checks the values that would otherwise fail deep inside the step."""

  def need(ok: bool, message: str):
    if not ok:
      raise ConfigError(message)

  need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
  for name in ("render_resolution", "sd_resolution"):
    value = getattr(cfg, name)
    need(value >= 8 and value % 8 == 0, f"{name} must be a positive multiple of 8, got {value}")
  need(cfg.texture_resolution >= 2, "texture_resolution must be >= 2")
  need(
    cfg.weighting in ("sds", "uniform", "fantasia3d"),
    f"weighting must be sds, uniform or fantasia3d, got '{cfg.weighting}'",
  )
  need(
    cfg.lr_schedule in ("constant", "cosine"),
    f"lr_schedule must be constant or cosine, got '{cfg.lr_schedule}'",
  )
  need(
    cfg.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got '{cfg.dtype}'"
  )
  lo, hi = cfg.t_range
  need(
    0.0 <= lo < hi <= 1.0 and lo <= cfg.t_max_end <= 1.0,
    f"t_range must satisfy 0 <= min < max <= 1 and t_max_end in [min, 1], got {cfg.t_range}, {cfg.t_max_end}",
  )
  need(cfg.sds_samples >= 1, "sds_samples must be >= 1")
  need(cfg.num_components >= 1, "num_components must be >= 1")
  need(
    cfg.checkpoint_every >= 1 and cfg.evolution_every >= 1,
    "checkpoint_every and evolution_every must be >= 1",
  )
  need(cfg.raster.faces_per_pixel >= 1, "raster.faces_per_pixel must be >= 1")
  need(cfg.raster.sigma > 0 and cfg.raster.gamma > 0, "raster.sigma and raster.gamma must be > 0")
  need(
    cfg.preview_resolution % 8 == 0 and cfg.preview_resolution >= 8,
    f"preview_resolution must be a positive multiple of 8, got {cfg.preview_resolution}",
  )
