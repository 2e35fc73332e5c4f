"""A PyTorch port of sdsjax's soft rasterizer and Lambertian shading (`sdsjax.raster`,
`sdsjax.shading`, `sdsjax.camera`), batched over views.

It implements the same algorithm with the same settings, so the baseline renders what sdsjax
renders (see those modules' docstrings for the formulas):

* projection with per-view outline edges (no valid face of the same orientation across the
  mesh edge: contours, open borders);
* selection without gradient: faces binned into square tiles, each tile keeps its
  `max_faces_per_bin` nearest faces (by min vertex depth), then each pixel keeps its K best
  faces: covering faces first (score `2 + clip(near·w(p), 0, 1)`), then, with
  `blend="layered"`, faces with an outline edge within the soft radius (score `1 − d̃/r`),
  or with `blend="softras"` any face within it (score `1 + min_i e_i(p)/r`);
* differentiable evaluation of the K selected faces per pixel: barycentrics, squared distance
  to the edges, SoftRas coverage `sigmoid(±d²/σ)`, opacity (1 inside, else the outline fringe
  `sigmoid(−d_o²/σ)`), perspective-correct clipped barycentrics, depth;
* shading with interpolated area-weighted vertex normals and a grey albedo;
* `blend="layered"`: depth-sorted layered compositing of the opacities, alpha 1 where a face
  covers the pixel centre, else the max fringe; `blend="softras"`: SoftRas softmax over depth
  composited by alpha = min(1, Σ D) ("sum") or 1 − Π(1 − D) ("product").

Everything is vectorised over (views, pixels, K) the way a PyTorch user would write it; the
images here (≤ 128²) fit in memory whole, so there is no pixel chunking.
"""

from __future__ import annotations

import dataclasses
import math

import torch

# Coverage below this is negligible; it fixes the soft radius (SoftRas).
_COVERAGE_EPS = 1e-4
# Squared NDC distance standing in for "no outline edge"; depth given to empty slots.
_NO_OUTLINE_DIST2 = 1e6
_EMPTY_DEPTH = 1e6
DEFAULT_ALBEDO = (0.7, 0.7, 0.7)


@dataclasses.dataclass(frozen=True)
class RasterSettings:
  """The same fields and defaults as `sdsjax.raster.RasterSettings` (chunking aside)."""

  image_size: int = 128
  sigma: float = 3e-5
  gamma: float = 1e-4
  eps: float = 1e-3
  near: float = 0.1
  far: float = 10.0
  faces_per_pixel: int = 8
  bin_size: int = 0
  max_faces_per_bin: int = 0
  cull_backfaces: bool = True
  blend: str = "layered"
  depth_tolerance: float = 0.03
  alpha_rule: str = "sum"

  @property
  def soft_radius(self) -> float:
    return math.sqrt(self.sigma * math.log(1.0 / _COVERAGE_EPS - 1.0))

  def resolved_bin_size(self) -> int:
    if self.bin_size:
      return min(self.bin_size, self.image_size)
    # Small tiles at low resolution, where faces are sub-pixel and a tile holds many.
    size = self.image_size
    return min(4 if size <= 64 else 8 if size <= 256 else 16, size)

  def resolved_max_faces_per_bin(self, num_faces: int) -> int:
    """C: 12× the faces expected in a grown tile if F faces covered a third of the image."""
    if self.max_faces_per_bin:
      wanted = self.max_faces_per_bin
    else:
      size = self.image_size
      grown = self.resolved_bin_size() + 2.0 * self.soft_radius * size / 2.0 + 2.0
      expected = 0.5 * num_faces * grown**2 / (size * size / 3.0)
      wanted = int(min(max(64 * math.ceil(12.0 * expected / 64), 64), 1024))
    return max(min(wanted, num_faces), self.faces_per_pixel)


@dataclasses.dataclass
class Cameras:
  """B pinhole cameras: world_to_view (B, 4, 4), focal (B,), eye (B, 3)."""

  world_to_view: torch.Tensor
  focal: torch.Tensor
  eye: torch.Tensor


@dataclasses.dataclass
class Lights:
  """B directional lights: direction (B, 3) towards the light, ambient (B,), diffuse (B,)."""

  direction: torch.Tensor
  ambient: torch.Tensor
  diffuse: torch.Tensor


def cameras_and_lights(camera, light, to_tensor) -> tuple[Cameras, Lights]:
  """The baseline's Cameras and Lights from any object with the same fields (sdsjax's
  camera.Camera and camera.Light, say), each field passed through `to_tensor`."""
  cameras = Cameras(
    world_to_view=to_tensor(camera.world_to_view),
    focal=to_tensor(camera.focal),
    eye=to_tensor(camera.eye),
  )
  lights = Lights(
    direction=to_tensor(light.direction),
    ambient=to_tensor(light.ambient),
    diffuse=to_tensor(light.diffuse),
  )
  return cameras, lights


def _normalize(v: torch.Tensor, eps: float) -> torch.Tensor:
  return v / torch.sqrt(torch.clamp((v * v).sum(-1, keepdim=True), min=eps))


def look_at(
  eye: torch.Tensor, fov_deg: torch.Tensor, target: torch.Tensor | None = None
) -> Cameras:
  """Cameras at `eye` (B, 3) looking at `target` (B, 3; the origin if None) with +y up
  (sdsjax.camera.look_at)."""
  z_axis = _normalize(eye if target is None else eye - target, 1e-12)
  up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
  x_raw = torch.linalg.cross(up, z_axis)
  # Straight overhead: fall back to ∓z as "up" so the frame stays finite.
  fallback = torch.zeros_like(eye)
  fallback[:, 2] = torch.where(z_axis[:, 1] > 0, -1.0, 1.0)
  degenerate = (x_raw * x_raw).sum(-1, keepdim=True) < 1e-12
  x_raw = torch.where(degenerate, torch.linalg.cross(fallback, z_axis), x_raw)
  x_axis = _normalize(x_raw, 1e-12)
  y_axis = torch.linalg.cross(z_axis, x_axis)
  rotation = torch.stack([x_axis, y_axis, z_axis], dim=1)  # (B, 3, 3), rows = axes
  world_to_view = torch.eye(4, dtype=eye.dtype, device=eye.device).repeat(eye.shape[0], 1, 1)
  world_to_view[:, :3, :3] = rotation
  world_to_view[:, :3, 3] = -(rotation @ eye[:, :, None])[..., 0]
  focal = 1.0 / torch.tan(torch.deg2rad(fov_deg) / 2)
  return Cameras(world_to_view=world_to_view, focal=focal, eye=eye)


def orbit_cameras(azimuth_deg, elevation_deg, distance, fov_deg) -> Cameras:
  """(B,) tensors -> cameras on `distance·(cos el sin az, sin el, cos el cos az)`."""
  az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
  eye = distance[:, None] * torch.stack(
    [torch.cos(el) * torch.sin(az), torch.sin(el), torch.cos(el) * torch.cos(az)], -1
  )
  return look_at(eye, fov_deg)


def view_index(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor) -> torch.Tensor:
  """Index into ("front view", "side view", "back view", "overhead view")."""
  a = torch.abs(180.0 - torch.remainder(180.0 - azimuth_deg, 360.0))
  index = torch.where(a < 45.0, 0, torch.where(a > 135.0, 2, 1))
  return torch.where(elevation_deg > 60.0, 3, index)


def _cross2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
  return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def edge_index(faces: torch.Tensor) -> torch.Tensor:
  """(F, 3) int64 id of the undirected mesh edge (vertex i, vertex i + 1) of each face."""
  pairs = torch.stack([faces, torch.roll(faces, -1, dims=1)], -1).reshape(-1, 2)
  lo, hi = pairs.amin(-1).long(), pairs.amax(-1).long()
  _, ids = torch.unique(lo * (int(faces.max()) + 1) + hi, return_inverse=True)
  return ids.reshape(-1, 3)


def project(verts: torch.Tensor, faces: torch.Tensor, cameras: Cameras, settings: RasterSettings):
  """Per-face NDC positions (B, F, 3, 2), depths (B, F, 3), validity (B, F) and outline edges
  (B, F, 3): edge i (vertex i → i + 1) of a valid face with no other valid face of the same
  orientation (or degenerate face) across it."""
  rotation = cameras.world_to_view[:, :3, :3]
  translation = cameras.world_to_view[:, :3, 3]
  view = verts @ rotation.transpose(1, 2) + translation[:, None]
  depth = -view[..., 2]
  safe_depth = torch.where(depth > 1e-6, depth, torch.full_like(depth, 1e-6))
  ndc = cameras.focal[:, None, None] * view[..., :2] / safe_depth[..., None]
  index = faces.reshape(-1)
  xy = ndc.index_select(1, index).reshape(ndc.shape[0], -1, 3, 2)
  z = depth.index_select(1, index).reshape(depth.shape[0], -1, 3)
  with torch.no_grad():
    area2 = _cross2(xy[..., 1, :] - xy[..., 0, :], xy[..., 2, :] - xy[..., 0, :])
    in_range = (z > settings.near).all(-1) & (z < settings.far).all(-1)
    degenerate = in_range & (area2.abs() <= 1e-12)
    valid = in_range & ~degenerate
    if settings.cull_backfaces:
      valid &= area2 > 0
    edges = edge_index(faces).reshape(-1)  # (3F,)
    batch = xy.shape[0]

    def per_edge_count(mask):  # (B, F) -> (B, F, 3) faces of the mask on each face's edges
      counts = torch.zeros(batch, edges.numel(), dtype=torch.int64, device=xy.device)
      counts.index_add_(1, edges, mask.repeat_interleave(3, dim=1).long())
      return counts.index_select(1, edges).reshape(batch, -1, 3)

    front = per_edge_count((valid & (area2 > 0)) | degenerate)
    back = per_edge_count((valid & (area2 < 0)) | degenerate)
    same = torch.where((area2 > 0)[..., None], front, back)
    outline = valid[..., None] & (same <= 1)
  return xy, z, valid, outline


@torch.no_grad()
def select_faces(
  xy: torch.Tensor,
  z: torch.Tensor,
  valid: torch.Tensor,
  outline: torch.Tensor,
  settings: RasterSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
  """Pass 1: (B, S, S, K) face ids (−1 = empty) and (B,) bin overflow."""
  batch, num_faces = xy.shape[:2]
  dtype = xy.dtype
  k = settings.faces_per_pixel
  size = settings.image_size
  tile = settings.resolved_bin_size()
  per_side = -(-size // tile)
  padded = per_side * tile
  cands = settings.resolved_max_faces_per_bin(num_faces)
  radius = settings.soft_radius

  p0, p1, p2 = xy[..., 0, :], xy[..., 1, :], xy[..., 2, :]
  area2 = _cross2(p1 - p0, p2 - p0)
  orient = torch.where(area2 >= 0, 1.0, -1.0).to(dtype)
  edges = torch.roll(xy, -1, dims=2) - xy  # (B, F, 3, 2)
  lengths = torch.sqrt(torch.clamp((edges * edges).sum(-1), min=1e-30))
  normals = orient[..., None, None] * torch.stack([-edges[..., 1], edges[..., 0]], -1)
  normals = normals / lengths[..., None]  # unit, pointing inside
  offsets = -(normals * xy).sum(-1)  # (B, F, 3)
  # Inverse-depth plane w(x, y) = A x + B y + C.
  safe_area2 = torch.where(area2.abs() > 1e-12, area2, torch.ones_like(area2))[..., None]
  q1, q2 = torch.roll(xy, -1, dims=2), torch.roll(xy, -2, dims=2)
  inv_z = 1.0 / torch.where(valid[..., None], z, torch.ones_like(z))
  plane_a = ((q1[..., 1] - q2[..., 1]) / safe_area2 * inv_z).sum(-1)
  plane_b = ((q2[..., 0] - q1[..., 0]) / safe_area2 * inv_z).sum(-1)
  plane_c = (_cross2(q1, q2) / safe_area2 * inv_z).sum(-1)
  lo = xy.amin(2) - radius
  hi = xy.amax(2) + radius
  bin_score = torch.where(valid, -z.amin(-1), -torch.inf)  # (B, F)
  pad = max(cands - num_faces, 0)
  if pad:
    bin_score = torch.cat([bin_score, bin_score.new_full((batch, pad), -torch.inf)], 1)
    lo = torch.cat([lo, lo.new_full((batch, pad, 2), torch.inf)], 1)
    hi = torch.cat([hi, hi.new_full((batch, pad, 2), -torch.inf)], 1)

  # Tiles: pixel-centre rectangles in NDC, (nt,).
  t_idx = torch.arange(per_side * per_side, device=lo.device)
  ty, tx = t_idx // per_side, t_idx % per_side
  x_lo = (2.0 * (tx * tile) + 1.0) / size - 1.0
  x_hi = (2.0 * (tx * tile + tile - 1) + 1.0) / size - 1.0
  y_hi = 1.0 - (2.0 * (ty * tile) + 1.0) / size
  y_lo = 1.0 - (2.0 * (ty * tile + tile - 1) + 1.0) / size
  overlap = (
    (lo[:, None, :, 0] <= x_hi[None, :, None].to(dtype))
    & (hi[:, None, :, 0] >= x_lo[None, :, None].to(dtype))
    & (lo[:, None, :, 1] <= y_hi[None, :, None].to(dtype))
    & (hi[:, None, :, 1] >= y_lo[None, :, None].to(dtype))
  )  # (B, nt, F)
  scores = torch.where(overlap, bin_score[:, None], -torch.inf)
  overflow = torch.clamp((overlap & (bin_score[:, None] > -torch.inf)).sum(-1) - cands, min=0).sum(
    -1
  )
  cand_score, cand_ids = _top_k_low_index_ties(scores, cands)  # (B, nt, C)
  cand_ok = cand_score > -torch.inf
  cand_ids = torch.clamp(cand_ids, max=num_faces - 1)

  # Pixel centres of every tile: (nt, T², 1).
  local = torch.arange(tile, device=lo.device)
  rows = ty[:, None] * tile + local.repeat_interleave(tile)[None]
  cols = tx[:, None] * tile + local.repeat(tile)[None]
  px = ((2.0 * cols + 1.0) / size - 1.0).to(dtype)[None, ..., None]
  py = (1.0 - (2.0 * rows + 1.0) / size).to(dtype)[None, ..., None]

  def gather(table):  # (B, F, ...) -> (B, nt, 1, C, ...)
    flat = cand_ids.reshape(batch, -1)
    out = torch.gather(
      table, 1, flat.reshape(batch, -1, *([1] * (table.dim() - 2))).expand(-1, -1, *table.shape[2:])
    )
    return out.reshape(batch, *cand_ids.shape[1:], *table.shape[2:])[:, :, None]

  n_c, o_c = gather(normals), gather(offsets)  # (B, nt, 1, C, 3[, 2])
  layered = settings.blend == "layered"
  if layered:
    ol_c = gather(outline)  # (B, nt, 1, C, 3)
  edge_min = None
  outline_min = None
  for i in range(3):
    e = n_c[..., i, 0] * px + n_c[..., i, 1] * py + o_c[..., i]
    edge_min = e if edge_min is None else torch.minimum(edge_min, e)  # (B, nt, T², C)
    if layered:
      o = torch.where(ol_c[..., i], e.abs(), torch.full_like(e, torch.inf))
      outline_min = o if outline_min is None else torch.minimum(outline_min, o)
  w = gather(plane_a) * px + gather(plane_b) * py + gather(plane_c)
  nearness = torch.clamp(w * settings.near, 0.0, 1.0)
  covering = edge_min >= 0
  if layered:
    # Lower bound of the distance to the face's outline edges (inf without any).
    near_outline = torch.maximum(-edge_min, outline_min)
    qualifies = cand_ok[:, :, None, :] & (covering | (near_outline < radius))
    neighbour = 1.0 - near_outline / radius
  else:
    qualifies = cand_ok[:, :, None, :] & (edge_min > -radius)
    neighbour = 1.0 + edge_min / radius
  # Covering faces first, nearest first; then soft neighbours, closest first.
  tiered = torch.where(covering, 2.0 + nearness, neighbour)
  score = torch.where(qualifies, tiered, -torch.inf)
  best, slot = torch.topk(score, k, dim=-1)  # (B, nt, T², K); exact ties improbable
  ids = torch.gather(cand_ids[:, :, None, :].expand(-1, -1, tile * tile, -1), -1, slot)
  ids = torch.where(best > -torch.inf, ids, -1)
  ids = ids.reshape(batch, per_side, per_side, tile, tile, k).permute(0, 1, 3, 2, 4, 5)
  ids = ids.reshape(batch, padded, padded, k)[:, :size, :size]
  return ids, overflow


def _top_k_low_index_ties(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
  """Top k along the last axis with ties going to the lower index (jax.lax.top_k's rule).

  torch.topk leaves the order of ties unspecified, and neighbouring faces often tie on their
  nearest (shared) vertex depth, so a bin would keep other faces than sdsjax. Subtracting
  index·1e-14 in float64 breaks the ties without reordering distinct float32 scores (≥ 0.1
  here, whose spacing is ≥ 7e-9 ≫ 17k·1e-14); a stable sort would do the same, 5× slower.
  """
  index = torch.arange(x.shape[-1], dtype=torch.float64, device=x.device)
  key = x.to(torch.float64) - index * 1e-14
  _, top = torch.topk(key, k, dim=-1)
  return torch.gather(x, -1, top), top


def pixel_centers(size: int, dtype, device=None) -> torch.Tensor:
  """(S·S, 2) NDC (x, y) of pixel centres, row-major; row 0 is the top (y = +1)."""
  coords = (2.0 * torch.arange(size, dtype=dtype, device=device) + 1.0) / size - 1.0
  y, x = torch.meshgrid(-coords, coords, indexing="ij")
  return torch.stack([x, y], -1).reshape(-1, 2)


def _gather_faces(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
  """table (B, F, C) at ids (B, N, K) -> (B, N, K, C).

  index_select on the flattened table: its backward is an index_add, where advanced indexing
  would back-propagate through a much slower sorting index_put.
  """
  batch, num_faces, width = table.shape
  offsets = (torch.arange(batch, device=ids.device) * num_faces).reshape(
    batch, *([1] * (ids.dim() - 1))
  )
  flat = table.reshape(batch * num_faces, width).index_select(0, (ids + offsets).reshape(-1))
  return flat.reshape(*ids.shape, width)


def evaluate(xy, z, outline, ids, pixels, settings: RasterSettings):
  """Pass 2 (differentiable) for ids (B, N, K) at pixels (N, 2).

  One gather of a packed (B, F, 12) table (positions, depths, outline flags), then the
  formulas on (B, N, K) planes.

  Returns (bary (B,N,K,3), depth (B,N,K), coverage (B,N,K), log_coverage (B,N,K),
  opacity (B,N,K), inside (B,N,K), used (B,N,K)).
  """
  dtype = xy.dtype
  used = ids >= 0
  table = torch.cat([xy.reshape(*xy.shape[:2], 6), z, outline.to(dtype)], -1)  # (B, F, 12)
  gathered = _gather_faces(table, torch.clamp(ids, min=0))  # (B, N, K, 12)
  # Empty slots see a harmless canonical triangle so no NaN reaches the gradient.
  canonical = torch.tensor(
    [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=dtype, device=xy.device
  )
  gathered = torch.where(used[..., None], gathered, canonical)
  x0, y0, x1, y1, x2, y2, z0, z1, z2, o0, o1, o2 = gathered.unbind(-1)
  px = pixels[None, :, 0:1]  # (1, N, 1)
  py = pixels[None, :, 1:2]
  area2 = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
  area2 = torch.where(area2.abs() > 1e-12, area2, torch.full_like(area2, 1e-12))
  l0 = ((x1 - px) * (y2 - py) - (y1 - py) * (x2 - px)) / area2
  l1 = ((x2 - px) * (y0 - py) - (y2 - py) * (x0 - px)) / area2
  l2 = ((x0 - px) * (y1 - py) - (y0 - py) * (x1 - px)) / area2
  inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0) & used

  def segment_dist2(ax, ay, bx, by):
    abx, aby = bx - ax, by - ay
    apx, apy = px - ax, py - ay
    t = torch.clamp(
      (apx * abx + apy * aby) / torch.clamp(abx * abx + aby * aby, min=1e-30), 0.0, 1.0
    )
    dx, dy = apx - t * abx, apy - t * aby
    return dx * dx + dy * dy

  edge_dist2 = [
    segment_dist2(x0, y0, x1, y1),
    segment_dist2(x1, y1, x2, y2),
    segment_dist2(x2, y2, x0, y0),
  ]
  dist2 = torch.minimum(torch.minimum(edge_dist2[0], edge_dist2[1]), edge_dist2[2])
  logit = torch.where(inside, dist2, -dist2) / settings.sigma
  zero = torch.zeros((), dtype=dtype, device=xy.device)
  coverage = torch.where(used, torch.sigmoid(logit), zero)
  log_coverage = torch.where(
    used,
    torch.nn.functional.logsigmoid(logit),
    torch.full((), -torch.inf, dtype=dtype, device=xy.device),
  )
  # Opacity: 1 inside, else the fringe of the face's own outline edges.
  outline_dist2 = torch.full_like(dist2, _NO_OUTLINE_DIST2)
  for flag, d2 in zip((o0, o1, o2), edge_dist2):
    outline_dist2 = torch.where(flag > 0.5, torch.minimum(outline_dist2, d2), outline_dist2)
  fringe = torch.where(used, torch.sigmoid(-outline_dist2 / settings.sigma), zero)
  opacity = torch.where(inside, torch.ones((), dtype=dtype, device=xy.device), fringe)
  # Clipped, then perspective-correct barycentrics.
  c0, c1, c2 = torch.clamp(l0, min=0.0), torch.clamp(l1, min=0.0), torch.clamp(l2, min=0.0)
  total = torch.clamp(c0 + c1 + c2, min=1e-12)
  w0, w1, w2 = c0 / (total * z0), c1 / (total * z1), c2 / (total * z2)
  depth = 1.0 / (w0 + w1 + w2)
  bary = torch.stack([w0, w1, w2], -1) * depth[..., None]
  return bary, depth, coverage, log_coverage, opacity, inside, used


def layered_color(colors, depth, opacity, used, settings: RasterSettings):
  """(..., 3) colour of depth layers composited front to back (`sdsjax.raster.layered_color`)."""
  depth = torch.where(used, depth, torch.full_like(depth, _EMPTY_DEPTH))
  order = torch.sort(depth.detach(), dim=-1, stable=True).indices
  depth = torch.gather(depth, -1, order)
  opacity = torch.gather(opacity, -1, order)
  colors = torch.gather(colors, -2, order[..., None].expand(*order.shape, colors.shape[-1]))
  tolerance = settings.depth_tolerance
  width = 0.5 * tolerance
  transmittance = torch.ones_like(opacity[..., 0])  # of the closed layers
  covered = torch.zeros_like(transmittance)  # by the open layer
  start = depth[..., 0]
  color_sum = torch.zeros_like(colors[..., 0, :])
  weight_sum = torch.zeros_like(transmittance)
  for k in range(opacity.shape[-1]):
    u = torch.clamp((tolerance - (depth[..., k] - start)) / width + 0.5, 0.0, 1.0)
    joins = u * u * (3.0 - 2.0 * u)
    transmittance = transmittance * (1.0 - (1.0 - joins) * covered)
    covered = joins * covered
    start = joins * start + (1.0 - joins) * depth[..., k]
    now = torch.maximum(covered, opacity[..., k])
    weight = transmittance * (now - covered)
    color_sum = color_sum + weight[..., None] * colors[..., k, :]
    weight_sum = weight_sum + weight
    covered = now
  return color_sum / (weight_sum + 1e-6)[..., None]


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
  """(B, V, 3) area-weighted unit vertex normals of (B, V, 3) vertices."""
  tri = verts.index_select(1, faces.reshape(-1)).reshape(verts.shape[0], -1, 3, 3)
  weighted = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
  sums = torch.zeros_like(verts).index_add(
    1, faces.reshape(-1), weighted.repeat_interleave(3, dim=1)
  )
  return _normalize(sums, 1e-20)


def render(
  verts: torch.Tensor,
  faces: torch.Tensor,
  cameras: Cameras,
  lights: Lights,
  settings: RasterSettings,
  background=(1.0, 1.0, 1.0),
  albedo=DEFAULT_ALBEDO,
):
  """Soft-rasterizes and shades B views of (B, V, 3) vertices.

  Returns:
    rgb (B, S, S, 3), alpha (B, S, S), overflow (B,).
  """
  dtype = verts.dtype
  size = settings.image_size
  xy, z, valid, outline = project(verts, faces, cameras, settings)
  ids, overflow = select_faces(xy, z, valid, outline, settings)
  batch = verts.shape[0]
  ids = ids.reshape(batch, size * size, -1)
  pixels = pixel_centers(size, dtype, verts.device)
  bary, depth, coverage, log_coverage, opacity, inside, used = evaluate(
    xy, z, outline, ids, pixels, settings
  )

  # Lambertian shading with interpolated smooth normals and a grey albedo.
  normal_table = (
    vertex_normals(verts, faces).index_select(1, faces.reshape(-1)).reshape(batch, -1, 9)
  )  # (B, F, 3 corners · 3)
  corner = _gather_faces(normal_table, torch.clamp(ids, min=0)).reshape(*ids.shape, 3, 3)
  normals = _normalize((bary[..., None] * corner).sum(-2), 1e-20)  # (B, N, K, 3)
  lambert = torch.clamp((normals * lights.direction[:, None, None]).sum(-1, keepdim=True), min=0.0)
  grey = torch.tensor(albedo, dtype=dtype, device=verts.device)
  colors = grey * (
    lights.ambient[:, None, None, None] + lights.diffuse[:, None, None, None] * lambert
  )

  bg = torch.tensor(background, dtype=dtype, device=verts.device)
  if settings.blend == "layered":
    color = layered_color(colors, depth, opacity, used, settings)
    alpha = torch.where(inside.any(-1), torch.ones_like(opacity[..., 0]), opacity.amax(-1))
    rgb = alpha[..., None] * color + (1.0 - alpha[..., None]) * bg
    return (rgb.reshape(batch, size, size, 3), alpha.reshape(batch, size, size), overflow)
  # SoftRas softmax over depth in log space, then alpha compositing over the background.
  z_n = torch.clamp((settings.far - depth) / (settings.far - settings.near), 0.0, 1.0)
  logits = torch.where(
    used,
    log_coverage + z_n / settings.gamma,
    torch.full((), -torch.inf, dtype=dtype, device=verts.device),
  )
  bg_logit = settings.eps / settings.gamma
  shift = torch.clamp(logits.amax(-1, keepdim=True), min=bg_logit).detach()
  w = torch.exp(logits - shift)
  w_bg = torch.exp(bg_logit - shift)
  soft = ((w[..., None] * colors).sum(-2) + w_bg * bg) / (w.sum(-1, keepdim=True) + w_bg)
  if settings.alpha_rule == "product":
    alpha = 1.0 - torch.prod(1.0 - coverage, -1)
  else:
    alpha = torch.clamp(coverage.sum(-1), max=1.0)
  rgb = alpha[..., None] * soft + (1.0 - alpha[..., None]) * bg
  return (rgb.reshape(batch, size, size, 3), alpha.reshape(batch, size, size), overflow)
