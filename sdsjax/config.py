"""Fit configuration: plain dataclasses, merged by OmegaConf from YAML and dotted overrides.

A config is a `FitConfig`. `load_config(path, overrides)` starts from its defaults (each default
lives in one place: the library's own `CameraRanges`, `LightSettings` and `RasterSettings` for
their sections), merges a YAML file from `configs/`, then `key=value` overrides (dotted keys
reach into sections: `raster.sigma=1e-5`, `camera.elevation_range=[0,30]`), as threestudio
does. OmegaConf checks keys and types (and suggests the near key for a typo); `validate`
checks ranges. Every failure is one `ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Union

from sdsjax import camera
from sdsjax import raster
from sdsjax.errors import ConfigError

# The raster section is RasterSettings without its per-render image size, so its defaults and
# its checks stay in sdsjax.raster.
RasterConfig = dataclasses.make_dataclass(
  "RasterConfig",
  [
    (f.name, f.type, dataclasses.field(default=f.default))
    for f in dataclasses.fields(raster.RasterSettings)
    if f.name != "image_size"
  ],
  frozen=True,
)
RasterConfig.__doc__ = "Soft rasterizer settings: `sdsjax.raster.RasterSettings` less `image_size`."


@dataclasses.dataclass(frozen=True)
class LightConfig(camera.LightSettings):
  """Random lights (`sdsjax.camera.LightSettings`) plus their schedule in a texture fit."""

  ambient_only_steps: int = 0  # albedo-only renders for the first steps (texture fits)


@dataclasses.dataclass(frozen=True)
class PriorConfig:
  """Regularisers, added to the clipped SDS gradient before Adam (so they are scale-free).

  `identity`, `expression` and `pose` are λ of a Gaussian prior −log p = ½λ‖x‖² on each
  parameter group: its gradient λx is added after gradient clipping, where the SDS gradient's
  norm is at most `grad_clip`, so λ = 0.1 balances a full-strength push at ‖x‖ = 10·grad_clip.
  `fold` weighs a penalty on faces whose normal turns more than acos(fold_cos) away from the
  mean shape's (creases and self-intersections start as such fold-overs).
  """

  identity: float = 0.1
  expression: float = 0.1
  pose: float = 1.0
  fold: float = 1.0
  fold_cos: float = 0.5


@dataclasses.dataclass
class FitConfig:
  """Everything a fit needs besides the prompts. Field names are the YAML keys."""

  # What to fit.
  model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  head: str = "builtin"
  num_components: int = 50
  num_expressions: int = 0  # leading expression components fitted jointly (0: identity only)
  pose_joints: tuple[str, ...] = ()  # joints whose rotation is fitted, e.g. [jaw] (FLAME)
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
  t_schedule: str = "anneal"  # anneal: max t falls linearly to t_max_end | random | dreamtime
  t_max_end: float = 0.5
  weighting: str = "sds"  # sds: 1-ᾱ | uniform: 1 | fantasia3d: √ᾱ(1-ᾱ)
  sds_samples: int = 1  # camera/t/noise draws averaged per step and prompt
  render_resolution: int = 128
  sd_resolution: int = 512  # the render is upsampled to this before the VAE
  dtype: str = "float32"  # UNet/VAE compute dtype: float32 | bfloat16
  # Optimiser: clip_by_global_norm -> prior -> Adam, per parameter group.
  lr: float = 0.05
  lr_schedule: str = "cosine"  # constant | cosine
  warmup_steps: int = 20
  adam_b1: float = 0.9
  adam_b2: float = 0.99
  grad_clip: float = 1.0
  expression_lr: float = 0.05
  expression_start_step: int = 0  # tune expressions jointly (0) or after this step
  pose_lr: float = 0.02
  texture_lr: float = 0.02
  texture_start_step: int = 0  # tune the texture jointly (0) or after this step
  texture_smoothness: float = 1.0  # weight of the squared-gradient (Laplacian) prior
  prior: PriorConfig = dataclasses.field(default_factory=PriorConfig)
  # Robustness.
  max_bad_steps: int = 20  # stop after this many consecutive non-finite steps
  max_weight: float = 10.0  # stop when a weight leaves ±max_weight σ
  # Many prompts: a wave is devices × prompts_per_device prompts, one compiled program.
  prompts_per_device: Union[int, str] = "auto"  # noqa: UP007 (OmegaConf needs typing.Union)
  # Output.
  checkpoint_every: int = 100
  evolution_every: int = 10  # steps between frames of evolution.gif
  preview_resolution: int = 256  # turntable / GIF render size
  # Sections.
  camera: camera.CameraRanges = dataclasses.field(default_factory=camera.CameraRanges)
  light: LightConfig = dataclasses.field(default_factory=LightConfig)
  raster: RasterConfig = dataclasses.field(default_factory=RasterConfig)


SECTIONS = ("camera", "light", "raster", "prior")
MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; this bounds what is read


def to_dict(cfg: FitConfig) -> dict[str, Any]:
  """The config as plain YAML/JSON-able data (tuples become lists)."""
  from omegaconf import OmegaConf

  return OmegaConf.to_container(OmegaConf.structured(cfg))


def _error_line(e: Exception) -> str:
  """OmegaConf messages carry a multi-line context block; the first line says it all."""
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def _config_error(e: Exception) -> ConfigError:
  from omegaconf import errors as oc_errors

  key = getattr(e, "full_key", None) or ""
  line = _error_line(e)
  if isinstance(e, (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError)):
    return ConfigError(f"unknown config key '{key}'{_suggestion(key)}")
  return ConfigError(f"bad value for config key '{key}': {line}" if key else line)


def _read_yaml(path: str | os.PathLike):
  from omegaconf import DictConfig
  from omegaconf import OmegaConf

  if os.path.isdir(path):
    raise ConfigError(f"config file {path} is a folder, not a YAML file")
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  if not os.path.isfile(path):  # a FIFO blocks, /dev/zero never ends
    raise ConfigError(f"config file {path} is not a regular file: save the config in one")
  if os.path.getsize(path) > MAX_CONFIG_BYTES:
    raise ConfigError(
      f"config file {path} is too large ({os.path.getsize(path)} bytes, at most "
      f"{MAX_CONFIG_BYTES}): is it really a config?"
    )
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError:
    raise ConfigError(f"config file {path} is not UTF-8 text (is it a YAML file?)") from None
  except OSError as e:
    raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
  if "\0" in text:
    raise ConfigError(f"config file {path} is binary, not YAML")
  try:
    data = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
  except Exception as e:  # YAML scanner and parser errors of every kind
    where = getattr(e, "problem_mark", None) or getattr(
      getattr(e, "__cause__", None), "problem_mark", None
    )
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


def _field_type(dotted: str):
  """The declared type of a config key (None when unknown: OmegaConf then reports it)."""
  import typing

  cls = FitConfig
  for part in dotted.split("."):
    if not dataclasses.is_dataclass(cls):
      return None
    hints = typing.get_type_hints(cls)
    if part not in hints:
      return None
    cls = hints[part]
  return cls


def _suggestion(key: str) -> str:
  """' (did you mean 'raster.sigma'?)' for a near-miss key, else ''."""
  import difflib

  parent, _, leaf = key.rpartition(".")
  cls = _field_type(parent) if parent else FitConfig
  if not dataclasses.is_dataclass(cls):
    return ""
  names = [f.name for f in dataclasses.fields(cls)]
  near = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
  return f" (did you mean '{parent + '.' if parent else ''}{near[0]}'?)" if near else ""


def _override_node(item: str | Mapping[str, Any]):
  from omegaconf import OmegaConf

  if isinstance(item, Mapping):
    return OmegaConf.create(dict(item))
  if not isinstance(item, str) or "=" not in item:
    raise ConfigError(f"bad override '{item}': expected KEY=VALUE, e.g. guidance_scale=50")
  key, value = item.split("=", 1)
  key = key.strip().replace("-", "_")
  if not key or any(not part for part in key.split(".")):
    raise ConfigError(f"bad override '{item}': expected KEY=VALUE, e.g. guidance_scale=50")
  if _field_type(key) is str:
    # Strings are read as typed, never as YAML: `negative_prompt=1.5` or `=yes` is a prompt.
    node: Any = value
    for part in reversed(key.split(".")):
      node = {part: node}
    return OmegaConf.create(node)
  try:
    return OmegaConf.from_dotlist([f"{key}={value}"])
  except Exception as e:  # the dotlist grammar's errors
    raise ConfigError(f"bad override '{item}': {_error_line(e)}") from None


def _check_lengths(node, prefix: str = "") -> None:
  """Lists given for fixed-length tuple keys must have that length (OmegaConf's error for a
  wrong length names no key)."""
  import typing

  from omegaconf import OmegaConf

  for key, value in node.items_ex(resolve=False):
    dotted = f"{prefix}{key}"
    if OmegaConf.is_dict(value):
      _check_lengths(value, dotted + ".")
    elif OmegaConf.is_list(value):
      hint = _field_type(dotted)
      args = typing.get_args(hint)
      if typing.get_origin(hint) is tuple and Ellipsis not in args and len(value) != len(args):
        raise ConfigError(
          f"{dotted} must be a list of {len(args)} values, e.g. {dotted}=[min, max]; "
          f"got {len(value)}"
        )


def load_config(
  path: str | os.PathLike | None = None,
  overrides: Sequence[str | Mapping[str, Any]] = (),
) -> FitConfig:
  """Defaults, then the YAML file at `path`, then each override in order; validated."""
  from omegaconf import OmegaConf
  from omegaconf import errors as oc_errors

  merged = OmegaConf.structured(FitConfig)
  layers = [] if path is None else [_read_yaml(path)]
  layers += [_override_node(item) for item in overrides]
  for layer in layers:
    for section in SECTIONS:
      if section in layer and not OmegaConf.is_dict(layer[section]):
        raise ConfigError(
          f"config key '{section}' is a section: give a mapping, e.g. {section}.KEY=VALUE"
        )
  for layer in layers:
    _check_lengths(layer)
  try:
    for layer in layers:
      merged = OmegaConf.merge(merged, layer)
  except oc_errors.OmegaConfBaseException as e:
    raise _config_error(e) from None
  # The sections are the library's own dataclasses: their checks raise ValueError naming the
  # field, which becomes the dotted config key here.
  for section in SECTIONS:
    try:
      OmegaConf.to_object(merged[section])
    except ValueError as e:
      raise ConfigError(f"{section}.{e}") from None
  try:
    cfg = OmegaConf.to_object(merged)
  except oc_errors.OmegaConfBaseException as e:
    raise _config_error(e) from None
  validate(cfg)
  return cfg


# Valid ranges of the top-level numbers: (min, max), inclusive.
RANGES: dict[str, tuple[float, float]] = {
  "num_components": (1, 1000),
  "num_expressions": (0, 1000),
  "texture_resolution": (2, 4096),
  "steps": (1, 10_000_000),
  "seed": (0, 2**32 - 1),  # JAX keys hold 32 bits of the seed (without x64)
  "guidance_scale": (0.0, 1e4),
  "t_max_end": (0.0, 1.0),
  "sds_samples": (1, 64),
  "render_resolution": (8, 4096),
  "sd_resolution": (8, 4096),
  "lr": (0.0, 10.0),
  "warmup_steps": (0, 10_000_000),
  "adam_b1": (0.0, 0.999999),
  "adam_b2": (0.0, 0.999999),
  "grad_clip": (1e-12, 1e12),
  "expression_lr": (0.0, 10.0),
  "expression_start_step": (0, 10_000_000),
  "pose_lr": (0.0, 10.0),
  "texture_lr": (0.0, 10.0),
  "texture_start_step": (0, 10_000_000),
  "texture_smoothness": (0.0, 1e6),
  "max_bad_steps": (1, 10_000_000),
  "max_weight": (1.0, 1e3),
  "checkpoint_every": (1, 10_000_000),
  "evolution_every": (1, 10_000_000),
  "preview_resolution": (8, 4096),
  "prior.identity": (0.0, 1e3),
  "prior.expression": (0.0, 1e3),
  "prior.pose": (0.0, 1e3),
  "prior.fold": (0.0, 1e6),
  "prior.fold_cos": (-1.0, 1.0),
  "light.ambient_only_steps": (0, 10_000_000),
  # The rasterizer's own checks (RasterSettings) are signs only: these bound its sizes and
  # exclude inf, which would turn the soft coverage into NaN.
  "raster.sigma": (1e-12, 1.0),
  "raster.gamma": (1e-12, 1e3),
  "raster.eps": (0.0, 1.0),
  "raster.near": (1e-6, 1e3),
  "raster.far": (1e-6, 1e6),
  "raster.faces_per_pixel": (1, 256),
  "raster.bin_size": (0, 4096),
  "raster.max_faces_per_bin": (0, 1_000_000),
  "raster.tiles_per_chunk": (0, 1_000_000),
  "raster.pixels_per_chunk": (0, 2**24),
  "raster.depth_tolerance": (1e-9, 1e3),
}
CHOICES: dict[str, tuple[str, ...]] = {
  "weighting": ("sds", "uniform", "fantasia3d"),
  "lr_schedule": ("constant", "cosine"),
  "t_schedule": ("anneal", "random", "dreamtime"),
  "dtype": ("float32", "bfloat16"),
}


def _number(x) -> str:
  return str(x) if isinstance(x, int) else f"{x:g}"


def _get(cfg, dotted: str):
  for part in dotted.split("."):
    cfg = getattr(cfg, part)
  return cfg


def validate(cfg: FitConfig) -> None:
  """Checks every value's range, so nothing fails later deep inside the step."""

  def need(ok: bool, message: str):
    if not ok:
      raise ConfigError(message)

  for key, (lo, hi) in RANGES.items():
    value = _get(cfg, key)
    need(
      math.isfinite(value) and lo <= value <= hi,
      f"{key} must be in [{_number(lo)}, {_number(hi)}], got {value!r}",
    )
  for key, options in CHOICES.items():
    value = _get(cfg, key)
    need(value in options, f"{key} must be one of {', '.join(options)}, got '{value}'")
  for name in ("render_resolution", "sd_resolution", "preview_resolution"):
    value = getattr(cfg, name)
    need(value % 8 == 0, f"{name} must be a positive multiple of 8, got {value}")
  lo, hi = cfg.t_range
  need(
    all(math.isfinite(v) for v in cfg.t_range)
    and 0.0 <= lo < hi <= 1.0
    and lo <= cfg.t_max_end <= hi,
    f"t_range must satisfy 0 <= min < max <= 1 with t_max_end in [min, max], "
    f"got {list(cfg.t_range)}, {cfg.t_max_end}",
  )
  ppd = cfg.prompts_per_device
  need(
    ppd == "auto" or (isinstance(ppd, int) and not isinstance(ppd, bool) and 1 <= ppd <= 4096),
    f"prompts_per_device must be 'auto' or an integer in [1, 4096], got {ppd!r}",
  )
  need(
    len(set(cfg.pose_joints)) == len(cfg.pose_joints) and all(cfg.pose_joints),
    f"pose_joints must name distinct joints, got {list(cfg.pose_joints)}",
  )
  need(bool(cfg.model.strip()), "model is empty: give a diffusers folder, a hub id or tiny-random")
  for name in ("model", "head", "negative_prompt"):
    value = getattr(cfg, name)
    need("\0" not in value, f"{name} contains a NUL character")
    need(
      value.encode("utf-8", "replace").decode("utf-8") == value,
      f"{name} is not valid UTF-8 text (bytes that could not be decoded): retype it",
    )
  try:
    raster_settings(cfg, cfg.render_resolution)
  except ValueError as e:
    message = str(e)
    raise ConfigError(message if message.startswith("raster.") else f"raster.{message}") from None


def raster_settings(cfg: FitConfig, resolution: int) -> raster.RasterSettings:
  """The raster section at one image size."""
  return raster.RasterSettings(image_size=resolution, **dataclasses.asdict(cfg.raster))
