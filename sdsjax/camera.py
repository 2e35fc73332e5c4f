"""Look-at cameras, random views and random lights for SDS fitting.

Conventions (docs/design.md):

* World frame: +y up, the face looks towards +z, the head is centred at the origin with
  bounding radius 1.
* Azimuth 0° puts the camera on +z (looking at the face); azimuth increases towards +x.
  Elevation > 0 is above. `orbit_camera` puts the eye at
  `distance * (cos(el) sin(az), sin(el), cos(el) cos(az))`, looking at the origin.
* View frame: +x right, +y up, the camera looks down −z. `Camera.world_to_view` maps
  homogeneous world points to it.
* Perspective projection for square images: `depth = −z_v`,
  `ndc = focal * (x_v, y_v) / depth` with `focal = 1 / tan(fov_y / 2)`. NDC x grows to the
  right and NDC y grows upwards; the image spans [−1, 1]² (row 0 is the top, NDC y = +1).

Everything here takes and returns arrays, so it jits and vmaps (vmap over keys with the
`CameraRanges` closed over: `jax.vmap(lambda k: sample_camera(k, ranges))(keys)`).
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
from flax import struct

from sdsjax import unrolled
from sdsjax.field_checks import bounded
from sdsjax.field_checks import check_fields
from sdsjax.field_checks import in_range

Array = jax.Array

VIEW_SUFFIXES = ("front view", "side view", "back view", "overhead view")


@struct.dataclass
class Camera:
  """A pinhole camera for square images.

  Attributes:
    world_to_view: (4, 4) rigid transform from world to view coordinates.
    focal: () `1 / tan(fov_y / 2)`; NDC x = focal * x_v / −z_v.
    eye: (3,) camera centre in world coordinates.
  """

  world_to_view: Array
  focal: Array
  eye: Array


@struct.dataclass
class Light:
  """A directional light with ambient and Lambertian terms.

  Shaded colour = albedo * (ambient + diffuse * max(0, n · direction)).

  Attributes:
    direction: (3,) world-space unit vector pointing from the surface towards the light.
    ambient: () ambient intensity.
    diffuse: () diffuse intensity.
    textureless: () 1.0 renders with the constant grey albedo instead of the texture
      (DreamFusion's "textureless" renders), 0.0 uses the texture; values between blend.
  """

  direction: Array
  ambient: Array
  diffuse: Array
  textureless: Array


@dataclasses.dataclass(frozen=True)
class CameraRanges:
  """Ranges of random cameras (degrees; distance in units of the head's bounding radius).

  The azimuth is face-biased: with probability `1 − back_view_prob` it is drawn from a
  normal around 0° with std `azimuth_spread`, truncated to [−180°, 180°]; otherwise it is
  uniform on [−180°, 180°), so the back of the head is seen too. With the defaults (close-ups
  below included) about 55% of the views are front views (|azimuth| < 45°) and about 2.6% are
  back views (`view_probabilities` gives the exact shares).

  The default distance and fov keep the unit bounding sphere at an NDC radius of about
  0.8–1.15 (`focal * r / sqrt(d² − r²)`), so a head (whose half-height is smaller than its
  bounding radius) fills most of the frame without being cropped.

  A share `closeup_prob` (70%) of the views are face close-ups (TADA renders 30% of its
  steps so, for whole bodies; 70% was chosen on `benchmarks/bench_quality.py`):
  the eye is drawn as above but from the front half only (a normal of std `azimuth_spread`
  truncated to ±90°), it looks at `closeup_target` (the face in the world frame; empty until
  `sdsjax.fit_step.resolve_closeup_target` fills it from the head model) and the fov is narrowed by
  `closeup_zoom`. Most identity and expression components act on the face, which a
  whole-head view shows at a fraction of the image.
  """

  azimuth_spread: float = bounded(70.0, 1e-3, 1e4)
  back_view_prob: float = bounded(0.2, 0.0, 1.0)
  elevation_range: tuple[float, ...] = bounded((-10.0, 45.0), -89.0, 89.0)
  # The eye stays outside the unit bounding sphere (and not absurdly far).
  distance_range: tuple[float, ...] = bounded((2.6, 3.2), 1.05, 100.0)
  fov_range: tuple[float, ...] = bounded((40.0, 45.0), 1.0, 170.0)
  closeup_prob: float = bounded(0.7, 0.0, 1.0)
  # [x, y, z] in the world frame; [] (the default): behind the head's nose tip, from the head
  # model (`sdsjax.fit_step.resolve_closeup_target`).
  closeup_target: tuple[float, ...] = ()
  closeup_zoom: float = bounded(1.6, 1.0, 100.0)

  def __post_init__(self):
    check_fields(self)
    target = self.closeup_target
    if not (
      isinstance(target, (tuple, list))
      and len(target) in (0, 3)
      and all(in_range(x, -1.0, 1.0) for x in target)
    ):
      raise ValueError(
        "closeup_target must be [x, y, z] inside the unit bounding box, or [] for the head "
        f"model's face, got {target!r}"
      )


@dataclasses.dataclass(frozen=True)
class LightSettings:
  """DreamFusion-style random diffuse lighting (see `sample_light`).

  Defaults: ambient 0.3 / diffuse 0.7 rather than DreamFusion's 0.1 / 0.9, because a head
  seen from the side with 0.1 ambient leaves half the face nearly black, which Stable
  Diffusion reads as a dark-skinned or shadowed face. DreamFusion shades with probability
  0.75 and draws textureless (grey albedo) renders half of the shaded time.
  """

  ambient: float = bounded(0.3, 0.0, 10.0)
  diffuse: float = bounded(0.7, 0.0, 10.0)
  shading_prob: float = bounded(0.75, 0.0, 1.0)  # else albedo only (ambient 1, diffuse 0)
  textureless_prob: float = bounded(0.5, 0.0, 1.0)  # grey albedo when shaded (texture fits)
  position_std: float = bounded(1.0, 0.0, 100.0)  # std of the light position around the eye

  def __post_init__(self):
    check_fields(self)
    if self.ambient + self.diffuse <= 0:
      raise ValueError("ambient must be > 0 when diffuse is 0 (the renders would be black)")


def view_probabilities(ranges: CameraRanges) -> dict[str, float]:
  """Exact shares of front (|az| < 45°) and back (|az| > 135°) azimuths under `ranges`."""
  spread = ranges.azimuth_spread

  def normal_cdf(x):
    return 0.5 * (1.0 + math.erf(x / (spread * math.sqrt(2.0))))

  mass = normal_cdf(180.0) - normal_cdf(-180.0)
  front_normal = (normal_cdf(45.0) - normal_cdf(-45.0)) / mass
  back_normal = 2.0 * (normal_cdf(180.0) - normal_cdf(135.0)) / mass
  p = ranges.back_view_prob
  # Close-ups: the normal truncated to ±90°, so never a back view.
  front_closeup = (normal_cdf(45.0) - normal_cdf(-45.0)) / (normal_cdf(90.0) - normal_cdf(-90.0))
  c = ranges.closeup_prob
  return {
    "front": (1 - c) * ((1 - p) * front_normal + p * 0.25) + c * front_closeup,
    "back": (1 - c) * ((1 - p) * back_normal + p * 0.25),
    "closeup": c,
  }


def _normalize(v: Array) -> Array:
  return unrolled.normalize_last(v, 1e-12)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), fov_deg=40.0) -> Camera:
  """A camera at `eye` looking at `target`.

  Args:
    eye: (3,) camera centre.
    target: (3,) point the camera looks at.
    up: (3,) approximate up direction. When it is parallel to the viewing direction
      (looking straight down or up), world −z or +z is used instead so the result stays
      finite.
    fov_deg: () vertical field of view in degrees.

  Returns:
    The camera; its view frame has −z towards `target`.
  """
  eye = jnp.asarray(eye, dtype=jnp.result_type(float))
  dtype = eye.dtype
  target = jnp.asarray(target, dtype)
  up = jnp.asarray(up, dtype)
  chex.assert_shape([eye, target, up], (3,))
  z_axis = _normalize(eye - target)  # the camera looks down −z
  x_raw = jnp.cross(up, z_axis)
  # Overhead views: fall back to an up vector that is not parallel to the view direction.
  fallback_up = jnp.where(
    z_axis[1] > 0, jnp.array([0.0, 0.0, -1.0], dtype), jnp.array([0.0, 0.0, 1.0], dtype)
  )
  degenerate = jnp.sum(x_raw * x_raw) < 1e-12
  x_raw = jnp.where(degenerate, jnp.cross(fallback_up, z_axis), x_raw)
  x_axis = _normalize(x_raw)
  y_axis = jnp.cross(z_axis, x_axis)
  rotation = jnp.stack([x_axis, y_axis, z_axis])  # rows: view axes in world coordinates
  translation = -rotation @ eye
  world_to_view = jnp.eye(4, dtype=dtype)
  world_to_view = world_to_view.at[:3, :3].set(rotation).at[:3, 3].set(translation)
  focal = 1.0 / jnp.tan(jnp.deg2rad(jnp.asarray(fov_deg, dtype)) / 2)
  return Camera(world_to_view=world_to_view, focal=focal, eye=eye)


def orbit_position(azimuth_deg, elevation_deg, distance) -> Array:
  """(3,) eye position on a sphere around the origin (see the module docstring)."""
  az = jnp.deg2rad(jnp.asarray(azimuth_deg, jnp.result_type(float)))
  el = jnp.deg2rad(jnp.asarray(elevation_deg, az.dtype))
  return jnp.asarray(distance, az.dtype) * jnp.stack(
    [jnp.cos(el) * jnp.sin(az), jnp.sin(el), jnp.cos(el) * jnp.cos(az)]
  )


def orbit_camera(azimuth_deg, elevation_deg, distance, fov_deg=40.0) -> Camera:
  """A camera orbiting the origin and looking at it. All arguments are scalars."""
  return look_at(orbit_position(azimuth_deg, elevation_deg, distance), fov_deg=fov_deg)


def project_points(camera: Camera, points: Array) -> tuple[Array, Array]:
  """Projects world points to NDC.

  Args:
    camera: the camera.
    points: (..., 3) world coordinates.

  Returns:
    ndc: (..., 2) NDC coordinates (x right, y up; the image is [−1, 1]²).
    depth: (...,) view-space distance along −z (positive in front of the camera).
  """
  chex.assert_axis_dimension(points, -1, 3)
  rotation = camera.world_to_view[:3, :3]
  translation = camera.world_to_view[:3, 3]
  view = points @ rotation.T + translation
  depth = -view[..., 2]
  # Points at or behind the eye get a tiny positive depth so the division stays finite;
  # the rasterizer drops faces closer than `near` anyway.
  safe_depth = jnp.where(depth > 1e-6, depth, 1e-6)
  ndc = camera.focal * view[..., :2] / safe_depth[..., None]
  return ndc, depth


def pixel_centers(image_size: int, dtype=jnp.float32) -> Array:
  """(S, S, 2) NDC (x, y) of pixel centres; row 0 is the top of the image (y = +1)."""
  coords = (2.0 * jnp.arange(image_size, dtype=dtype) + 1.0) / image_size - 1.0
  x = jnp.broadcast_to(coords[None, :], (image_size, image_size))
  y = jnp.broadcast_to(-coords[:, None], (image_size, image_size))
  return jnp.stack([x, y], axis=-1)


def sample_camera(key: Array, ranges: CameraRanges = CameraRanges()) -> tuple[Camera, Array, Array]:
  """Draws a random orbit camera.

  Args:
    key: PRNG key.
    ranges: the ranges (static config data; close over it under vmap).

  Returns:
    camera: the camera.
    azimuth_deg: () azimuth in (−180, 180].
    elevation_deg: () elevation.
  """
  k_mix, k_normal, k_uniform, k_el, k_dist, k_fov = jax.random.split(key, 6)
  spread = max(float(ranges.azimuth_spread), 1e-6)
  bound = 180.0 / spread
  face_biased = spread * jax.random.truncated_normal(k_normal, -bound, bound)
  uniform = jax.random.uniform(k_uniform, minval=-180.0, maxval=180.0)
  take_uniform = jax.random.uniform(k_mix) < ranges.back_view_prob
  azimuth = wrap_azimuth(jnp.where(take_uniform, uniform, face_biased))
  elevation = jax.random.uniform(
    k_el, minval=ranges.elevation_range[0], maxval=ranges.elevation_range[1]
  )
  distance = jax.random.uniform(
    k_dist, minval=ranges.distance_range[0], maxval=ranges.distance_range[1]
  )
  fov = jax.random.uniform(k_fov, minval=ranges.fov_range[0], maxval=ranges.fov_range[1])
  if ranges.closeup_prob <= 0.0:
    return orbit_camera(azimuth, elevation, distance, fov), azimuth, elevation
  if len(ranges.closeup_target) != 3:
    raise ValueError("closeup_target is unresolved: fill it with fit_step.resolve_closeup_target")
  # Close-ups draw from their own key, so the other views are the draws they were without them.
  k_close, k_front = jax.random.split(jax.random.fold_in(key, 1))
  closeup = jax.random.uniform(k_close) < ranges.closeup_prob
  front = spread * jax.random.truncated_normal(k_front, -90.0 / spread, 90.0 / spread)
  azimuth = jnp.where(closeup, front, azimuth)
  eye = orbit_position(azimuth, elevation, distance)
  target = jnp.where(closeup, jnp.asarray(ranges.closeup_target, eye.dtype), 0.0)
  fov = jnp.where(closeup, fov / ranges.closeup_zoom, fov)
  return look_at(eye, target, fov_deg=fov), azimuth, elevation


def sample_light(key: Array, camera: Camera, settings: LightSettings = LightSettings()) -> Light:
  """Draws a DreamFusion-style random light.

  The light position is drawn from N(camera eye, position_std² I) and the light shines from
  that position towards the head at the origin, so the lit side mostly faces the camera.
  With probability `shading_prob` the render is shaded (ambient + diffuse); otherwise it is
  albedo-only (ambient 1, diffuse 0). Shaded renders are textureless (grey albedo) with
  probability `textureless_prob`.

  Args:
    key: PRNG key.
    camera: the view the light is drawn around.
    settings: the light's settings (static config data; close over it under vmap).

  Returns:
    The light.
  """
  k_pos, k_shade, k_tex = jax.random.split(key, 3)
  eye = camera.eye
  position = eye + settings.position_std * jax.random.normal(k_pos, eye.shape, eye.dtype)
  direction = _normalize(position)
  shaded = jax.random.uniform(k_shade) < settings.shading_prob
  textureless = jnp.logical_and(shaded, jax.random.uniform(k_tex) < settings.textureless_prob)
  dtype = eye.dtype
  return Light(
    direction=direction,
    ambient=jnp.where(shaded, jnp.asarray(settings.ambient, dtype), 1.0).astype(dtype),
    diffuse=jnp.where(shaded, jnp.asarray(settings.diffuse, dtype), 0.0).astype(dtype),
    textureless=textureless.astype(dtype),
  )


def default_light(
  camera: Camera | None = None,
  direction=None,
  ambient=LightSettings.ambient,
  diffuse=LightSettings.diffuse,
) -> Light:
  """A fixed light: from `direction`, else from the camera eye (head-on light), else +z."""
  if direction is None:
    direction = camera.eye if camera is not None else jnp.array([0.0, 0.0, 1.0])
  direction = _normalize(jnp.asarray(direction, jnp.result_type(float)))
  dtype = direction.dtype
  return Light(
    direction=direction,
    ambient=jnp.asarray(ambient, dtype),
    diffuse=jnp.asarray(diffuse, dtype),
    textureless=jnp.zeros((), dtype),
  )


def wrap_azimuth(azimuth_deg) -> Array:
  """Wraps degrees to (−180, 180]."""
  a = jnp.asarray(azimuth_deg)
  return 180.0 - jnp.mod(180.0 - a, 360.0)


def view_index(azimuth_deg, elevation_deg) -> Array:
  """int32 index into VIEW_SUFFIXES (jit-friendly, broadcasts).

  'overhead view' if elevation > 60°, else 'front view' if |azimuth| < 45° (azimuth wrapped
  to (−180°, 180°]), 'back view' if |azimuth| > 135°, else 'side view'.
  """
  a = jnp.abs(wrap_azimuth(azimuth_deg))
  e = jnp.asarray(elevation_deg)
  index = jnp.where(a < 45.0, 0, jnp.where(a > 135.0, 2, 1))
  return jnp.where(e > 60.0, 3, index).astype(jnp.int32)
