"""Tests of sdsjax.camera: projection conventions, random cameras and lights, view prompts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdsjax import camera as camera_lib
from sdsjax import config as config_lib
from sdsjax import fit_step
from sdsjax import morphable


@pytest.mark.parametrize(
  "azimuth, elevation, expected",
  [
    (0.0, 0.0, "front view"),
    (44.0, 10.0, "front view"),
    (-44.0, 30.0, "front view"),
    (359.0, 0.0, "front view"),  # wraps to −1°
    (46.0, 0.0, "side view"),
    (-90.0, 0.0, "side view"),
    (134.0, 45.0, "side view"),
    (136.0, 0.0, "back view"),
    (180.0, 0.0, "back view"),
    (-180.0, 0.0, "back view"),
    (225.0, 0.0, "side view"),  # wraps to −135°: not > 135
    (0.0, 61.0, "overhead view"),
    (180.0, 89.0, "overhead view"),
    (0.0, 60.0, "front view"),
  ],
)
def test_view_index_table(azimuth, elevation, expected):
  index = int(camera_lib.view_index(azimuth, elevation))
  assert camera_lib.VIEW_SUFFIXES[index] == expected


def test_view_index_jits_and_broadcasts():
  az = jnp.array([0.0, 90.0, 180.0, 0.0])
  el = jnp.array([0.0, 0.0, 0.0, 80.0])
  index = jax.jit(camera_lib.view_index)(az, el)
  assert index.dtype == jnp.int32
  np.testing.assert_array_equal(index, [0, 1, 2, 3])


def test_wrap_azimuth_range():
  a = camera_lib.wrap_azimuth(jnp.array([-180.0, 180.0, 540.0, -190.0, 10.0]))
  np.testing.assert_allclose(a, [180.0, 180.0, 180.0, 170.0, 10.0])


def test_projection_of_known_points():
  cam = camera_lib.orbit_camera(0.0, 0.0, 3.0, fov_deg=90.0)  # focal = 1
  np.testing.assert_allclose(cam.focal, 1.0, rtol=1e-6)
  np.testing.assert_allclose(cam.eye, [0.0, 0.0, 3.0], atol=1e-6)
  pts = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  ndc, depth = camera_lib.project_points(cam, pts)
  np.testing.assert_allclose(ndc, [[0, 0], [1 / 3, 0], [0, 1 / 3], [0, 0]], atol=1e-6)
  np.testing.assert_allclose(depth, [3.0, 3.0, 3.0, 2.0], atol=1e-6)


def test_azimuth_increases_towards_plus_x():
  cam = camera_lib.orbit_camera(90.0, 0.0, 2.0, fov_deg=60.0)
  np.testing.assert_allclose(cam.eye, [2.0, 0.0, 0.0], atol=1e-6)
  ndc, depth = camera_lib.project_points(cam, jnp.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
  # Seen from +x, the face (+z) is on the left of the image and +y is up.
  assert ndc[0, 0] < 0 and abs(ndc[0, 1]) < 1e-6
  assert ndc[1, 1] > 0 and abs(ndc[1, 0]) < 1e-6
  np.testing.assert_allclose(depth, [2.0, 2.0], atol=1e-6)


def test_elevation_is_above_and_overhead_is_finite():
  cam = camera_lib.orbit_camera(0.0, 30.0, 2.0)
  assert cam.eye[1] > 0
  top = camera_lib.orbit_camera(0.0, 90.0, 2.0)
  assert np.all(np.isfinite(top.world_to_view))
  rotation = np.asarray(top.world_to_view[:3, :3])
  np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
  _, depth = camera_lib.project_points(top, jnp.zeros((1, 3)))
  np.testing.assert_allclose(depth, [2.0], atol=1e-5)


def test_look_at_is_rigid_and_looks_at_target():
  cam = camera_lib.look_at(jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, -0.2, 0.1]))
  rotation = np.asarray(cam.world_to_view[:3, :3])
  np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-5)
  ndc, _ = camera_lib.project_points(cam, jnp.array([[0.5, -0.2, 0.1]]))
  np.testing.assert_allclose(ndc, [[0.0, 0.0]], atol=1e-5)


def test_pixel_centers_convention():
  centers = camera_lib.pixel_centers(4)
  np.testing.assert_allclose(centers[0, 0], [-0.75, 0.75])  # top-left
  np.testing.assert_allclose(centers[3, 3], [0.75, -0.75])  # bottom-right


def test_sample_camera_respects_ranges():
  ranges = camera_lib.CameraRanges(
    azimuth_spread=60.0,
    back_view_prob=0.25,
    elevation_range=(-10.0, 45.0),
    distance_range=(2.5, 3.0),
    fov_range=(35.0, 45.0),
    closeup_prob=0.0,
  )
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  cams, az, el = jax.jit(jax.vmap(lambda k: camera_lib.sample_camera(k, ranges)))(keys)
  az, el = np.asarray(az), np.asarray(el)
  assert np.all(az > -180.0) and np.all(az <= 180.0)
  assert np.all(el >= -10.0) and np.all(el <= 45.0)
  dist = np.linalg.norm(np.asarray(cams.eye), axis=-1)
  assert np.all(dist >= 2.5 - 1e-4) and np.all(dist <= 3.0 + 1e-4)
  fov = 2 * np.rad2deg(np.arctan(1.0 / np.asarray(cams.focal)))
  assert np.all(fov >= 35.0 - 1e-3) and np.all(fov <= 45.0 + 1e-3)
  # The azimuth/elevation returned are those of the eye.
  eye = np.asarray(cams.eye)
  np.testing.assert_allclose(np.rad2deg(np.arcsin(eye[:, 1] / dist)), el, atol=1e-3)
  eye_az = np.rad2deg(np.arctan2(eye[:, 0], eye[:, 2]))
  np.testing.assert_allclose(np.cos(np.deg2rad(eye_az - az)), 1.0, atol=1e-5)
  # Face-biased, but the back is seen too: the shares match the analytic ones within 4.5
  # binomial standard deviations of the 2000 draws.
  want = camera_lib.view_probabilities(ranges)
  for name, share in (("front", np.mean(np.abs(az) < 45.0)), ("back", np.mean(np.abs(az) > 135.0))):
    sd = np.sqrt(want[name] * (1 - want[name]) / len(az))
    assert abs(share - want[name]) < 4.5 * sd, (name, share, want[name])
  assert want["back"] < want["front"]


def test_closeups_look_at_the_face_from_the_front_and_leave_other_views_alone():
  ranges = camera_lib.CameraRanges(closeup_prob=0.3, closeup_target=(0.0, 0.1, 0.4))
  plain = dataclasses.replace(ranges, closeup_prob=0.0)
  keys = jax.random.split(jax.random.PRNGKey(3), 2000)
  sample = lambda r: jax.jit(jax.vmap(lambda k: camera_lib.sample_camera(k, r)))(keys)
  cams, az, el = sample(ranges)
  plain_cams, plain_az, _ = sample(plain)
  # A close-up's optical axis (−z of its view frame) passes through the target.
  eye = np.asarray(cams.eye)
  axis = -np.asarray(cams.world_to_view)[:, 2, :3]
  to_target = np.array([0.0, 0.1, 0.4]) - eye
  along = np.sum(axis * to_target, -1, keepdims=True)
  miss = np.linalg.norm(to_target - along * axis, axis=-1)
  closeup = miss < 1e-4
  fov = 2 * np.rad2deg(np.arctan(1.0 / np.asarray(cams.focal)))
  assert abs(closeup.mean() - 0.3) < 4.5 * np.sqrt(0.3 * 0.7 / len(keys))
  assert np.all(np.abs(np.asarray(az)[closeup]) <= 90.0)  # never from behind
  assert np.all(fov[closeup] <= 45.0 / 1.6 + 1e-3) and np.all(fov[~closeup] >= 40.0 - 1e-3)
  # The others are exactly the draws without close-ups, and they look at the origin.
  np.testing.assert_array_equal(np.asarray(az)[~closeup], np.asarray(plain_az)[~closeup])
  np.testing.assert_allclose(eye[~closeup], np.asarray(plain_cams.eye)[~closeup], atol=1e-6)
  # The elevation returned is still the eye's, so the view prompts stay right.
  elevation = np.degrees(np.arcsin(eye[:, 1] / np.linalg.norm(eye, axis=-1)))
  np.testing.assert_allclose(np.asarray(el), elevation, atol=1e-3)
  want = camera_lib.view_probabilities(ranges)
  share = np.mean(np.abs(np.asarray(az)) < 45.0)
  assert abs(share - want["front"]) < 4.5 * np.sqrt(want["front"] * (1 - want["front"]) / 2000)


def test_default_view_shares_match_the_docs():
  """The docstring promises about 55% front and 2.6% back views with the default ranges."""
  want = camera_lib.view_probabilities(camera_lib.CameraRanges())
  assert abs(want["front"] - 0.55) < 0.005 and abs(want["back"] - 0.026) < 0.001, want


@pytest.mark.parametrize(
  "field, value",
  [
    ("azimuth_spread", 0.0),
    ("azimuth_spread", float("nan")),
    ("back_view_prob", 1.5),
    ("elevation_range", (30.0, 10.0)),
    ("elevation_range", (-10.0, 95.0)),
    ("distance_range", (0.0, 3.0)),
    ("distance_range", (2.6, float("inf"))),
    ("fov_range", (0.0, 40.0)),
    ("closeup_prob", -0.1),
    ("closeup_zoom", 0.5),
    ("closeup_target", (0.0, 0.2)),
    ("closeup_target", (0.0, 0.0, 2.0)),
  ],
)
def test_camera_ranges_refuse_bad_values(field, value):
  with pytest.raises(ValueError, match=field):
    camera_lib.CameraRanges(**{field: value})


def test_sample_light():
  cam = camera_lib.orbit_camera(20.0, 10.0, 3.0)
  keys = jax.random.split(jax.random.PRNGKey(1), 500)
  lights = jax.vmap(
    lambda k: camera_lib.sample_light(
      k,
      cam,
      camera_lib.LightSettings(ambient=0.1, diffuse=0.9, shading_prob=0.75, textureless_prob=0.5),
    )
  )(keys)
  np.testing.assert_allclose(np.linalg.norm(lights.direction, axis=-1), 1.0, rtol=1e-5)
  # Lights come from roughly the camera side.
  cos = np.asarray(lights.direction) @ (np.asarray(cam.eye) / 3.0)
  assert np.mean(cos) > 0.8
  shaded = np.asarray(lights.diffuse) > 0
  assert 0.6 < shaded.mean() < 0.9
  np.testing.assert_allclose(np.asarray(lights.ambient)[shaded], 0.1, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(lights.ambient)[~shaded], 1.0)
  textureless = np.asarray(lights.textureless) > 0
  assert not np.any(textureless & ~shaded)
  assert 0.3 < textureless[shaded].mean() < 0.7


def test_closeups_aim_behind_the_nose_tip_of_the_head_model():
  head = morphable.load_model("builtin", 1)
  target = morphable.face_target(np.asarray(head.mean))
  # The builtin head's nose tip is its frontmost midline vertex, at (0, 0.064, 0.643).
  np.testing.assert_allclose(target, (0.0, 0.064, 0.343), atol=2e-3)
  cfg = fit_step.resolve_closeup_target(config_lib.load_config(None, []), head.mean)
  assert cfg.camera.closeup_target == target
  kept = config_lib.load_config(None, ["camera.closeup_target=[0.0,0.3,0.2]"])
  assert fit_step.resolve_closeup_target(kept, head.mean) is kept  # set by the user: kept
  with pytest.raises(ValueError, match="unresolved"):
    camera_lib.sample_camera(jax.random.PRNGKey(0), camera_lib.CameraRanges())
