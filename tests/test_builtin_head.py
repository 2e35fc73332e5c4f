"""Tests for the builtin head: sdsjax/data/head_model.npz, built by scripts/build_head_model.py.

The self-intersection checks are the model's ±3σ guarantee: the mean, every identity
component alone at ±3, sampled combinations of all 50 (N(0, 2²); uniform in [-3, 3];
N(0, 3²) clipped to ±3) and every expression component alone at ±2 give meshes in which no
two triangles that share no vertex intersect, and no triangle turns over.
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh
from rtree import index

from sdsjax import camera as camera_lib
from sdsjax import morphable
from sdsjax import raster
from sdsjax import shading

NUM_EXPRESSIONS = 14
EXPRESSION_NAMES = (
  "jaw_open",
  "smile_left",
  "smile_right",
  "brow_raise_left",
  "brow_raise_right",
  "eye_close_left",
  "eye_close_right",
  "brow_lower_left",
  "brow_lower_right",
  "lips_pucker",
  "cheek_puff_left",
  "cheek_puff_right",
  "sneer_left",
  "sneer_right",
)
BUILD_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "build_head_model.py"


@pytest.fixture(scope="module")
def head():
  return morphable.load_model("builtin", 50, NUM_EXPRESSIONS)


@pytest.fixture(scope="module")
def arrays(head):
  """float64 numpy copies: mean (V, 3), faces (F, 3), basis (K, V, 3), expressions (E, V, 3)."""
  return (
    np.asarray(head.mean, np.float64),
    np.asarray(head.faces),
    np.asarray(head.basis, np.float64),
    np.asarray(head.expression_basis, np.float64),
  )


def _face_normals(verts, faces):
  tri = verts[faces]
  return np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])


# ---------------------------------------------------------------------------------------
# Mesh self-intersection: an rtree broad phase over triangle boxes, then segment-triangle
# tests (Möller–Trumbore) of each triangle's edges against the other triangle.


def _segment_hits(p, q, a, b, c):
  """(N,) where the open segment p→q crosses triangle abc, as a fraction of its length in
  (0, 1), or NaN where it does not; all inputs (N, 3)."""
  e1, e2, d = b - a, c - a, q - p
  h = np.cross(d, e2)
  det = np.einsum("ij,ij->i", e1, h)
  ok = np.abs(det) > 1e-15
  inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
  s = p - a
  u = inv * np.einsum("ij,ij->i", s, h)
  qv = np.cross(s, e1)
  v = inv * np.einsum("ij,ij->i", d, qv)
  t = inv * np.einsum("ij,ij->i", e2, qv)
  hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0) & (t < 1)
  return np.where(hit, t, np.nan)


def _segments_cross_triangles(p, q, a, b, c):
  """(N,) whether the open segment p→q crosses triangle abc; all (N, 3)."""
  return ~np.isnan(_segment_hits(p, q, a, b, c))


def intersecting_pairs(verts, faces, moving=None):
  """(P, 2) pairs of triangles that share no vertex and intersect.

  Args:
    verts: (V, 3) vertices.
    faces: (F, 3) triangles.
    moving: optional (F,) bool; only pairs with at least one such triangle are tested
      (the others are known not to intersect).
  """
  tri = np.asarray(verts, np.float64)[faces]
  lo, hi = tri.min(1), tri.max(1)
  prop = index.Property()
  prop.dimension = 3
  tree = index.Index((np.arange(len(faces), dtype=np.int64), lo, hi), properties=prop)
  moving = np.ones(len(faces), bool) if moving is None else np.asarray(moving)
  query = np.nonzero(moving)[0]
  hits, counts = tree.intersection_v(lo[query], hi[query])
  pairs = np.stack([np.repeat(query, counts.astype(np.int64)), hits.astype(np.int64)], 1)
  # Each pair once: from its lower face when both are queried.
  pairs = pairs[(pairs[:, 0] < pairs[:, 1]) | ~moving[pairs[:, 1]]]
  shared = (faces[pairs[:, 0], :, None] == faces[pairs[:, 1], None, :]).any((1, 2))
  pairs = pairs[~shared]
  first, second = tri[pairs[:, 0]], tri[pairs[:, 1]]
  hit = np.zeros(len(pairs), bool)
  for x, y in ((first, second), (second, first)):
    for i, j in ((0, 1), (1, 2), (2, 0)):
      hit |= _segments_cross_triangles(x[:, i], x[:, j], y[:, 0], y[:, 1], y[:, 2])
  return pairs[hit]


def mesh_defects(mean, faces, displacement):
  """(intersecting pairs, turned-over faces) of mean + displacement."""
  verts = mean + displacement
  # Faces that move less than 2 µm (world 1e-5) cannot meet faces that move as little:
  # the mean's non-adjacent faces are far further apart than that.
  moved = np.linalg.norm(displacement, axis=-1)[faces].max(1) > 1e-5
  flipped = np.einsum("fi,fi->f", _face_normals(verts, faces), _face_normals(mean, faces)) <= 0
  return len(intersecting_pairs(verts, faces, moved)), int(flipped.sum())


def test_intersection_check_finds_intersections(head, arrays):
  mean, faces, _, _ = arrays
  assert len(intersecting_pairs(mean, faces)) == 0
  # Two overlapping spheres intersect along a circle; apart, they do not.
  sphere = trimesh.creation.icosphere(subdivisions=2)
  verts = np.concatenate([sphere.vertices, sphere.vertices + np.array([1.5, 0.0, 0.0])])
  both = np.concatenate([sphere.faces, sphere.faces + len(sphere.vertices)])
  assert len(intersecting_pairs(verts, both)) > 20
  apart = np.repeat([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], len(sphere.vertices), 0)
  assert len(intersecting_pairs(verts + apart, both)) == 0
  # Moving the left eyeball sideways into its socket makes the head intersect itself.
  shove = np.zeros_like(mean)
  shove[_eyeballs(head)[0], 0] = 0.03
  assert mesh_defects(mean, faces, shove)[0] > 0


# ---------------------------------------------------------------------------------------
# Shape, frame, topology, texture layout.


def test_builtin_shapes_and_frame(head):
  v = head.mean.shape[0]
  assert 5000 <= v <= 20000
  assert head.basis.shape == (50, v, 3)
  assert head.expression_basis.shape == (NUM_EXPRESSIONS, v, 3)
  assert head.mean.dtype == jnp.float32 and head.basis.dtype == jnp.float32
  assert head.faces.dtype == jnp.int32 and head.uv_faces.dtype == jnp.int32
  assert len(head.names) == 50 and len(set(head.names)) == 50 and all(head.names)
  mean = np.asarray(head.mean)
  np.testing.assert_allclose(0.5 * (mean.min(0) + mean.max(0)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(mean, axis=1).max(), 1.0, rtol=1e-5)
  # Taller than wide; the front-most point is the nose (narrow, on +z), the back is broad.
  extent = mean.max(0) - mean.min(0)
  assert extent[1] > extent[0]
  nose = mean[mean[:, 2] > mean[:, 2].max() - 0.03]
  back = mean[mean[:, 2] < mean[:, 2].min() + 0.03]
  assert np.abs(nose[:, 0]).max() < 0.06 < np.abs(back[:, 0]).max()


def test_builtin_faces_and_uvs_are_valid(head):
  faces, uv_faces, uvs = map(np.asarray, (head.faces, head.uv_faces, head.uvs))
  assert faces.min() >= 0 and faces.max() < head.mean.shape[0]
  assert len(np.unique(faces)) == head.mean.shape[0]  # no unused vertices
  assert uv_faces.shape == faces.shape
  assert uv_faces.min() >= 0 and uv_faces.max() < uvs.shape[0]
  assert len(np.unique(uv_faces)) == uvs.shape[0]  # no unused uvs
  assert uvs.shape[0] >= head.mean.shape[0]  # seams are split
  assert uvs.min() >= 0.0 and uvs.max() <= 1.0
  # No uv triangle wraps around a seam, and none is degenerate in 3D.
  assert np.ptp(uvs[uv_faces][..., 0], axis=1).max() < 0.1
  assert np.linalg.norm(_face_normals(np.asarray(head.mean), faces), axis=1).min() > 0


def test_parts_are_the_head_and_two_closed_eyeballs(head):
  faces = np.asarray(head.faces)
  assert [name for name, _, _ in head.parts] == ["head", "eye_left", "eye_right"]
  assert head.parts[0][1] == 0 and head.parts[-1][2] == len(faces)
  for name, first, end in head.parts:
    part = faces[first:end]
    directed = np.concatenate([part[:, [0, 1]], part[:, [1, 2]], part[:, [2, 0]]])
    # Consistently oriented: every directed edge once.
    assert len(np.unique(directed, axis=0)) == len(directed), name
    reverse = set(map(tuple, directed[:, ::-1]))
    open_edges = [e for e in map(tuple, directed) if e not in reverse]
    if name == "head":
      # Closed but for the bottom of the neck (one ring of edges there).
      mean = np.asarray(head.mean)
      assert len(open_edges) > 0
      assert np.ptp(mean[np.array(open_edges).ravel(), 1]) < 1e-5
      assert np.isclose(mean[np.array(open_edges).ravel(), 1].min(), mean[:, 1].min())
    else:
      assert not open_edges, name  # watertight
      verts = np.unique(part)
      edges = len(directed) // 2
      assert len(verts) - edges + len(part) == 2, name  # a sphere (genus 0)
    # No vertex is shared between parts.
    others = np.concatenate([faces[a:b] for n, a, b in head.parts if n != name])
    assert not np.intersect1d(np.unique(part), np.unique(others)).size


def test_builtin_normals_point_outwards(head):
  mean = np.asarray(head.mean, np.float64)
  faces = np.asarray(head.faces)
  # Divergence theorem: the signed volume enclosed (open neck aside) is positive, for the
  # head and for each eyeball (whose volume is that of a sphere of its radius).
  tri = mean[faces]
  signed = np.einsum("fi,fi->f", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6
  assert signed[: head.parts[0][2]].sum() > 0.3
  for centre, radius, (_, first, end) in zip(*_eyeball_spheres(head), head.parts[1:]):
    centred = tri[first:end] - centre
    volume = np.einsum("fi,fi->f", centred[:, 0], np.cross(centred[:, 1], centred[:, 2])).sum() / 6
    assert 0.9 < volume / (4 / 3 * np.pi * radius**3) <= 1.0
  # Almost every face of the outer skin points away from the vertical axis through the
  # head's centre. (The pouches behind the fissure and the mouth face into their cavities;
  # they are the faces textured from the islands below V_HEAD.)
  uv_v = np.asarray(head.uvs)[np.asarray(head.uv_faces)][..., 1]
  skin = np.arange(len(faces)) < head.parts[0][2]
  skin &= (uv_v >= 0.2).all(1)
  radial = tri.mean(1) - mean.mean(0)
  radial[:, 1] = np.where(tri.mean(1)[:, 1] < mean[:, 1].min() + 0.6, 0.0, radial[:, 1])
  outward = np.einsum("fi,fi->f", _face_normals(mean, faces), radial) > 0
  assert outward[skin].mean() > 0.99


def test_texture_atlas_layout(head):
  """The head's grid and patches above v = 0.2, each eyeball in its own square below."""
  uvs, uv_faces = np.asarray(head.uvs), np.asarray(head.uv_faces)
  for (name, first, end), (u0, size) in zip(head.parts[1:], ((0.0, 0.2), (0.2, 0.2))):
    uv = uvs[uv_faces[first:end]].reshape(-1, 2)
    assert uv[:, 0].min() >= u0 - 1e-6 and uv[:, 0].max() <= u0 + size + 1e-6, name
    assert uv[:, 1].max() <= 0.2 + 1e-6, name
    # The front pole (the pupil) at the square's centre, the iris around it.
    mean = np.asarray(head.mean)
    verts = np.unique(np.asarray(head.faces)[first:end])
    front = verts[np.argmax(mean[verts, 2])]
    corner = np.nonzero(np.asarray(head.faces)[first:end] == front)
    centre = uvs[uv_faces[first:end][corner]].mean(0)
    np.testing.assert_allclose(centre, (u0 + size / 2, size / 2), atol=1e-5)
  head_uv = uvs[uv_faces[: head.parts[0][2]]]
  outside_islands = (head_uv[..., 1] >= 0.2 - 1e-6).all(1)
  assert outside_islands.mean() > 0.9  # most of the head is the grid above v = 0.2
  assert (head_uv[~outside_islands][..., 0] >= 0.4 - 1e-6).all()  # islands right of the eyes


# ---------------------------------------------------------------------------------------
# Eyeballs.


def _eyeballs(head):
  faces = np.asarray(head.faces)
  return [np.unique(faces[first:end]) for _, first, end in head.parts[1:]]


def _eyeball_spheres(head):
  """Centres (2, 3) and radii (2,) of the eyeballs (their vertices lie on spheres)."""
  mean = np.asarray(head.mean, np.float64)
  centres = [0.5 * (mean[v].min(0) + mean[v].max(0)) for v in _eyeballs(head)]
  radii = [np.linalg.norm(mean[v] - c, axis=1).max() for v, c in zip(_eyeballs(head), centres)]
  return np.array(centres), np.array(radii)


def _ray_hits(origin, direction, verts, faces):
  """Distances along a ray (3,) at which it crosses the triangles (F, 3)."""
  tri = verts[faces]
  n = len(faces)
  start, end = np.broadcast_to(origin, (n, 3)), np.broadcast_to(origin + 10.0 * direction, (n, 3))
  t = _segment_hits(start, end, tri[:, 0], tri[:, 1], tri[:, 2])
  return np.sort(10.0 * t[~np.isnan(t)])


def test_eyeballs_sit_in_their_sockets(head):
  mean = np.asarray(head.mean, np.float64)
  faces = np.asarray(head.faces)
  skin = faces[: head.parts[0][2]]
  for side, verts, centre, radius in zip((1.0, -1.0), _eyeballs(head), *_eyeball_spheres(head)):
    np.testing.assert_allclose(np.linalg.norm(mean[verts] - centre, axis=1), radius, rtol=1e-4)
    assert 0.04 < radius < 0.09  # 11.8 mm; world 1 ≈ 17.4 cm
    assert np.sign(centre[0]) == side and 0.1 < abs(centre[0]) < 0.3  # +x is the left eye
    # Above the nose tip, below the brow, in front of the ears.
    assert mean[np.argmax(mean[:, 2]), 1] < centre[1] < mean[:, 1].max() - 0.3
    # No skin vertex inside the eyeball: every head vertex is at least 0.35 mm (world
    # 0.002) outside it.
    dist = np.linalg.norm(mean[np.unique(skin)] - centre, axis=1)
    assert dist.min() > radius + 0.002
    # Rays from the centre: backwards, up, down and sideways they meet the pouch within
    # 3.5 mm (world 0.02) of the eyeball; forwards (through the fissure) no skin at all.
    for direction in ((0, 0, -1), (0, 1, 0), (0, -1, 0), (1, 0, 0), (-1, 0, 0), (0, 0.7, -0.7)):
      hits = _ray_hits(
        centre, np.asarray(direction, np.float64) / np.linalg.norm(direction), mean, skin
      )
      assert len(hits) and radius < hits[0] < radius + 0.02, direction
    assert len(_ray_hits(centre, np.array([0.0, 0.0, 1.0]), mean, skin)) == 0


def test_eyeballs_move_with_their_sockets(head, arrays):
  """Under every identity component each eyeball moves by an affine map, the same as the
  socket and lid margins around it; eye components move them as their names say."""
  mean, faces, basis, expressions = arrays
  skin = np.unique(faces[: head.parts[0][2]])
  for verts, centre, radius in zip(_eyeballs(head), *_eyeball_spheres(head)):
    # The socket: the lid margins and the pouch, 13 % and 14 % out from the eyeball.
    socket = skin[np.linalg.norm(mean[skin] - centre, axis=1) < radius * 1.15]
    assert len(socket) > 50
    points = np.concatenate([mean[verts], mean[socket]]) - centre
    design = np.concatenate([points, np.ones((len(points), 1))], 1)
    for k, name in enumerate(head.names):
      moves = np.concatenate([basis[k][verts], basis[k][socket]])
      fit, *_ = np.linalg.lstsq(design, moves, rcond=None)
      residual = np.abs(design @ fit - moves).max()
      assert residual < max(2e-3 * np.abs(moves).max(), 2e-5), name  # float16 storage
    # No expression moves an eyeball.
    assert np.abs(expressions[:, verts]).max() == 0.0
  eyes = _eyeballs(head)
  left = _eyeball_spheres(head)[0][0]
  shift = lambda name, verts: basis[head.names.index(name)][verts].mean(0)
  assert shift("eye_spacing", eyes[0])[0] > 0.005 and shift("eye_spacing", eyes[1])[0] < -0.005
  assert shift("eye_height", eyes[0])[1] > 0.005 and shift("eye_height", eyes[1])[1] > 0.005
  assert shift("eye_depth", eyes[0])[2] < -0.005
  grow = basis[head.names.index("eye_size")][eyes[0]]
  assert np.einsum("vi,vi->v", grow, mean[eyes[0]] - left).min() > 0  # every vertex outwards


def test_eyeballs_render(head):
  """A front view shows each eyeball's texture at its pupil (the fissure is open)."""
  texture = np.zeros((64, 64, 3), np.float32)
  texture[:, :, 0] = 1.0  # the head red
  texture[-13:, :26] = (0.0, 0.0, 1.0)  # the eyeball squares (v < 0.2, u < 0.4) blue
  size = 96
  cam = camera_lib.orbit_camera(0.0, 0.0, 2.6, fov_deg=30.0)
  light = camera_lib.default_light(cam)
  settings = raster.RasterSettings(image_size=size, sigma=0.5 * (2 / size) ** 2)
  out = jax.jit(shading.render_soft, static_argnums=4)(
    head.mean, head.faces, cam, light, settings, jnp.asarray(texture), head.uvs, head.uv_faces
  )
  assert int(out.overflow) == 0
  rgb = np.asarray(out.rgb)
  mean = np.asarray(head.mean)
  for verts in _eyeballs(head):
    pupil = mean[verts][np.argmax(mean[verts, 2])]
    ndc, _ = camera_lib.project_points(cam, jnp.asarray(pupil[None], jnp.float32))
    col = int((np.asarray(ndc)[0, 0] * 0.5 + 0.5) * size)
    row = int((0.5 - np.asarray(ndc)[0, 1] * 0.5) * size)
    pixel = rgb[row, col]
    assert pixel[2] > 2 * pixel[0], pixel


# ---------------------------------------------------------------------------------------
# Components.


def test_builtin_basis_is_independent_and_scaled(head, arrays):
  """Components are not orthogonal (each is its own local field), but no one is close to a
  combination of the others; weight 1 moves the most affected vertex by 0.4-8 mm."""
  _, _, basis, _ = arrays
  flat = basis.reshape(len(basis), -1)
  gram = flat @ flat.T
  cos = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
  assert np.linalg.eigvalsh(cos).min() > 0.005
  assert np.abs(cos - np.eye(len(cos))).max() < 0.95
  peak = np.linalg.norm(basis, axis=-1).max(1)  # world units: 0.0057 ≈ 1 mm
  assert peak.min() > 0.0025 and peak.max() < 0.045


def test_expression_names_and_scaling(head, arrays):
  assert head.expression_names == EXPRESSION_NAMES
  _, _, _, expressions = arrays
  peak = np.linalg.norm(expressions, axis=-1).max(1)
  assert peak.min() > 0.02 and peak.max() < 0.06  # 3.5-10 mm: a clear expression at 1
  # Left and right versions mirror each other (x -> -x on the mirrored vertex).
  mean = np.asarray(head.mean, np.float64)
  mirrored = mean * np.array([-1.0, 1.0, 1.0])
  tree = index.Index(
    (np.arange(len(mean), dtype=np.int64), mean - 1e-6, mean + 1e-6),
    properties=_props(),
  )
  partner, counts = tree.intersection_v(mirrored - 1e-5, mirrored + 1e-5)
  assert (counts == 1).all()
  partner = partner.astype(np.int64)
  for name in EXPRESSION_NAMES:
    if name.endswith("_left"):
      left = expressions[EXPRESSION_NAMES.index(name)]
      right = expressions[EXPRESSION_NAMES.index(name.replace("_left", "_right"))]
      np.testing.assert_allclose(right[partner] * np.array([-1, 1, 1]), left, atol=2e-5)
      assert np.abs(left[mean[:, 0] < -0.05]).max() < 0.2 * np.abs(left).max(), name


def _props():
  prop = index.Property()
  prop.dimension = 3
  return prop


def test_builtin_fewer_components_keeps_the_leading_ones(head):
  small = morphable.load_model("builtin", 6, 3)
  assert small.names == head.names[:6]
  assert small.expression_names == head.expression_names[:3]
  np.testing.assert_array_equal(small.basis, head.basis[:6])
  np.testing.assert_array_equal(small.expression_basis, head.expression_basis[:3])
  assert morphable.load_model("builtin", 6).num_expressions == 0


def test_random_heads_stay_sane(head):
  weights = jax.random.normal(jax.random.PRNGKey(1), (8, head.num_components))
  verts = jax.vmap(morphable.vertices, (None, 0))(head, weights)
  offsets = np.linalg.norm(np.asarray(verts - head.mean), axis=-1)
  assert np.isfinite(offsets).all()
  # N(0, 1) weights move vertices by at most a few centimetres on a ~23 cm head.
  assert offsets.max() < 0.25 and np.median(offsets) < 0.08


# ---------------------------------------------------------------------------------------
# The ±3σ guarantee.


def test_identity_components_at_3_sigma_do_not_self_intersect(head, arrays):
  mean, faces, basis, _ = arrays
  bad = [
    (name, sign, *defects)
    for k, name in enumerate(head.names)
    for sign in (3.0, -3.0)
    if any(defects := mesh_defects(mean, faces, sign * basis[k]))
  ]
  assert not bad  # (name, weight, intersecting pairs, turned-over faces)


@pytest.mark.parametrize(
  "kind, seed",
  [("normal_2", s) for s in range(4)]
  + [("uniform_3", s) for s in range(3)]
  + [("clipped_3", s) for s in range(3)],
)
def test_random_identities_do_not_self_intersect(arrays, kind, seed):
  """All 50 components at once: N(0, 2²), uniform in ±3, or N(0, 3²) clipped to ±3."""
  mean, faces, basis, _ = arrays
  rng = np.random.default_rng(seed)
  if kind == "normal_2":
    weights = 2.0 * rng.normal(size=len(basis))
  elif kind == "uniform_3":
    weights = rng.uniform(-3.0, 3.0, size=len(basis))
  else:
    weights = np.clip(3.0 * rng.normal(size=len(basis)), -3.0, 3.0)
  assert mesh_defects(mean, faces, np.einsum("k,kvc->vc", weights, basis)) == (0, 0)


def test_expressions_at_2_sigma_do_not_self_intersect(head, arrays):
  mean, faces, _, expressions = arrays
  bad = [
    (name, sign, *defects)
    for e, name in enumerate(head.expression_names)
    for sign in (2.0, -2.0)
    if any(defects := mesh_defects(mean, faces, sign * expressions[e]))
  ]
  assert not bad


def test_open_mouth_and_closed_eyes_do_what_they_say(head, arrays):
  mean, faces, _, expressions = arrays
  skin = faces[: head.parts[0][2]]
  # jaw_open: rays from the front down the midline, through the mouth; at weight 1 one of
  # them goes in through the parted lips, ≥ 1.7 mm (world 0.01) deeper than when closed.
  jaw = expressions[head.expression_names.index("jaw_open")]
  mouth = mean[(np.abs(mean[:, 0]) < 0.02) & (mean[:, 2] > 0.3)]
  ys = np.linspace(mouth[:, 1].min() + 0.05, mean[np.argmax(mean[:, 2]), 1] - 0.05, 80)

  def depth(verts, y):
    hits = _ray_hits(np.array([0.0, y, 3.0]), np.array([0.0, 0.0, -1.0]), verts, skin)
    return hits[0]

  deeper = [depth(mean + jaw, y) - depth(mean, y) for y in ys]
  assert max(deeper) > 0.01
  assert jaw[:, 1].min() < -0.005  # the chin drops
  # eye_close_left: at weight 2 the upper lid covers the left pupil, not the right one.
  lid = expressions[head.expression_names.index("eye_close_left")]
  for centre, closed in zip(_eyeball_spheres(head)[0], (True, False)):
    hits = _ray_hits(centre, np.array([0.0, 0.0, 1.0]), mean + 2.0 * lid, skin)
    assert (len(hits) > 0) == closed
  assert np.abs(lid[mean[:, 0] < 0]).max() == 0.0  # only the left eye moves


# ---------------------------------------------------------------------------------------
# The build.


def test_build_reproduces_the_shipped_file(head):
  """The script builds what is shipped (so the file is current, and the build is
  deterministic); differences up to float16 rounding of the bases are allowed."""
  spec = importlib.util.spec_from_file_location("build_head_model", BUILD_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  try:
    spec.loader.exec_module(module)
    built = module.build()
  finally:
    del sys.modules[spec.name]
  shipped = dict(morphable._read_builtin())
  assert sorted(built) == sorted(shipped)
  for key, value in built.items():
    if value.dtype.kind in "iuU":
      np.testing.assert_array_equal(value, shipped[key], err_msg=key)
    else:
      np.testing.assert_allclose(value, shipped[key], atol=2e-5, err_msg=key)
