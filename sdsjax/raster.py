"""SoftRas-style soft rasterizer with static top-K face selection (two passes).

All screen-space quantities are in NDC (x right, y up, the image is [−1, 1]², square
images of `S × S` pixels; pixel (row i, col j) has its centre at
`x = (2j + 1)/S − 1, y = 1 − (2i + 1)/S`). Depth `z` is the view-space distance along −z.

Pass 1: selection (no gradient, `jax.lax.stop_gradient`)
--------------------------------------------------------
Per face f with projected vertices p0, p1, p2 and depths z0, z1, z2:

* `valid_f`: all z_i in (near, far), |A2| > 1e-12 where A2 = cross(p1 − p0, p2 − p0) (twice
  the signed area), and A2 > 0 when `cull_backfaces` (counter-clockwise faces seen from
  outside have A2 > 0 in NDC).
* Soft radius `r = sqrt(σ · ln(1/1e-4 − 1))`: beyond r outside a face, D < 1e-4.
* Edge lines `e_i(p) = n_i · (p − p_i)` for edge p_i → p_{i+1}, with the unit normal n_i
  pointing into the triangle (so e_i ≥ 0 for all i ⇔ inside).
* Inverse-depth plane `w(p) = Σ λ_i(p) / z_i`: affine in p, with λ the screen-space
  barycentrics (below) extended to the whole plane.

1. Binning. The image, padded up to a multiple of `bin_size` (padding pixels are computed
   and cropped), is cut into square tiles of `bin_size` pixels. Face f overlaps
   tile t when `valid_f` and the face's NDC bounding box, grown by r on every side,
   intersects the rectangle spanned by the tile's pixel centres. Each tile keeps the
   `C = max_faces_per_bin` overlapping faces with the largest `−min_i z_i` (nearest first)
   via `jax.lax.top_k`. `overflow = Σ_t max(0, #overlapping(t) − C)`: those (tile, face)
   pairs are dropped (the farthest ones, usually hidden; a non-zero overflow can still
   leave holes, so it is returned and should be watched).
2. Per pixel. Among its tile's candidates, a face qualifies at pixel p when
   `m(p) = min_i e_i(p) > −r` (inside the triangle grown by r along its edges). Score:
   `2 + clip(near · w(p), 0, 1)` when `m(p) ≥ 0` (the face contains the pixel centre;
   nearest first), else `1 + m(p)/r` (a soft neighbour; closest edge first). The K best
   qualifying faces are kept (`jax.lax.top_k`, sorted by score, ties to the lower index);
   empty slots get face id −1.
   Covering faces come first so a pixel's own face is never pushed out by soft neighbours
   (which would leave speckle holes). Soft neighbours are ranked by distance, not depth: on
   a convex surface the extrapolated depth planes of far-off neighbours lie in front of the
   surface, so depth order would keep the far ones and drop the adjacent face that carries
   most of the coverage near an edge.

Tiles are processed in chunks (`lax.map`), so memory is bounded by
`tiles_per_chunk × (F + bin_size² × C)`, never pixels × faces.

Pass 2: evaluation (differentiable)
-----------------------------------
For each selected (pixel p, face f) with p0, p1, p2, z0, z1, z2 gathered from the projected
vertices (gradients flow to them):

* Screen barycentrics λ0 = cross(p1 − p, p2 − p)/A2, λ1 = cross(p2 − p, p0 − p)/A2,
  λ2 = cross(p0 − p, p1 − p)/A2; inside ⇔ all λ_i ≥ 0.
* d² = min over the three edges of the squared distance from p to the edge segment
  (`t = clip((p − a)·(b − a)/|b − a|², 0, 1)`, `d² = |p − a − t(b − a)|²`).
* Coverage `D = sigmoid(s · d²/σ)`, s = +1 inside, −1 outside; 0 for empty slots.
* Clipped barycentrics `λc = max(λ, 0)/Σ max(λ, 0)`; perspective-correct
  `b_i = (λc_i / z_i) / Σ_j (λc_j / z_j)`, depth `z = 1 / Σ_j (λc_j / z_j)`.
* Aggregation (`blend`), a softmax in log space:
  `z_n = clip((far − z)/(far − near), 0, 1)`, logits `l_k = log D_k + z_n,k/γ` (−inf for
  empty slots), background logit `l_bg = ε/γ`, `c = (Σ_k e^{l_k} c_k + e^{l_bg} bg) /
  (Σ_k e^{l_k} + e^{l_bg})` (SoftRas colour, shifted by the max logit for stability).
* Alpha (`alpha_from_coverage`): `alpha = min(1, Σ_k D_k)` by default ("sum"), or SoftRas'
  `1 − Π_k (1 − D_k)` ("product"). The product dips to 0.75 on interior edges (D_A = 1 − D_B
  for adjacent faces); the clipped sum is exactly 1 there, and equal to D at a lone edge.
* Output colour: `rgb = alpha · c + (1 − alpha) · bg`. With γ = 1e-4 the SoftRas colour c
  alone has a hard edge at the soft radius r (any face outweighs the background by
  e^{(z_n − ε)/γ}), so outer silhouettes would get no gradient through rgb; compositing by
  alpha makes them soft. Inside the mesh alpha = 1 and rgb = c exactly. Silhouettes over
  another surface (nose over cheek) stay as sharp as SoftRas makes them (set by γ).

The evaluation runs over chunks of pixels under `jax.checkpoint`, so the backward pass keeps
only one chunk's intermediates alive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

from sdsjax import camera as camera_lib
from sdsjax.errors import ConfigError

Array = jax.Array

# Coverage below this is negligible; it fixes the soft radius (SoftRas).
_COVERAGE_EPS = 1e-4


@struct.dataclass
class RasterSettings:
  """Soft rasterizer settings. All fields are static (a pytree without leaves, hashable).

  Defaults target the fit's 128² renders of a unit-radius head at distance ~3:
  σ = 3e-5 NDC² (soft radius r = 0.017 NDC: 1.1 px at 128², 4.3 px at 512²), γ = 1e-4 and
  ε = 1e-3 as in SoftRas, near/far = 0.1/10 so that 1% of the head radius in depth changes
  z_n by 1e-3 = 10 γ (surfaces a few mm apart still occlude each other), K = 8.

  Attributes:
    image_size: S, images are S × S.
    sigma: σ in NDC² (SoftRas coverage sharpness). Scale it with the pixel size,
      σ ≈ 0.5–2 × (2/S)², for silhouette gradients that reach neighbouring pixels.
    gamma: γ, softmax depth temperature.
    eps: ε, background depth in z_n units.
    near: near plane (view depth); faces with a vertex closer are dropped.
    far: far plane; faces with a vertex farther are dropped.
    faces_per_pixel: K.
    bin_size: tile side in pixels; 0 picks 4 for S ≤ 64, 8 for S ≤ 256, else 16.
    max_faces_per_bin: C, candidates kept per tile; 0 picks it from the face density
      (see `resolved_max_faces_per_bin`). Overflow is returned when a tile had more.
    cull_backfaces: drop clockwise (back-facing) faces in the selection pass.
    tiles_per_chunk: tiles per selection step; 0 picks it from a budget of 2^21
      (CPU) or 2^24 (GPU) pixel × candidate pairs.
    pixels_per_chunk: pixels per evaluation step; 0 picks 2^14 on CPU and 2^18 on GPU.
    alpha_rule: "sum" (min(1, Σ D), default) or "product" (SoftRas 1 − Π(1 − D)); see
      `alpha_from_coverage`.
  """

  image_size: int = struct.field(pytree_node=False, default=128)
  sigma: float = struct.field(pytree_node=False, default=3e-5)
  gamma: float = struct.field(pytree_node=False, default=1e-4)
  eps: float = struct.field(pytree_node=False, default=1e-3)
  near: float = struct.field(pytree_node=False, default=0.1)
  far: float = struct.field(pytree_node=False, default=10.0)
  faces_per_pixel: int = struct.field(pytree_node=False, default=8)
  bin_size: int = struct.field(pytree_node=False, default=0)
  max_faces_per_bin: int = struct.field(pytree_node=False, default=0)
  cull_backfaces: bool = struct.field(pytree_node=False, default=True)
  tiles_per_chunk: int = struct.field(pytree_node=False, default=0)
  pixels_per_chunk: int = struct.field(pytree_node=False, default=0)
  alpha_rule: str = struct.field(pytree_node=False, default="sum")

  def __post_init__(self):
    checks = [
      ("image_size", self.image_size >= 1, "a positive integer"),
      ("sigma", self.sigma > 0, "positive"),
      ("gamma", self.gamma > 0, "positive"),
      ("near", self.near > 0, "positive"),
      ("far", self.far > self.near, "greater than near"),
      ("faces_per_pixel", self.faces_per_pixel >= 1, "at least 1"),
      ("bin_size", self.bin_size >= 0, "0 (auto) or positive"),
      ("max_faces_per_bin", self.max_faces_per_bin >= 0, "0 (auto) or positive"),
      ("tiles_per_chunk", self.tiles_per_chunk >= 0, "0 (auto) or positive"),
      ("pixels_per_chunk", self.pixels_per_chunk >= 0, "0 (auto) or positive"),
    ]
    checks.append(("alpha_rule", self.alpha_rule in ("sum", "product"), '"sum" or "product"'))
    for name, ok, what in checks:
      if not ok:
        raise ConfigError(f"raster.{name}={getattr(self, name)!r} is invalid: it must be {what}.")

  @property
  def soft_radius(self) -> float:
    """NDC distance outside a face beyond which its coverage D is below 1e-4."""
    return math.sqrt(self.sigma * math.log(1.0 / _COVERAGE_EPS - 1.0))

  def resolved_bin_size(self) -> int:
    if self.bin_size:
      return min(self.bin_size, self.image_size)
    # Small tiles at low resolution, where faces are sub-pixel and a tile holds many.
    size = self.image_size
    return min(4 if size <= 64 else 8 if size <= 256 else 16, size)

  def resolved_max_faces_per_bin(self, num_faces: int) -> int:
    """C for a mesh of `num_faces` faces (static: depends on shapes only).

    Auto: 12× the faces expected in a tile grown by the soft radius and a face width if the
    F faces covered a third of the image (front half visible), rounded up to 64 and kept
    in [64, 1024]. Measured maxima are 2–4× that expectation on spheres and up to 6× on
    the builtin head (dense ears); with the auto value the head shows no overflow at
    128², 256² or 512² over 64 random cameras.
    """
    if self.max_faces_per_bin:
      wanted = self.max_faces_per_bin
    else:
      size = self.image_size
      grown = self.resolved_bin_size() + 2.0 * self.soft_radius * size / 2.0 + 2.0
      expected = 0.5 * num_faces * grown**2 / (size * size / 3.0)
      wanted = int(min(max(64 * math.ceil(12.0 * expected / 64), 64), 1024))
    # At least K so top_k over candidates is defined; padding supplies missing faces.
    return max(min(wanted, num_faces), self.faces_per_pixel)


@struct.dataclass
class ProjectedMesh:
  """Per-face screen-space data.

  Attributes:
    xy: (F, 3, 2) NDC vertex positions.
    depth: (F, 3) view depths of the vertices.
    valid: (F,) whether the face takes part in rasterization (see the module docstring).
  """

  xy: Array
  depth: Array
  valid: Array


@struct.dataclass
class Fragments:
  """Per-pixel selected faces and their soft-raster quantities, nearest covering face first.

  Attributes:
    face_ids: (..., K) int32 face index, −1 where the slot is empty.
    bary: (..., K, 3) perspective-correct barycentrics, clipped to the triangle.
    depth: (..., K) view depth at the (clipped) pixel position.
    coverage: (..., K) SoftRas D in [0, 1]; 0 for empty slots.
    log_coverage: (..., K) log D (stable for tiny D); −inf for empty slots.
    inside: (..., K) whether the pixel centre is inside the face.
  """

  face_ids: Array
  bary: Array
  depth: Array
  coverage: Array
  log_coverage: Array
  inside: Array


def _cross2(u: Array, v: Array) -> Array:
  return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def project_mesh(
  verts: Array, faces: Array, camera: camera_lib.Camera, settings: RasterSettings
) -> ProjectedMesh:
  """Projects a mesh and marks the faces that can be rasterized.

  Args:
    verts: (V, 3) world-space vertices.
    faces: (F, 3) int32 vertex indices, counter-clockwise seen from outside.
    camera: the camera.
    settings: raster settings (near, far, culling).

  Returns:
    The projected mesh; differentiable w.r.t. `verts`.
  """
  chex.assert_rank(verts, 2)
  chex.assert_axis_dimension(verts, 1, 3)
  chex.assert_rank(faces, 2)
  chex.assert_axis_dimension(faces, 1, 3)
  ndc, depth = camera_lib.project_points(camera, verts)
  xy = ndc[faces]
  z = depth[faces]
  area2 = _cross2(xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0])
  valid = (
    jnp.all(z > settings.near, axis=-1)
    & jnp.all(z < settings.far, axis=-1)
    & (jnp.abs(area2) > 1e-12)
  )
  if settings.cull_backfaces:
    valid &= area2 > 0
  return ProjectedMesh(xy=xy, depth=z, valid=jax.lax.stop_gradient(valid))


def _tile_geometry(settings: RasterSettings) -> tuple[int, int, int]:
  """(bin_size T, tiles per side nb, padded image side nb·T)."""
  size = settings.image_size
  tile = settings.resolved_bin_size()
  tiles_per_side = -(-size // tile)
  return tile, tiles_per_side, tiles_per_side * tile


def _on_gpu() -> bool:
  return jax.default_backend() not in ("cpu",)


def bin_counts(projected: ProjectedMesh, settings: RasterSettings) -> Array:
  """(nb, nb) int32 number of faces overlapping each tile (diagnostics, no chunking).

  Use it to size `max_faces_per_bin`: the selection keeps min(count, C) faces per tile.
  """
  projected = jax.lax.stop_gradient(projected)
  tile, tiles_per_side, _ = _tile_geometry(settings)
  size = settings.image_size
  radius = settings.soft_radius
  lo = jnp.min(projected.xy, axis=1) - radius
  hi = jnp.max(projected.xy, axis=1) + radius
  t = jnp.arange(tiles_per_side)
  x_lo = (2.0 * (t * tile) + 1.0) / size - 1.0
  x_hi = (2.0 * (t * tile + tile - 1) + 1.0) / size - 1.0
  in_x = (lo[None, :, 0] <= x_hi[:, None]) & (hi[None, :, 0] >= x_lo[:, None])  # (nb, F)
  in_y = (lo[None, :, 1] <= -x_lo[:, None]) & (hi[None, :, 1] >= -x_hi[:, None])
  both = in_y[:, None, :] & in_x[None, :, :] & projected.valid[None, None, :]
  return jnp.sum(both, axis=-1, dtype=jnp.int32)


def select_faces(projected: ProjectedMesh, settings: RasterSettings) -> tuple[Array, Array]:
  """Pass 1: per pixel, the K best faces (no gradient).

  Args:
    projected: the projected mesh (F faces).
    settings: raster settings.

  Returns:
    face_ids: (S, S, K) int32, −1 for empty slots; slot order: faces containing the pixel
      centre first, then soft neighbours, each nearest first.
    overflow: () int32, (tile, face) overlaps dropped because a tile held more than
      `max_faces_per_bin` faces.
  """
  projected = jax.lax.stop_gradient(projected)
  xy, z, valid = projected.xy, projected.depth, projected.valid
  num_faces = xy.shape[0]
  dtype = xy.dtype
  k = settings.faces_per_pixel
  size = settings.image_size
  tile, tiles_per_side, padded = _tile_geometry(settings)
  cands = settings.resolved_max_faces_per_bin(num_faces)
  radius = settings.soft_radius

  # Per-face tables.
  p0, p1, p2 = xy[:, 0], xy[:, 1], xy[:, 2]
  area2 = _cross2(p1 - p0, p2 - p0)
  orient = jnp.where(area2 >= 0, 1.0, -1.0).astype(dtype)
  starts = xy  # edge i runs p_i -> p_{i+1}
  edges = jnp.roll(xy, -1, axis=1) - xy  # (F, 3, 2)
  lengths = jnp.sqrt(jnp.maximum(jnp.sum(edges * edges, -1), 1e-30))
  normals = orient[:, None, None] * jnp.stack([-edges[..., 1], edges[..., 0]], -1)
  normals = normals / lengths[..., None]  # unit, pointing inside
  lines = jnp.concatenate(
    [normals, -jnp.sum(normals * starts, -1, keepdims=True)], -1
  )  # (F, 3, 3): a, b, c
  # Inverse-depth plane w(x, y) = A x + B y + C from the affine barycentric planes.
  safe_area2 = jnp.where(jnp.abs(area2) > 1e-12, area2, 1.0)
  q1, q2 = jnp.roll(xy, -1, axis=1), jnp.roll(xy, -2, axis=1)  # (p1, p2), (p2, p0), (p0, p1)
  bary_a = (q1[..., 1] - q2[..., 1]) / safe_area2[:, None]
  bary_b = (q2[..., 0] - q1[..., 0]) / safe_area2[:, None]
  bary_c = _cross2(q1, q2) / safe_area2[:, None]
  inv_z = 1.0 / jnp.where(valid[:, None], z, 1.0)
  plane = jnp.stack(
    [jnp.sum(bary_a * inv_z, -1), jnp.sum(bary_b * inv_z, -1), jnp.sum(bary_c * inv_z, -1)], -1
  )  # (F, 3)
  lo = jnp.min(xy, axis=1) - radius  # (F, 2)
  hi = jnp.max(xy, axis=1) + radius
  z_min = jnp.min(z, axis=1)
  bin_score = jnp.where(valid, -z_min, -jnp.inf)
  # top_k needs at least C entries; pad with never-selected faces.
  pad = max(cands - num_faces, 0)
  if pad:
    bin_score = jnp.concatenate([bin_score, jnp.full((pad,), -jnp.inf, dtype)])
    lo = jnp.concatenate([lo, jnp.full((pad, 2), jnp.inf, dtype)])
    hi = jnp.concatenate([hi, jnp.full((pad, 2), -jnp.inf, dtype)])

  tile_offsets = jnp.arange(tile)
  local_rows = jnp.repeat(tile_offsets, tile)  # (T²,) row-major pixels within a tile
  local_cols = jnp.tile(tile_offsets, tile)

  def select_tiles(chunk: tuple[Array, Array]) -> tuple[Array, Array]:
    tile_ids, real = chunk  # real: False for the wrap-around padding tiles
    ty, tx = tile_ids // tiles_per_side, tile_ids % tiles_per_side
    # Pixel-centre rectangle of each tile in NDC.
    x_lo = (2.0 * (tx * tile) + 1.0) / size - 1.0
    x_hi = (2.0 * (tx * tile + tile - 1) + 1.0) / size - 1.0
    y_hi = 1.0 - (2.0 * (ty * tile) + 1.0) / size
    y_lo = 1.0 - (2.0 * (ty * tile + tile - 1) + 1.0) / size
    overlap = (
      (lo[None, :, 0] <= x_hi[:, None])
      & (hi[None, :, 0] >= x_lo[:, None])
      & (lo[None, :, 1] <= y_hi[:, None])
      & (hi[None, :, 1] >= y_lo[:, None])
    )
    scores = jnp.where(overlap, bin_score[None], -jnp.inf)  # (n, F)
    overflow = jnp.sum(
      jnp.where(
        real, jnp.maximum(jnp.sum(overlap & (bin_score[None] > -jnp.inf), -1) - cands, 0), 0
      )
    )
    cand_score, cand_ids = jax.lax.top_k(scores, cands)  # (n, C)
    cand_ok = cand_score > -jnp.inf
    cand_ids = jnp.minimum(cand_ids, num_faces - 1)
    # Pixel centres of the tiles: (n, T², 1).
    rows = ty[:, None] * tile + local_rows[None]
    cols = tx[:, None] * tile + local_cols[None]
    px = ((2.0 * cols + 1.0) / size - 1.0).astype(dtype)[..., None]
    py = (1.0 - (2.0 * rows + 1.0) / size).astype(dtype)[..., None]
    cl = lines[cand_ids]  # (n, C, 3, 3)
    edge_min = None
    for i in range(3):  # three edges, unrolled
      e = cl[:, None, :, i, 0] * px + cl[:, None, :, i, 1] * py + cl[:, None, :, i, 2]
      edge_min = e if edge_min is None else jnp.minimum(edge_min, e)  # (n, T², C)
    cp = plane[cand_ids]  # (n, C, 3)
    w = cp[:, None, :, 0] * px + cp[:, None, :, 1] * py + cp[:, None, :, 2]
    nearness = jnp.clip(w * settings.near, 0.0, 1.0)
    qualifies = cand_ok[:, None, :] & (edge_min > -radius)
    # Covering faces first, nearest first; then soft neighbours, closest edge first.
    tiered = jnp.where(edge_min >= 0, 2.0 + nearness, 1.0 + edge_min / radius)
    score = jnp.where(qualifies, tiered, -jnp.inf)
    best, slot = jax.lax.top_k(score, k)  # (n, T², K)
    ids = jnp.take_along_axis(jnp.broadcast_to(cand_ids[:, None, :], score.shape), slot, axis=-1)
    ids = jnp.where(best > -jnp.inf, ids, -1).astype(jnp.int32)
    return ids, overflow.astype(jnp.int32)

  num_tiles = tiles_per_side * tiles_per_side
  if settings.tiles_per_chunk:
    per_chunk = settings.tiles_per_chunk
  else:
    budget = 2**24 if _on_gpu() else 2**21
    per_chunk = max(1, budget // (tile * tile * cands))
  per_chunk = min(per_chunk, num_tiles)
  num_chunks = -(-num_tiles // per_chunk)
  padded_ids = jnp.arange(num_chunks * per_chunk)
  tile_ids = (padded_ids % num_tiles).reshape(num_chunks, per_chunk)
  real = (padded_ids < num_tiles).reshape(num_chunks, per_chunk)
  ids, overflow = jax.lax.map(select_tiles, (tile_ids, real))
  ids = ids.reshape(num_chunks * per_chunk, tile * tile, k)[:num_tiles]
  overflow = jnp.sum(overflow)
  ids = ids.reshape(tiles_per_side, tiles_per_side, tile, tile, k)
  ids = ids.transpose(0, 2, 1, 3, 4).reshape(padded, padded, k)[:size, :size]
  return ids, overflow


def evaluate_fragments(
  projected: ProjectedMesh, face_ids: Array, pixels: Array, settings: RasterSettings
) -> Fragments:
  """Pass 2: differentiable soft-raster quantities for selected faces.

  Args:
    projected: the projected mesh; gradients flow to `xy` and `depth`.
    face_ids: (..., K) int32 selected faces, −1 for empty slots.
    pixels: (..., 2) NDC pixel centres.
    settings: raster settings (σ).

  Returns:
    Fragments with leading shape `(...)`.
  """
  dtype = projected.xy.dtype
  used = face_ids >= 0
  safe_ids = jnp.maximum(face_ids, 0)
  # One gather of a packed (F, 9) table, then structure-of-arrays math on (..., K) planes:
  # XLA vectorises those far better than arrays with trailing dims of 2 or 3.
  table = jnp.concatenate([projected.xy.reshape(-1, 6), projected.depth.reshape(-1, 3)], axis=-1)
  gathered = table[safe_ids]  # (..., K, 9)
  # Empty slots see a harmless canonical triangle so no NaN reaches the gradient.
  canonical = jnp.array([0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype)
  gathered = jnp.where(used[..., None], gathered, canonical)
  x0, y0, x1, y1, x2, y2, z0, z1, z2 = [gathered[..., i] for i in range(9)]
  px = pixels[..., 0:1].astype(dtype)  # (..., 1)
  py = pixels[..., 1:2].astype(dtype)
  area2 = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
  area2 = jnp.where(jnp.abs(area2) > 1e-12, area2, 1e-12)
  l0 = ((x1 - px) * (y2 - py) - (y1 - py) * (x2 - px)) / area2
  l1 = ((x2 - px) * (y0 - py) - (y2 - py) * (x0 - px)) / area2
  l2 = ((x0 - px) * (y1 - py) - (y0 - py) * (x1 - px)) / area2
  inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0) & used

  def segment_dist2(ax, ay, bx, by):
    abx, aby = bx - ax, by - ay
    apx, apy = px - ax, py - ay
    t = jnp.clip((apx * abx + apy * aby) / jnp.maximum(abx * abx + aby * aby, 1e-30), 0.0, 1.0)
    dx, dy = apx - t * abx, apy - t * aby
    return dx * dx + dy * dy

  dist2 = jnp.minimum(
    jnp.minimum(segment_dist2(x0, y0, x1, y1), segment_dist2(x1, y1, x2, y2)),
    segment_dist2(x2, y2, x0, y0),
  )
  logit = jnp.where(inside, dist2, -dist2) / settings.sigma
  coverage = jnp.where(used, jax.nn.sigmoid(logit), 0.0)
  log_coverage = jnp.where(used, jax.nn.log_sigmoid(logit), -jnp.inf)
  c0, c1, c2 = jnp.maximum(l0, 0.0), jnp.maximum(l1, 0.0), jnp.maximum(l2, 0.0)
  total = jnp.maximum(c0 + c1 + c2, 1e-12)
  w0, w1, w2 = c0 / (total * z0), c1 / (total * z1), c2 / (total * z2)
  inv_depth = w0 + w1 + w2
  depth = 1.0 / inv_depth
  bary = jnp.stack([w0, w1, w2], axis=-1) * depth[..., None]
  return Fragments(
    face_ids=face_ids,
    bary=bary,
    depth=depth,
    coverage=coverage,
    log_coverage=log_coverage,
    inside=inside,
  )


def blend(
  colors: Array, fragments: Fragments, background: Array, settings: RasterSettings
) -> tuple[Array, Array]:
  """SoftRas aggregation of per-fragment colours, composited over the background by alpha.

  Args:
    colors: (..., K, C) colour of each fragment.
    fragments: fragments with leading shape `(...)`.
    background: (..., C) or (C,) background colour.
    settings: raster settings (γ, ε, near, far, alpha_rule).

  Returns:
    rgb: (..., C) `alpha · c + (1 − alpha) · background`, c the SoftRas softmax colour.
    alpha: (...,) soft silhouette (see `alpha_from_coverage`).
  """
  z_n = jnp.clip((settings.far - fragments.depth) / (settings.far - settings.near), 0.0, 1.0)
  used = fragments.face_ids >= 0
  # Softmax in log space: log(D_k exp(z_n/γ)) = log D_k + z_n/γ, so tiny D never divides.
  logits = jnp.where(used, fragments.log_coverage + z_n / settings.gamma, -jnp.inf)
  bg_logit = settings.eps / settings.gamma
  shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), bg_logit))
  w = jnp.exp(logits - shift)  # (..., K)
  w_bg = jnp.exp(bg_logit - shift)  # (..., 1)
  soft = (jnp.sum(w[..., None] * colors, axis=-2) + w_bg * background) / (
    jnp.sum(w, -1, keepdims=True) + w_bg
  )
  alpha = alpha_from_coverage(fragments.coverage, settings)
  rgb = alpha[..., None] * soft + (1.0 - alpha[..., None]) * background
  return rgb, alpha


def alpha_from_coverage(coverage: Array, settings: RasterSettings) -> Array:
  """(...,) soft silhouette from (..., K) coverages.

  `alpha_rule="sum"`: min(1, Σ_k D_k). Across an interior edge shared by faces A and B,
  D_A + D_B ≥ 1 (B's distance to the pixel is at most A's distance to the shared edge), so
  the interior is exactly opaque and sends no gradient, while a lone silhouette face gives D.
  `alpha_rule="product"`: SoftRas' 1 − Π_k (1 − D_k), which dips to 0.75 on interior edges
  (a faint wireframe of background shows through when compositing).
  """
  if settings.alpha_rule == "product":
    return 1.0 - jnp.prod(1.0 - coverage, axis=-1)
  return jnp.minimum(jnp.sum(coverage, axis=-1), 1.0)


def map_pixel_chunks(
  fn: Callable[[Any], Any], per_pixel: Any, settings: RasterSettings, checkpoint: bool = True
) -> Any:
  """Applies `fn` to chunks of pixels under `jax.checkpoint` (bounded backward memory).

  Args:
    fn: maps a pytree of (P, ...) per-pixel arrays to a pytree of (P, ...) arrays.
    per_pixel: pytree of (S, S, ...) arrays.
    settings: raster settings (image size, pixels_per_chunk).
    checkpoint: rematerialise each chunk in the backward pass.

  Returns:
    The pytree of (S, S, ...) outputs.
  """
  size = settings.image_size
  num_pixels = size * size
  chunk = settings.pixels_per_chunk or (2**18 if _on_gpu() else 2**14)
  chunk = min(chunk, num_pixels)
  num_chunks = -(-num_pixels // chunk)
  pad = num_chunks * chunk - num_pixels

  def to_chunks(x):
    x = x.reshape((num_pixels, *x.shape[2:]))
    if pad:
      x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
    return x.reshape((num_chunks, chunk, *x.shape[1:]))

  def from_chunks(y):
    y = y.reshape((num_chunks * chunk, *y.shape[2:]))[:num_pixels]
    return y.reshape((size, size, *y.shape[1:]))

  body = jax.checkpoint(fn) if checkpoint else fn
  xs = jax.tree_util.tree_map(to_chunks, per_pixel)
  if num_chunks == 1:
    ys = jax.tree_util.tree_map(lambda y: y[None], body(jax.tree_util.tree_map(lambda x: x[0], xs)))
  else:
    ys = jax.lax.map(body, xs)
  return jax.tree_util.tree_map(from_chunks, ys)


def rasterize(
  verts: Array, faces: Array, camera: camera_lib.Camera, settings: RasterSettings
) -> tuple[Fragments, Array]:
  """Both passes over the whole image at once (simple; use for small images).

  Args:
    verts: (V, 3) world-space vertices.
    faces: (F, 3) int32 faces.
    camera: the camera.
    settings: raster settings.

  Returns:
    fragments: (S, S, K) fragments.
    overflow: () int32 bin overflow.
  """
  projected = project_mesh(verts, faces, camera, settings)
  face_ids, overflow = select_faces(projected, settings)
  pixels = camera_lib.pixel_centers(settings.image_size, projected.xy.dtype)
  return evaluate_fragments(projected, face_ids, pixels, settings), overflow


def soft_silhouette(
  verts: Array, faces: Array, camera: camera_lib.Camera, settings: RasterSettings
) -> tuple[Array, Array]:
  """(S, S) alpha = 1 − Π(1 − D) and the () overflow, evaluated in pixel chunks."""
  projected = project_mesh(verts, faces, camera, settings)
  face_ids, overflow = select_faces(projected, settings)
  pixels = camera_lib.pixel_centers(settings.image_size, projected.xy.dtype)

  def alpha_of(chunk):
    ids, pix = chunk
    frags = evaluate_fragments(projected, ids, pix, settings)
    return alpha_from_coverage(frags.coverage, settings)

  return map_pixel_chunks(alpha_of, (face_ids, pixels), settings), overflow
