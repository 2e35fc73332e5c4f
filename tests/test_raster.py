"""Tests of sdsjax.raster and sdsjax.shading: gradients, silhouettes, depth, vmap, overflow."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

import sdsjax
from sdsjax import camera as camera_lib
from sdsjax import raster
from sdsjax import shading

HEAD_FILE = pathlib.Path(sdsjax.__file__).parent / "data" / "head_model.npz"


def _sphere(subdivisions: int, radius: float = 1.0):
  mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
  return np.asarray(mesh.vertices), np.asarray(mesh.faces, np.int32)


def _head_mesh():
  """The builtin head's mean mesh (and uv layout) once it exists, else a sphere."""
  try:
    from sdsjax import morphable  # pylint: disable=g-import-not-at-top
  except ImportError:
    morphable = None
  if morphable is not None and HEAD_FILE.exists():
    model = morphable.load_model("builtin", num_components=4)
    return (
      np.asarray(model.mean, np.float64),
      np.asarray(model.faces, np.int32),
      np.asarray(model.uvs),
      np.asarray(model.uv_faces, np.int32),
    )
  verts, faces = _sphere(4)
  uvs = np.stack(
    [
      0.5 + np.arctan2(verts[:, 0], verts[:, 2]) / (2 * np.pi),
      0.5 + np.arcsin(np.clip(verts[:, 1], -1, 1)) / np.pi,
    ],
    -1,
  )
  return verts, faces, uvs, faces


def _fitted_slope(loss, params, i: int, span: float, points: int = 21) -> float:
  """d loss / d params[i] from a quadratic fitted to the loss at `points` steps within ±span.

  Which faces a pixel blends (its K nearest, from its tile's bin) is a discrete choice: where
  two candidates trade places the loss steps by ~1e-7 of itself, back and forth within 1e-9
  of a parameter. A central difference at h = 1e-5 reads such a step as a 1-2% slope error;
  a fit over many steps averages it out (0.05-0.7% here, against the same gradient).
  """
  offsets = np.linspace(-span, span, points)
  stencil = params[None] + jnp.zeros((points, params.shape[0])).at[:, i].set(offsets)
  values = np.asarray(jax.jit(jax.vmap(loss))(stencil))
  return float(np.polyfit(offsets, values, 2)[1])


def _relative_error(a, b):
  return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize("blend", raster.BLENDS)
def test_finite_differences_vertices_and_texture(blend):
  """d(image loss)/d(basis weights) and d/d(texture) vs central differences, in float64."""
  with jax.enable_x64(True):
    verts, faces = _sphere(2, radius=0.9)
    rng = np.random.default_rng(0)
    # A tiny linear basis: stretch, shift and a smooth bump field.
    basis = np.stack(
      [
        verts * np.array([0.3, 0.0, 0.0]),
        np.tile([0.0, 0.2, 0.1], (len(verts), 1)),
        0.2 * np.sin(3.0 * verts[:, [1, 2, 0]]),
      ]
    )
    mean, basis = jnp.asarray(verts), jnp.asarray(basis)
    faces = jnp.asarray(faces)
    uvs = jnp.asarray(0.5 + 0.45 * verts[:, :2])
    texture = jnp.asarray(rng.uniform(0.2, 0.9, (8, 8, 3)))
    cam = camera_lib.orbit_camera(25.0, 15.0, 3.0, fov_deg=40.0)
    light = camera_lib.default_light(direction=jnp.array([0.3, 0.5, 1.0]))
    # σ about a pixel² so silhouettes span a few pixels; K and C large enough that the
    # selection does not change under the finite-difference steps.
    settings = raster.RasterSettings(
      image_size=32,
      sigma=2e-3,
      gamma=1e-2,
      faces_per_pixel=16,
      max_faces_per_bin=320,
      blend=blend,
    )
    target = jnp.asarray(rng.uniform(0.0, 1.0, (32, 32, 3)))
    pixel_weights = jnp.asarray(rng.uniform(0.5, 1.5, (32, 32)))

    def loss(weights, tex):
      v = mean + jnp.tensordot(weights, basis, axes=1)
      out = shading.render_soft(
        v,
        faces,
        cam,
        light,
        settings,
        texture=tex,
        uvs=uvs,
        uv_faces=faces,
        background=(0.1, 0.2, 0.3),
      )
      return jnp.sum((out.rgb - target) ** 2) + jnp.sum(
        pixel_weights * out.alpha
      )  # alpha: silhouette pixels only

    weights0 = jnp.array([0.1, -0.2, 0.3])
    loss_jit = jax.jit(loss)
    grad_w, grad_t = jax.jit(jax.grad(loss, argnums=(0, 1)))(weights0, texture)
    out = jax.jit(shading.render_soft, static_argnums=4)(
      mean + jnp.tensordot(weights0, basis, axes=1), faces, cam, light, settings
    )
    edge = np.asarray((out.alpha > 0.01) & (out.alpha < 0.99))
    assert edge.sum() > 50  # the loss really sees silhouette pixels

    h = 1e-5
    for i in range(3):
      step = jnp.zeros(3).at[i].set(h)
      fd = (loss_jit(weights0 + step, texture) - loss_jit(weights0 - step, texture)) / (2 * h)
      assert _relative_error(float(fd), float(grad_w[i])) < 0.02, (i, fd, grad_w[i])
    # A random direction in weight space and in texture space.
    direction = jnp.asarray(rng.normal(size=3))
    fd = (
      loss_jit(weights0 + h * direction, texture) - loss_jit(weights0 - h * direction, texture)
    ) / (2 * h)
    assert _relative_error(float(fd), float(grad_w @ direction)) < 0.02
    tex_direction = jnp.asarray(rng.normal(size=texture.shape))
    fd = (
      loss_jit(weights0, texture + h * tex_direction)
      - loss_jit(weights0, texture - h * tex_direction)
    ) / (2 * h)
    assert _relative_error(float(fd), float(jnp.sum(grad_t * tex_direction))) < 0.02
    assert float(jnp.abs(grad_t).sum()) > 0


def test_silhouette_gradient_moves_the_edge():
  """A pure alpha loss has non-zero, correctly signed gradients from silhouette pixels."""
  with jax.enable_x64(True):
    verts, faces = _sphere(2, radius=0.8)
    cam = camera_lib.orbit_camera(0.0, 0.0, 3.0, fov_deg=40.0)
    settings = raster.RasterSettings(image_size=32, sigma=2e-3)

    def area(scale):
      alpha, _ = raster.soft_silhouette(
        jnp.asarray(verts) * scale, jnp.asarray(faces), cam, settings
      )
      return jnp.sum(alpha)

    grad = jax.jit(jax.grad(area))(1.0)
    area = jax.jit(area)
    fd = (area(1.0 + 1e-5) - area(1.0 - 1e-5)) / 2e-5
    assert grad > 0  # growing the sphere grows its silhouette
    assert _relative_error(float(grad), float(fd)) < 0.02


@pytest.mark.parametrize("sigma", [1e-6, 3e-5])
def test_sphere_silhouette_area(sigma):
  """Σ alpha · pixel area matches the analytic projected disk of a sphere."""
  radius, distance, fov = 1.0, 3.0, 45.0
  verts, faces = _sphere(4, radius)
  # Scale so the mesh's projected area matches the sphere's: vertices on the sphere make
  # an inscribed polyhedron; push them out by the mean edge-midpoint deficit.
  mid = 0.5 * (verts[faces[:, 0]] + verts[faces[:, 1]])
  verts = verts * (2.0 / (1.0 + np.mean(np.linalg.norm(mid, axis=-1))))
  cam = camera_lib.orbit_camera(10.0, 20.0, distance, fov_deg=fov)
  settings = raster.RasterSettings(image_size=64, sigma=sigma)
  alpha, overflow = jax.jit(raster.soft_silhouette, static_argnums=3)(
    jnp.asarray(verts, jnp.float32), jnp.asarray(faces), cam, settings
  )
  assert int(overflow) == 0
  focal = 1.0 / np.tan(np.deg2rad(fov) / 2)
  ndc_radius = focal * radius / np.sqrt(distance**2 - radius**2)
  analytic = np.pi * ndc_radius**2
  measured = float(jnp.sum(alpha)) * (2.0 / 64) ** 2
  assert _relative_error(measured, analytic) < 0.02, (measured, analytic)


def test_depth_matches_ray_cast():
  verts, faces, _, _ = _head_mesh()
  cam = camera_lib.orbit_camera(30.0, 10.0, 2.8, fov_deg=40.0)
  settings = raster.RasterSettings(image_size=64)
  out = jax.jit(shading.render_soft, static_argnums=4)(
    jnp.asarray(verts, jnp.float32),
    jnp.asarray(faces),
    cam,
    camera_lib.default_light(cam),
    settings,
  )
  assert int(out.overflow) == 0
  # Rays from the eye through the pixel centres.
  centers = np.asarray(camera_lib.pixel_centers(64)).reshape(-1, 2)
  rotation = np.asarray(cam.world_to_view[:3, :3])
  focal = float(cam.focal)
  dirs_view = np.concatenate([centers / focal, -np.ones((len(centers), 1))], -1)
  dirs = dirs_view @ rotation  # view -> world (rotation is orthonormal)
  eye = np.asarray(cam.eye, np.float64)
  mesh = trimesh.Trimesh(verts, faces, process=False)
  intersector = trimesh.ray.ray_triangle.RayMeshIntersector(mesh)
  locations, ray_ids, _ = intersector.intersects_location(
    np.tile(eye, (len(dirs), 1)), dirs, multiple_hits=False
  )
  ref = np.zeros(len(dirs))
  forward = -rotation[2]
  ref[ray_ids] = (locations - eye) @ forward  # distance along −z, not ray length
  ref = ref.reshape(64, 64)
  depth = np.asarray(out.depth)
  hit_ref, hit = ref > 0, depth > 0
  assert hit_ref.sum() > 300
  assert np.mean(hit_ref == hit) > 0.995
  both = hit_ref & hit
  rel = np.abs(depth[both] - ref[both]) / ref[both]
  assert np.quantile(rel, 0.99) < 1e-4 and rel.max() < 2e-2
  # Normals are unit where covered.
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out.normals)[hit], axis=-1), 1.0, atol=1e-4)


def test_vmap_over_cameras_and_vertex_sets_matches_loop():
  verts, faces = _sphere(2, radius=0.9)
  verts = jnp.asarray(verts, jnp.float32)
  faces = jnp.asarray(faces)
  settings = raster.RasterSettings(image_size=24, sigma=1e-3)
  cams = [
    camera_lib.orbit_camera(a, e, d, f)
    for a, e, d, f in [(0, 0, 3, 40), (60, 10, 2.8, 35), (170, 30, 3.2, 45), (-80, -10, 3.0, 40)]
  ]
  cam_batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *cams)
  light = camera_lib.default_light(direction=jnp.array([0.2, 0.6, 1.0]))
  render = jax.jit(lambda v, c: shading.render_soft(v, faces, c, light, settings))
  batched = jax.vmap(render, in_axes=(None, 0))(verts, cam_batch)
  for i, cam in enumerate(cams):
    single = render(verts, cam)
    np.testing.assert_allclose(batched.rgb[i], single.rgb, atol=1e-5)
    np.testing.assert_allclose(batched.alpha[i], single.alpha, atol=1e-5)
    np.testing.assert_allclose(batched.depth[i], single.depth, atol=1e-5)
  vert_sets = jnp.stack([verts * s for s in (0.8, 0.9, 1.0, 1.1)])
  batched = jax.vmap(render, in_axes=(0, None))(vert_sets, cams[1])
  for i in range(4):
    single = render(vert_sets[i], cams[1])
    np.testing.assert_allclose(batched.rgb[i], single.rgb, atol=1e-5)
    np.testing.assert_allclose(batched.alpha[i], single.alpha, atol=1e-5)


def test_nested_vmap_views_within_vertex_sets_matches_loop():
  # The fit's shape: vmap over prompts (vertex sets) of vmap over views (cameras). Each
  # level meets the selection's vmap rule, which maps over its axis instead of batching.
  verts, faces = _sphere(2, radius=0.9)
  verts = jnp.asarray(verts, jnp.float32)
  faces = jnp.asarray(faces)
  settings = raster.RasterSettings(image_size=24, sigma=1e-3)
  cams = [camera_lib.orbit_camera(a, e, 3.0, 40.0) for a, e in [(0, 0), (70, 20), (-120, -15)]]
  cam_batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *cams)
  light = camera_lib.default_light(direction=jnp.array([0.2, 0.6, 1.0]))
  vert_sets = jnp.stack([verts * s for s in (0.8, 1.0)])

  def select(v, c):
    return raster.select_faces(raster.project_mesh(v, faces, c, settings), settings)

  def render(v, c):
    out = shading.render_soft(v, faces, c, light, settings)
    return out.rgb, out.alpha

  nested = lambda f: jax.jit(jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None)))
  ids, overflow = nested(select)(vert_sets, cam_batch)
  rgb, alpha = nested(render)(vert_sets, cam_batch)
  select, render = jax.jit(select), jax.jit(render)
  assert ids.shape == (2, 3, 24, 24, settings.faces_per_pixel)
  for i in range(2):
    for j, cam in enumerate(cams):
      single_ids, single_overflow = select(vert_sets[i], cam)
      np.testing.assert_array_equal(ids[i, j], single_ids)
      assert int(overflow[i, j]) == int(single_overflow)
      single_rgb, single_alpha = render(vert_sets[i], cam)
      np.testing.assert_allclose(rgb[i, j], single_rgb, atol=1e-5)
      np.testing.assert_allclose(alpha[i, j], single_alpha, atol=1e-5)


def test_overflow_is_counted_and_nearest_faces_survive():
  # 40 small stacked triangles inside one 8×8 tile, at increasing depth.
  n = 40
  tri = np.array([[-0.3, -0.3], [0.3, -0.3], [0.0, 0.3]])
  verts, faces = [], []
  for i in range(n):
    z = -0.5 * i / n  # face 0 nearest to a camera on +z
    verts += [[x, y, z] for x, y in tri]
    faces.append([3 * i, 3 * i + 1, 3 * i + 2])
  verts = jnp.asarray(verts, jnp.float32)
  faces = jnp.asarray(faces, jnp.int32)
  # Centre the stack in the top-left tile of a 16² image with 8-pixel tiles, i.e. NDC
  # [−1, 0] × [0, 1], around NDC (−0.5, 0.5).
  verts = verts + jnp.array([-1.5, 1.5, 0.0])
  cam = camera_lib.orbit_camera(0.0, 0.0, 3.0, fov_deg=90.0)  # focal 1: ndc = xy / 3
  settings = raster.RasterSettings(
    image_size=16, sigma=1e-5, bin_size=8, max_faces_per_bin=16, faces_per_pixel=4
  )
  select = jax.jit(
    lambda s: raster.select_faces(raster.project_mesh(verts, faces, cam, s), s), static_argnums=0
  )
  ids, overflow = select(settings)
  assert int(overflow) == n - 16
  # The nearest face still covers the stack's centre pixel: no hole.
  covered = np.asarray(ids[..., 0]) == 0
  assert covered.sum() >= 1
  out = jax.jit(shading.render_soft, static_argnums=4)(
    verts, faces, cam, camera_lib.default_light(cam), settings
  )
  assert int(out.overflow) == n - 16
  np.testing.assert_allclose(np.asarray(out.alpha)[covered], 1.0, atol=1e-6)
  # With room for all faces there is no overflow.
  roomy = dataclasses.replace(settings, max_faces_per_bin=64)
  assert int(select(roomy)[1]) == 0


def _dense_bins(projected, settings, budget):
  """Reference binning in numpy: every face against every tile (the overlap test of
  `raster.bin_counts`), entries emitted nearest face first (ties to the lower id), each
  face's tiles row by row; the first `budget` entries kept, then each tile's first C."""
  xy = np.asarray(projected.xy, np.float32)
  z_min = np.asarray(projected.depth, np.float32).min(1)
  valid = np.asarray(projected.valid)
  size, tile = settings.image_size, settings.resolved_bin_size()
  per_side = -(-size // tile)
  cands = settings.resolved_max_faces_per_bin(xy.shape[0])
  radius = np.float32(settings.soft_radius)
  lo, hi = xy.min(1) - radius, xy.max(1) + radius
  t = np.arange(per_side)
  span_lo = ((2.0 * (t * tile) + 1.0) / size - 1.0).astype(np.float32)
  span_hi = ((2.0 * (t * tile + tile - 1) + 1.0) / size - 1.0).astype(np.float32)
  entries = []
  for f in np.lexsort((np.arange(len(z_min)), np.where(valid, z_min, np.inf))):
    if not valid[f]:
      continue
    cols = np.nonzero((lo[f, 0] <= span_hi) & (hi[f, 0] >= span_lo))[0]
    rows = np.nonzero((lo[f, 1] <= -span_lo) & (hi[f, 1] >= -span_hi))[0]
    entries += [(r * per_side + c, f) for r in rows for c in cols]
  kept = entries[:budget]
  lists = [[f for tt, f in kept if tt == i] for i in range(per_side * per_side)]
  overflow = sum(max(len(x) - cands, 0) for x in lists) + max(len(entries) - budget, 0)
  return [x[:cands] for x in lists], overflow, len(entries)


@pytest.mark.parametrize("budget", [0, 150])
def test_binning_matches_dense_overlaps(budget, monkeypatch):
  """Sort-based binning keeps, per tile, exactly the nearest C faces a dense overlap test and
  top-k would keep: small and tile-spanning faces, off-screen and invalid faces, equal depths;
  with a small entry budget (0: the default), the farthest faces' entries go first and count
  as overflow."""
  rng = np.random.default_rng(7)
  n = 300
  centre = rng.uniform(-1.3, 1.3, (n, 1, 2))
  scale = np.where(rng.random((n, 1, 1)) < 0.1, 0.8, 0.05)  # a tenth span many tiles
  xy = (centre + scale * rng.normal(size=(n, 3, 2))).astype(np.float32)
  depth = (1.0 + np.round(rng.uniform(0, 4, (n, 3)), 1)).astype(np.float32)  # many equal
  valid = rng.random(n) < 0.85
  projected = raster.ProjectedMesh(
    xy=jnp.asarray(xy),
    depth=jnp.asarray(depth),
    valid=jnp.asarray(valid),
    outline=jnp.zeros((n, 3), bool),
  )
  settings = raster.RasterSettings(
    image_size=32, bin_size=4, max_faces_per_bin=8, faces_per_pixel=4
  )
  if budget:
    monkeypatch.setattr(raster.RasterSettings, "resolved_bin_entries", lambda self, f: budget)
  budget = settings.resolved_bin_entries(n)
  want, want_overflow, total = _dense_bins(projected, settings, budget)
  ids, ok, overflow, count = jax.jit(lambda p: raster._bin_faces(p, settings))(projected)
  ids, ok = np.asarray(ids), np.asarray(ok)
  got = [list(ids[i][ok[i]]) for i in range(len(want))]
  assert got == want
  assert np.asarray(count).tolist() == [len(x) for x in want]
  assert int(overflow) == want_overflow > 0
  if budget == 150:
    assert total > 150  # the budget dropped entries, not only C
  else:
    assert total <= budget
    assert total == int(np.sum(raster.bin_counts(projected, settings)))


def test_render_head_defaults_and_texture():
  verts, faces, uvs, uv_faces = _head_mesh()
  cam = camera_lib.orbit_camera(0.0, 10.0, 2.9, fov_deg=40.0)
  settings = raster.RasterSettings(image_size=64)
  light = camera_lib.default_light(cam)
  texture = jnp.broadcast_to(jnp.array([0.8, 0.5, 0.3]), (16, 16, 3))

  @jax.jit
  def render(v, tex, light):
    return shading.render_soft(
      v,
      jnp.asarray(faces),
      cam,
      light,
      settings,
      texture=tex,
      uvs=jnp.asarray(uvs, jnp.float32),
      uv_faces=jnp.asarray(uv_faces),
    )

  out = render(jnp.asarray(verts, jnp.float32), texture, light)
  assert int(out.overflow) == 0
  alpha = np.asarray(out.alpha)
  assert 0.15 < alpha.mean() < 0.9
  rgb = np.asarray(out.rgb)
  assert np.all(np.isfinite(rgb)) and rgb.min() >= 0.0 and rgb.max() <= 1.0 + 1e-6
  np.testing.assert_allclose(rgb[alpha == 0], 1.0)  # white background
  inside = alpha > 0.999
  # A constant texture lit head-on: colour ∝ (0.8, 0.5, 0.3).
  ratio = rgb[inside][:, 1] / rgb[inside][:, 0]
  np.testing.assert_allclose(np.median(ratio), 0.5 / 0.8, rtol=1e-3)
  # Textureless lights use the grey albedo instead.
  grey = render(jnp.asarray(verts, jnp.float32), texture, light.replace(textureless=jnp.ones(())))
  grey_rgb = np.asarray(grey.rgb)[inside]
  np.testing.assert_allclose(grey_rgb[:, 0], grey_rgb[:, 2], atol=1e-5)


def test_sample_texture_bilinear():
  texture = jnp.arange(2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 1)  # [[0, 1], [2, 3]]
  # Texel centres: (u, v) = (0.25, 0.75) is the top-left texel (row 0, v up).
  uv = jnp.array([[0.25, 0.75], [0.75, 0.75], [0.25, 0.25], [0.5, 0.5], [0.0, 1.0]])
  np.testing.assert_allclose(
    shading.sample_texture(texture, uv)[:, 0], [0.0, 1.0, 2.0, 1.5, 0.0], atol=1e-6
  )


def test_finite_differences_at_occlusion_edges():
  """A small sphere over a large one: the gradient of an image loss w.r.t. the small sphere's
  position and size (its occluding contour over the large sphere) matches central
  differences, and the contour pixels really carry it."""
  with jax.enable_x64(True):
    big, big_faces = _sphere(2, radius=0.9)
    small, small_faces = _sphere(2, radius=0.35)
    faces = jnp.asarray(np.concatenate([big_faces, small_faces + len(big)]))
    cam = camera_lib.orbit_camera(0.0, 0.0, 3.0, fov_deg=40.0)
    light = camera_lib.default_light(direction=jnp.array([0.4, 0.6, 1.0]))
    settings = raster.RasterSettings(
      image_size=32, sigma=2e-3, faces_per_pixel=16, max_faces_per_bin=640
    )
    rng = np.random.default_rng(1)
    target = jnp.asarray(rng.uniform(0.0, 1.0, (32, 32, 3)))

    def render(params):
      shift, scale = params[:3], params[3]
      verts = jnp.concatenate([jnp.asarray(big), jnp.asarray(small) * scale + shift])
      return shading.render_soft(verts, faces, cam, light, settings, background=(0.1, 0.2, 0.3))

    def loss(params):
      return jnp.sum((render(params).rgb - target) ** 2)

    params0 = jnp.array([0.15, 0.1, 0.75, 1.0])  # in front of the big sphere, off-centre
    grad = jax.jit(jax.grad(loss))(params0)
    for i in range(4):
      fd = _fitted_slope(loss, params0, i, span=1e-5)
      assert _relative_error(fd, float(grad[i])) < 0.02, (i, fd, grad[i])
    # The x-gradient comes from the small sphere's contour over the big one: the image
    # changes there (and alpha stays 1, the big sphere is behind).
    moved = jax.jit(render)(params0 + jnp.array([0.02, 0.0, 0.0, 0.0]))
    base = jax.jit(render)(params0)
    changed = np.abs(np.asarray(moved.rgb - base.rgb)).max(-1) > 1e-3
    assert changed.sum() > 10
    np.testing.assert_allclose(np.asarray(base.alpha)[changed], 1.0)


def test_outline_edges_are_contours_and_borders():
  verts, faces = _sphere(2, radius=0.9)
  cam = camera_lib.orbit_camera(30.0, 20.0, 3.0, fov_deg=40.0)
  settings = raster.RasterSettings(image_size=32)
  projected = raster.project_mesh(jnp.asarray(verts), jnp.asarray(faces), cam, settings)
  valid, outline = np.asarray(projected.valid), np.asarray(projected.outline)
  # Closed mesh: an outline edge is exactly a valid face's edge whose other face is culled.
  edges = np.asarray(raster.edge_index(jnp.asarray(faces)))
  other = {}
  for f in range(len(faces)):
    for i in range(3):
      other.setdefault(edges[f, i], []).append(f)
  expected = np.array(
    [
      [valid[f] and not all(valid[g] for g in other[edges[f, i]]) for i in range(3)]
      for f in range(len(faces))
    ]
  )
  np.testing.assert_array_equal(outline, expected)
  assert 10 < outline.sum() < valid.sum()
  # Traced faces give the same edge ids as concrete ones.
  np.testing.assert_array_equal(jax.jit(raster.edge_index)(jnp.asarray(faces)), edges)
  # An open quad of two triangles: its four border edges are outlines, the diagonal is not.
  quad = jnp.array([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]])
  quad_faces = jnp.array([[0, 1, 2], [0, 2, 3]], jnp.int32)
  front = raster.project_mesh(quad, quad_faces, camera_lib.orbit_camera(0, 0, 3.0), settings)
  np.testing.assert_array_equal(front.outline, [[True, True, False], [False, True, True]])


def test_layered_alpha_is_hard_coverage_at_one_half():
  """alpha > 0.5 exactly where a face contains the pixel centre (the outline does not grow),
  while the fringe outside is soft; SoftRas' clipped sum grows it."""
  verts, faces = _sphere(3, radius=0.9)
  cam = camera_lib.orbit_camera(10.0, 20.0, 3.0, fov_deg=40.0)
  for blend in raster.BLENDS:
    settings = raster.RasterSettings(image_size=64, sigma=4e-4, blend=blend)
    frags, _ = jax.jit(raster.rasterize, static_argnums=3)(
      jnp.asarray(verts, jnp.float32), jnp.asarray(faces), cam, settings
    )
    alpha = np.asarray(raster.fragment_alpha(frags, settings))
    covered = np.asarray(jnp.any(frags.inside, -1))
    if blend == "layered":
      np.testing.assert_array_equal(alpha > 0.5, covered)
      np.testing.assert_allclose(alpha[covered], 1.0)
      fringe = (~covered) & (alpha > 0.01)
      assert fringe.sum() > 50 and alpha[fringe].max() <= 0.5
    else:
      assert ((alpha > 0.5) & ~covered).sum() > 20
