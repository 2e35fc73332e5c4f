"""Fit configuration: plain dataclasses, merged by OmegaConf from YAML and dotted overrides.

A config is a `FitConfig`. `load_config(path, overrides)` starts from its defaults, merges a
YAML file from `configs/`, then `key=value` overrides (dotted keys reach into sections:
`raster.sigma=1e-5`, `camera.elevation_range=[0,30]`), through `sdsjax.structured_config`.
Each default lives in one place, beside its valid range (`sdsjax.field_checks`): here for the
top-level keys, in the library's own `CameraRanges`, `LightSettings`, `RasterSettings` and
`Priors` for the sections. Every failure is one `ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Union

from sdsjax import camera
from sdsjax import priors
from sdsjax import raster
from sdsjax.errors import ConfigError
from sdsjax.field_checks import bounded
from sdsjax.field_checks import check_fields
from sdsjax.field_checks import one_of
from sdsjax.structured_config import load_structured
from sdsjax.text_files import check_text

STEPS = 10_000_000  # upper bound of every step count
MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; this bounds what is read

# The raster section is RasterSettings without its per-render image size, so its defaults and
# its checks stay in sdsjax.raster.
RasterConfig = dataclasses.make_dataclass(
  "RasterConfig",
  [
    (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
    for f in dataclasses.fields(raster.RasterSettings)
    if f.name != "image_size"
  ],
  frozen=True,
)
RasterConfig.__doc__ = "Soft rasterizer settings: `sdsjax.raster.RasterSettings` less `image_size`."


@dataclasses.dataclass(frozen=True)
class LightConfig(camera.LightSettings):
  """Random lights (`sdsjax.camera.LightSettings`) plus their schedule in a texture fit."""

  ambient_only_steps: int = bounded(0, 0, STEPS)  # albedo-only renders first (texture fits)


@dataclasses.dataclass
class FitConfig:
  """Everything a fit needs besides the prompts. Field names are the YAML keys."""

  # What to fit.
  model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  head: str = "builtin"
  num_components: int = bounded(50, 1, 1000)
  num_expressions: int = bounded(0, 0, 1000)  # expression components fitted (0: none)
  pose_joints: tuple[str, ...] = ()  # joints whose rotation is fitted, e.g. [jaw] (FLAME)
  texture: bool = False
  texture_resolution: int = bounded(256, 2, 4096)
  # Prompts.
  negative_prompt: str = ""
  view_prompts: bool = True  # append ", front view" etc. from the sampled camera
  # Schedule.
  steps: int = bounded(1000, 1, STEPS)
  seed: int = bounded(0, 0, 2**32 - 1)  # JAX keys hold 32 bits of the seed (without x64)
  # SDS.
  guidance_scale: float = bounded(100.0, 0.0, 1e4)
  t_range: tuple[float, ...] = bounded((0.02, 0.98), 0.0, 1.0)
  # anneal: max t falls linearly to t_max_end, then holds | random | dreamtime. Ending low
  # (HumanNorm anneals 0.8 -> 0.2) lets the fit settle where CFG overshoots least
  # (benchmarks/RESULTS.md, "Fit quality").
  t_schedule: str = one_of("anneal", "random", "dreamtime")
  t_max_end: float = bounded(0.2, 0.0, 1.0)
  t_anneal_fraction: float = bounded(0.5, 0.0, 1.0)  # share of the steps max t takes to fall
  weighting: str = one_of("sds", "uniform", "fantasia3d")  # 1-ᾱ | 1 | √ᾱ(1-ᾱ)
  sds_samples: int = bounded(1, 1, 64)  # camera/t/noise draws averaged per step and prompt
  render_resolution: int = bounded(128, 8, 4096)
  sd_resolution: int = bounded(512, 8, 4096)  # the render is upsampled to this before the VAE
  dtype: str = one_of("float32", "bfloat16")  # UNet/VAE compute dtype
  # Optimiser: clip_by_global_norm -> prior -> Adam, per parameter group.
  lr: float = bounded(0.1, 0.0, 10.0)  # TADA's lr for SMPL-X betas
  # exponential: TADA's decay, lr·0.1^(progress) after the warmup, to lr/10 at the last step.
  lr_schedule: str = one_of("exponential", "cosine", "constant")
  warmup_steps: int = bounded(20, 0, STEPS)
  adam_b1: float = bounded(0.9, 0.0, 0.999999)
  adam_b2: float = bounded(0.99, 0.0, 0.999999)
  grad_clip: float = bounded(1.0, 1e-12, 1e12)
  expression_lr: float = bounded(0.05, 0.0, 10.0)
  expression_start_step: int = bounded(0, 0, STEPS)  # 0: with the identity
  pose_lr: float = bounded(0.02, 0.0, 10.0)
  texture_lr: float = bounded(0.01, 0.0, 10.0)  # per pyramid level (texture_coarsest)
  texture_start_step: int = bounded(0, 0, STEPS)  # 0: with the shape
  texture_smoothness: float = bounded(1.0, 0.0, 1e6)  # squared-gradient prior
  # Adam runs on a pyramid of textures, halving down to this many texels per side, whose
  # upsampled sum is the texture (sdsjax.texture_pyramid); ≥ texture_resolution: per texel.
  texture_coarsest: int = bounded(8, 1, 4096)
  prior: priors.Priors = dataclasses.field(default_factory=priors.Priors)
  # Robustness.
  max_bad_steps: int = bounded(20, 1, STEPS)  # stop after this many consecutive non-finite steps
  max_weight: float = bounded(10.0, 1.0, 1e3)  # stop when a weight leaves ±max_weight σ
  # Many prompts: a wave is devices × prompts_per_device prompts, one compiled program.
  prompts_per_device: Union[int, str] = "auto"  # noqa: UP007 (OmegaConf needs typing.Union)
  # Output.
  checkpoint_every: int = bounded(100, 1, STEPS)
  evolution_every: int = bounded(10, 1, STEPS)  # steps between frames of evolution.gif
  preview_resolution: int = bounded(256, 8, 4096)  # turntable / GIF render size
  # Sections.
  camera: camera.CameraRanges = dataclasses.field(default_factory=camera.CameraRanges)
  light: LightConfig = dataclasses.field(default_factory=LightConfig)
  raster: RasterConfig = dataclasses.field(default_factory=RasterConfig)


def to_dict(cfg: FitConfig) -> dict[str, Any]:
  """The config as plain YAML/JSON-able data (tuples become lists), equal to its JSON
  round trip (what a run stores and `--resume` compares against)."""
  from omegaconf import OmegaConf

  def plain(x):
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):  # OmegaConf keeps a structured config's tuples
      return [plain(v) for v in x]
    return x

  return plain(OmegaConf.to_container(OmegaConf.structured(cfg)))


def load_config(
  path: str | os.PathLike | None = None,
  overrides: Sequence[str | Mapping[str, Any]] = (),
) -> FitConfig:
  """Defaults, then the YAML file at `path`, then each override in order; validated."""
  cfg = load_structured(FitConfig, path, overrides, MAX_CONFIG_BYTES)
  validate(cfg)
  return cfg


def validate(cfg: FitConfig) -> None:
  """Checks every value's range, so nothing fails later deep inside the step. The sections
  check their own fields when they are made."""

  def need(ok: bool, message: str):
    if not ok:
      raise ConfigError(message)

  try:
    check_fields(cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for name in ("render_resolution", "sd_resolution", "preview_resolution"):
    value = getattr(cfg, name)
    need(value % 8 == 0, f"{name} must be a positive multiple of 8, got {value}")
  lo, hi = cfg.t_range
  need(
    lo < hi and lo <= cfg.t_max_end <= hi,
    f"t_range must satisfy min < max with t_max_end in [min, max], got {list(cfg.t_range)}, "
    f"{cfg.t_max_end}",
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
    check_text(getattr(cfg, name), name)
  try:
    raster_settings(cfg, cfg.render_resolution)
  except ValueError as e:
    raise ConfigError(f"raster.{e}") from None


def raster_settings(cfg: FitConfig, resolution: int) -> raster.RasterSettings:
  """The raster section at one image size."""
  return raster.RasterSettings(image_size=resolution, **dataclasses.asdict(cfg.raster))
