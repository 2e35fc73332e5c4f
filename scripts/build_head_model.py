"""Builds the builtin head, `sdsjax/data/head_model.npz`, from analytic shapes.

Deterministic (no randomness): running it twice writes the same arrays.

    python scripts/build_head_model.py [--out sdsjax/data/head_model.npz]

Construction (units: 1 ≈ 10 cm, +y up, face towards +z, ear canals near y = 0):

1. A *base surface*: every column at azimuth θ (0 = face, +x to the model's left) has a
   profile curve from the top pole down to the bottom of the neck, spline-interpolated
   through 13 control points. Each control point's radius at θ comes from a
   superellipse through the front, side and back key profiles below, so horizontal
   sections are rounded boxes that are flatter at the face.
2. *Features* are smooth displacements of that surface: the orbits, brow ridge, nose,
   chin, cheekbones and ears (height fields on the side of the head).
3. *Sampling*: each column is resampled by weighted arc length of the final profile, with
   more rows over the face, and columns are denser around the face and ears.
4. *Patches* replace three rectangles of that grid: each eye and the mouth. Inside a patch
   the columns get finer rows of their own, laid out as eyelids or lips, and a *slit*
   (the palpebral fissure, the mouth line) opens into a *pouch*: a closed pocket behind
   it (the conjunctival sac around the eyeball, the vestibule behind the upper lip), so
   the head surface stays closed (only the neck is open) and never shows its inside.
5. *Eyeballs*: one closed sphere per eye inside its pouch, with its own texture square.
6. *Identity components*: 50 named displacement fields of position, each localised by
   smooth windows, replaced around each eye by their affine part there (so eyeball, pouch
   and lid margins move as one) and scaled so weight ±1 moves the most affected vertex by
   the listed amplitude, or less where the surface would strain by more than 12 %. They
   are not orthogonalised (see `build_basis`).
7. *Expression components*: 14 named fields that may also use which side of a slit a
   vertex is on (lips and lids part there).
8. Normalisation to the world frame of docs/design.md (bounding-box centre at 0, bounding
   radius 1), applied to mean and bases alike; the bases are stored as float16.

tests/test_builtin_head.py checks the result, in particular that no combination in the
ranges it samples makes the mesh intersect itself.

The layout of the file is documented in docs/head_model.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from scipy.interpolate import CubicSpline

NUM_COLUMNS = 120  # vertices around the head
NUM_ROWS = 78  # rings from the top pole (row 0) to the bottom of the neck
DENSE = 1200  # samples per column before resampling

# Key profiles: (radius from the vertical axis, height) per control point, top to bottom.
# Points: pole, crown, upper cranium, forehead, brow, eyes/ears, nose base, mouth, chin,
# under the jaw, top of the neck, neck, bottom of the neck.
FRONT = np.array(
  [
    (0.00, 1.30),
    (0.45, 1.24),
    (0.78, 1.03),
    (0.95, 0.66),
    (1.00, 0.30),
    (0.92, 0.03),
    (0.95, -0.28),
    (0.96, -0.55),
    (0.91, -0.86),
    (0.70, -1.05),
    (0.45, -1.17),
    (0.43, -1.45),
    (0.45, -1.85),
  ]
)
SIDE = np.array(
  [
    (0.00, 1.30),
    (0.42, 1.23),
    (0.67, 1.01),
    (0.77, 0.66),
    (0.78, 0.30),
    (0.77, 0.00),
    (0.73, -0.30),
    (0.67, -0.57),
    (0.61, -0.80),
    (0.56, -0.93),
    (0.52, -1.06),
    (0.52, -1.45),
    (0.54, -1.85),
  ]
)
BACK = np.array(
  [
    (0.00, 1.30),
    (0.50, 1.23),
    (0.86, 1.01),
    (1.02, 0.62),
    (1.05, 0.26),
    (0.98, -0.05),
    (0.85, -0.30),
    (0.75, -0.50),
    (0.70, -0.70),
    (0.68, -0.90),
    (0.67, -1.10),
    (0.67, -1.45),
    (0.68, -1.85),
  ]
)
# Superellipse exponents per control point: >2 is boxier (flatter face), 2 is an ellipse.
FRONT_EXPONENT = np.array([2.0, 2.1, 2.2, 2.4, 2.6, 2.7, 2.6, 2.5, 2.3, 2.1, 2.0, 2.0, 2.0])
BACK_EXPONENT = np.array([2.0, 2.0, 2.1, 2.2, 2.2, 2.2, 2.1, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])

# Eyes (the model's left eye, +x; the right one mirrors it). The eyeball sits in a pouch
# of radius SOCKET_RADIUS; the lid margins lie on that sphere.
EYE_CENTRE = np.array([0.315, 0.115, 0.735])
EYEBALL_RADIUS = 0.118
SOCKET_RADIUS = 0.133
CANTHUS_MEDIAL = 0.122  # distances of the column planes through the slit's ends from the eye
CANTHUS_LATERAL = 0.106  # centre (so the fissure is centred on the pupil)
LID_UPPER = 0.052  # margin heights above / below the eye centre at the middle of the slit
LID_LOWER = 0.040
CANTHAL_TILT = 0.012  # the lateral canthus is this much higher than the medial one
# Mouth: the mouth line (stomion) height and the commissures' half width.
MOUTH_Y = -0.47
MOUTH_HALF_WIDTH = 0.215  # the commissures are at the last grid column within this |x|
# Texture atlas (u, v in [0, 1]): the head grid and its patches above V_HEAD, islands below.
V_HEAD = 0.2
EYEBALL_SQUARES = ((0.0, 0.0, 0.2), (0.2, 0.0, 0.2))  # (u0, v0, size): left, right
MOUTH_POUCH_BOX = (0.4, 0.0, 0.4, 0.2)  # (u0, v0, width, height)
EYE_POUCH_BOXES = ((0.8, 0.0, 0.1, 0.1), (0.9, 0.0, 0.1, 0.1))


# ----------------------------------------------------------------------------------------
# Small field helpers. Points are (..., 3) arrays.


def gauss(p, centre, sigma):
  """Anisotropic Gaussian window exp(-|(p - centre) / sigma|² / 2)."""
  d = (p - np.asarray(centre, np.float64)) / np.asarray(sigma, np.float64)
  return np.exp(-0.5 * np.sum(d * d, axis=-1))


def gauss_pair(p, centre, sigma):
  """Sum of a window and its mirror image in x (a left/right symmetric window)."""
  mirrored = np.asarray(centre, np.float64) * np.array([-1.0, 1.0, 1.0])
  return gauss(p, centre, sigma) + gauss(p, mirrored, sigma)


def smoothstep(edge0, edge1, x):
  t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def softplus(x, width):
  """Smooth max(x, 0) that bends over about `width`."""
  return width * np.logaddexp(0.0, x / width)


def smooth_max(a, b, width):
  """max(a, b) with the corner rounded over about `width` (within width/2 of max)."""
  return b + softplus(a - b, width)


def horizontal_normal(p):
  """(..., 3) unit vectors pointing away from the vertical axis."""
  h = p * np.array([1.0, 0.0, 1.0])
  return h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-9)


def facing_front(p):
  """1 where the surface faces the front (+z), fading to 0 at the sides (and at the
  vertical axis, where the horizontal direction is undefined)."""
  h = p * np.array([1.0, 0.0, 1.0])
  cos = h[..., 2] / np.sqrt(np.sum(h * h, axis=-1) + 0.05**2)
  return smoothstep(0.15, 0.55, cos)


def vec(x=0.0, y=0.0, z=0.0):
  return np.array([x, y, z], np.float64)


def unit(v):
  return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def mirror(p):
  """Mirror image in x (the model's left <-> right)."""
  return np.asarray(p) * np.array([-1.0, 1.0, 1.0])


def resample(curve, count, weight=None):
  """`count` points along a polyline (N, D), spaced by (weighted) arc length.

  Args:
    curve: (N, D) dense polyline.
    count: number of output points; the first and last are the polyline's ends.
    weight: optional (N,) sampling density (higher: denser); default uniform.

  Returns:
    (count, D) points and their (count,) arc-length fractions in [0, 1].
  """
  seg = np.linalg.norm(np.diff(curve, axis=0), axis=-1)
  w = np.ones(len(curve)) if weight is None else np.asarray(weight, np.float64)
  arc = np.concatenate([[0.0], np.cumsum(seg * 0.5 * (w[1:] + w[:-1]))])
  plain = np.concatenate([[0.0], np.cumsum(seg)])
  target = np.linspace(0.0, arc[-1], count)
  out = np.stack([np.interp(target, arc, curve[:, k]) for k in range(curve.shape[1])], -1)
  return out, np.interp(target, arc, plain) / plain[-1]


# ----------------------------------------------------------------------------------------
# Mean shape: base surface and features.

KNOTS = np.linspace(0.0, 1.0, FRONT.shape[0])


def _cardinal(t, pole_slope):
  """(..., M) weights of the 13 control values in the profile spline at parameters t.

  The spline is linear in its control values, so evaluating it on the identity matrix
  gives per-control weights; `pole_slope` clamps the slope at the pole to the first
  segment's (so the top of the head is smooth), otherwise the slope there is 0.
  """
  m = FRONT.shape[0]
  bc = np.zeros(m)
  if pole_slope:
    bc[1] = 1.0 / KNOTS[1]
  spline = CubicSpline(KNOTS, np.eye(m), axis=0, bc_type=((1, bc), "not-a-knot"))
  return spline(np.ravel(t)).reshape(*np.shape(t), m)


def base_point(theta, t):
  """Base surface before features at azimuths θ and profile parameters t (broadcast).

  θ is in radians, 0 at the face, increasing towards +x; t ∈ [0, 1] runs from the top
  pole (0) to the bottom of the neck (1). Returns (..., 3) points.
  """
  theta, t = np.broadcast_arrays(np.asarray(theta, np.float64), np.asarray(t, np.float64))
  s, c = np.abs(np.sin(theta))[..., None], np.cos(theta)[..., None]
  front = c >= 0
  other = np.where(front[..., None], FRONT, BACK)
  exponent = np.where(front, FRONT_EXPONENT, BACK_EXPONENT)
  r_side, r_other = np.maximum(SIDE[:, 0], 1e-6), np.maximum(other[..., 0], 1e-6)
  radius = ((s / r_side) ** exponent + (np.abs(c) / r_other) ** exponent) ** (-1 / exponent)
  radius[..., 0] = 0.0
  height = SIDE[:, 1] + (other[..., 1] - SIDE[:, 1]) * c**2
  r = np.sum(_cardinal(t, True) * radius, -1)
  h = np.sum(_cardinal(t, False) * height, -1)
  return np.stack([r * np.sin(theta), h, r * np.cos(theta)], -1)


def ear_height(p):
  """Height of the ear above the side of the head (≥ 0), a field on (..., 3) points.

  In ear coordinates tilted back by 15°: an egg-shaped outline (narrower at the lobe), a
  shell that rises from the attachment at the front to the back edge, a helix rim around
  the top and back, the concha bowl and the tragus in front of it.
  """
  tilt = np.deg2rad(15.0)
  dz, dy = p[..., 2] + 0.10, p[..., 1] + 0.03
  along = (dy * np.cos(tilt) - dz * np.sin(tilt)) / 0.30  # -1 lobe .. 1 top
  across = (dz * np.cos(tilt) + dy * np.sin(tilt)) / (0.17 * (0.8 + 0.2 * np.clip(along, -1, 1)))
  e = np.sqrt(along**2 + across**2)
  mask = 1.0 - smoothstep(0.55, 1.0, e)
  shell = 0.3 + 0.7 * np.clip(0.5 - 0.5 * across, 0.0, 1.0) ** 0.8
  rim = smoothstep(-0.8, 0.4, along - across) * np.exp(-0.5 * ((e - 0.72) / 0.14) ** 2)
  concha = np.exp(-0.5 * (((along + 0.15) / 0.30) ** 2 + ((across - 0.2) / 0.38) ** 2))
  tragus = np.exp(-0.5 * (((along + 0.2) / 0.15) ** 2 + ((across - 0.8) / 0.15) ** 2))
  height = shell + 0.3 * rim - 0.55 * concha + 0.2 * tragus
  lateral = smoothstep(0.55, 0.70, np.abs(p[..., 0]))  # only on the sides
  return 0.25 * mask * np.clip(height, 0.0, None) * lateral


def feature_displacement(p):
  """Facial features as displacements of the base surface; p is (..., 3).

  The eyelids and lips are not here: the eye and mouth patches lay them out.
  """
  front = facing_front(p)
  out = np.zeros_like(p)
  # Orbits (shallow hollows the eyelid patches sit in) and the brow ridge above them.
  orbit = gauss_pair(p, vec(EYE_CENTRE[0], EYE_CENTRE[1] + 0.01, 0.0), (0.15, 0.10, 10.0))
  brow = gauss_pair(p, vec(0.30, 0.27, 0.0), (0.20, 0.05, 10.0))
  out[..., 2] += front * (-0.05 * orbit + 0.04 * brow)
  # Nose: a ridge from the nasion to a rounded tip, with nostril wings beside it.
  x, y = p[..., 0], p[..., 1]
  u = np.clip((0.16 - y) / 0.33, 0.0, 1.0)  # 0 at the nasion, 1 at the tip
  ridge = (0.05 + 0.15 * u) * np.exp(-0.5 * (x / (0.07 + 0.04 * u)) ** 2)
  ridge *= np.exp(-0.5 * (np.maximum(y - 0.16, 0.0) / 0.05) ** 2)
  ridge *= np.exp(-0.5 * (np.maximum(-0.15 - y, 0.0) / 0.04) ** 2)
  tip = 0.23 * gauss(p, vec(0.0, -0.16, 0.0), (0.075, 0.065, 10.0))
  nose = (ridge**4 + tip**4) ** 0.25  # smooth maximum
  alae = gauss_pair(p, vec(0.115, -0.20, 0.0), (0.05, 0.045, 10.0))
  out[..., 2] += front * (nose + 0.085 * alae)
  # The muzzle in front of the teeth, the mentolabial sulcus and the chin.
  muzzle = gauss(p, vec(0.0, -0.47, 0.0), (0.20, 0.11, 10.0))
  sulcus = gauss(p, vec(0.0, -0.66, 0.0), (0.15, 0.04, 10.0))
  chin = gauss(p, vec(0.0, -0.84, 0.0), (0.16, 0.08, 10.0))
  out[..., 2] += front * (0.02 * muzzle - 0.02 * sulcus + 0.05 * chin)
  # Cheekbones.
  cheek = gauss_pair(p, vec(0.50, -0.02, 0.0), (0.13, 0.09, 10.0))
  outward = horizontal_normal(p)
  out += 0.035 * cheek[..., None] * outward * smoothstep(-0.1, 0.3, outward[..., 2:3])
  # Ears.
  out += ear_height(p)[..., None] * horizontal_normal(p)
  return out


def surface_point(theta, t):
  """The head surface (base + features) at (θ, t), broadcast; (..., 3)."""
  b = base_point(theta, t)
  return b + feature_displacement(b)


def column_azimuths():
  """(C,) column azimuths, denser over the face (eyes, mouth) and the ears; θ[0] = -π."""
  fine = np.linspace(-np.pi, np.pi, 4097)
  density = (
    0.7
    + 1.6 * np.exp(-0.5 * (fine / 0.6) ** 2)
    + 0.9 * np.exp(-0.5 * ((np.abs(fine) - 1.72) / 0.22) ** 2)
  )
  cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]))])
  cdf /= cdf[-1]
  theta = np.interp(np.arange(NUM_COLUMNS) / NUM_COLUMNS, cdf, fine)
  # Exactly mirror-symmetric: column j and C - j are mirror images (column C/2 is θ = 0).
  theta[1:] = 0.5 * (theta[1:] - theta[1:][::-1])
  theta[0] = -np.pi
  return theta


def sample_grid():
  """The main grid: points (C, R, 3), azimuths (C,) and profile parameters (C, R).

  Row 0 is the top pole (every column's row 0 is the same point).
  """
  theta = column_azimuths()
  t = np.linspace(0.0, 1.0, DENSE)
  dense = surface_point(theta[:, None], t[None])  # (C, S, 3)
  # Resample each column by arc length weighted towards the face rows.
  seg = np.linalg.norm(np.diff(dense, axis=1), axis=-1)
  mid_y = 0.5 * (dense[:, 1:, 1] + dense[:, :-1, 1])
  weight = 1.0 + 1.1 * np.exp(-0.5 * ((mid_y + 0.25) / 0.45) ** 2)
  weight *= 1.0 - 0.35 * smoothstep(-1.15, -1.5, mid_y)  # sparser neck
  arc = np.concatenate([np.zeros((NUM_COLUMNS, 1)), np.cumsum(seg * weight, 1)], 1)
  params = np.stack(
    [np.interp(np.linspace(0.0, arc[j, -1], NUM_ROWS), arc[j], t) for j in range(NUM_COLUMNS)]
  )
  half = NUM_COLUMNS // 2  # mirror the parameters too, so the grid is exactly symmetric
  params[half + 1 :] = params[1:half][::-1]
  params[:, 0] = 0.0
  grid = surface_point(theta[:, None], params)
  grid[:, 0] = grid[:, 0].mean(0)
  return grid, theta, params


# ----------------------------------------------------------------------------------------
# Patches: columns c0..c1 and rows r0..r1 of the grid, the side columns and the top and
# bottom rows kept; the interior columns get `n` local rows each (row 0 = grid row r0,
# row n-1 = grid row r1). The slit sits between local rows `slit_row` and `slit_row + 1`
# for columns ja..jb; the pouch is rings of vertices attached to the slit loop.


@dataclasses.dataclass
class Patch:
  """One patch of the head surface (see above); positions in raw units."""

  name: str
  c0: int
  c1: int
  r0: int
  r1: int
  local: dict  # column -> (n, 3) positions of its local rows
  frac: dict  # column -> (n,) texture v fraction of each local row (0 at r0, 1 at r1)
  slit_row: int
  ja: int
  jb: int
  pouch_upper: np.ndarray  # (K, jb - ja + 1, 3) rings 1..K over the slit's upper edge
  pouch_lower: np.ndarray  # (K, jb - ja + 1, 3) rings 1..K over the slit's lower edge
  pole: np.ndarray | None  # (3,) the pouch's closing vertex, or None: zipped shut
  uv_box: tuple  # (u0, v0, width, height) of the pouch's texture island
  pouch_fraction: tuple  # K values in (0, 1]: how far up the pouch each ring is


def column_frame(theta):
  """In-plane axes of the column plane at azimuth θ: horizontal (3,) and the normal (3,)."""
  return vec(np.sin(theta), 0.0, np.cos(theta)), vec(np.cos(theta), 0.0, -np.sin(theta))


def dense_column(theta, t0, t1, count=600):
  """(count, 3) points of the surface along one column between parameters t0 and t1."""
  return surface_point(theta, np.linspace(t0, t1, count))


def polar_in_plane(points, centre, theta):
  """Elevation and radius of points about `centre` projected into a column plane."""
  hor, _ = column_frame(theta)
  d = points - centre
  h, y = d @ hor, d[..., 1]
  return np.arctan2(y, h), np.hypot(h, y)


def canthi(theta):
  """The left eye's slit columns: (ja, jb) and their planes' distances from the eye
  centre (medial > 0 > lateral), for column azimuths θ (C,)."""
  dist = EYE_CENTRE[0] * np.cos(theta) - EYE_CENTRE[2] * np.sin(theta)
  cols = np.arange(len(theta))
  front = (np.abs(theta) < 1.2) & (theta > 0)
  ja = cols[front & (dist <= CANTHUS_MEDIAL)].min()  # medial canthus (towards the nose)
  jb = cols[front & (dist >= -CANTHUS_LATERAL)].max()  # lateral canthus
  return ja, jb, dist[ja], dist[jb]


def eye_patch(grid, theta, params):
  """The left eye's patch: eyelids, the fissure (slit) and the conjunctival pouch.

  Each patch column is laid out in polar form about the eye centre projected into the
  column's plane: the lids are the smooth maximum of the skin and a shell (the socket
  sphere plus the lid's thickness, which closes to 0 at the margins), so no lid vertex is
  inside the socket; the margins lie on the socket sphere.
  """
  c = EYE_CENTRE
  # Columns: the plane at azimuth θ passes d⊥ = c·n from the eye centre (> 0 medially).
  dist = np.array([c @ column_frame(th)[1] for th in theta])
  ja, jb, _, _ = canthi(theta)
  c0, c1 = ja - 3, jb + 3
  mid = (ja + jb) // 2
  r0 = int(np.argmin(np.abs(grid[mid, :, 1] - 0.34)))
  r1 = int(np.argmin(np.abs(grid[mid, :, 1] + 0.08)))
  n_upper, n_lower = 13, 11
  slit_row = n_upper - 1
  med, lat = dist[ja], dist[jb]
  local, frac, uppers, lowers = {}, {}, [], []
  up_dir = vec(y=1)
  for j in range(c0 + 1, c1):
    hor, normal = column_frame(theta[j])
    d_perp = dist[j]
    r_plane = np.sqrt(max(SOCKET_RADIUS**2 - d_perp**2, 0.0))  # socket circle in plane
    centre = c - d_perp * normal  # the eye centre projected into the column plane
    # Position along the fissure: a = -1 at the medial canthus, +1 at the lateral one.
    a = (med + lat - 2.0 * d_perp) / (med - lat)
    a_clip = np.clip(a, -1.0, 1.0)
    inside = ja <= j <= jb
    beyond = max(abs(a) - 1.0, 0.0)  # distance past a canthus in fissure half-widths
    # Skin along the column between the patch's top and bottom rows, in polar form.
    skin = dense_column(theta[j], params[j, r0], params[j, r1])
    skin[0], skin[-1] = grid[j, r0], grid[j, r1]
    elev, rad = polar_in_plane(skin, centre, theta[j])
    order = np.argsort(elev)
    skin_rad = lambda e, elev=elev[order], rad=rad[order]: np.interp(e, elev, rad)
    # Margin heights above the eye centre (beyond the canthi: the canthal line, whose two
    # rows part with the distance from the canthus).
    shape = (1.0 - a_clip**2) ** 0.85
    y_mid = CANTHAL_TILT * 0.5 * (a_clip + 1.0) - 0.006
    gap = 0.002 + 0.08 * beyond
    y_up = y_mid + (LID_UPPER * shape * (1.0 - 0.15 * a_clip) if inside else 0.0) + gap
    y_lo = y_mid - (LID_LOWER * shape * (1.0 + 0.2 * a_clip) if inside else 0.0) - gap
    if inside:
      eps_up = np.arcsin(np.clip(y_up / r_plane, -1, 1))
      eps_lo = np.arcsin(np.clip(y_lo / r_plane, -1, 1))
    else:  # where the skin's height is y_up / y_lo
      heights = skin[:, 1] - c[1]
      eps_up = np.interp(y_up, heights[::-1], elev[::-1])
      eps_lo = np.interp(y_lo, heights[::-1], elev[::-1])
    fade = np.exp(-0.5 * (beyond / 0.6) ** 2)  # the lid's pull fades past the canthi

    def profile(e_outer, e_margin, count, lid, j=j, hor=hor, centre=centre, d=d_perp):
      """Polar profile from the patch's outer row to the margin (or canthal line)."""
      es = np.linspace(e_outer, e_margin, 400)
      near = np.abs(es - e_margin)
      skin_r = skin_rad(es)
      # The lid hugs a shell over the eyeball near the margin (thickness closing to 0 at
      # the margin) and blends into the skin away from it.
      thickness = lid * (1.0 - np.exp(-near / 0.12)) * fade + (1.0 - fade) * lid
      reach = (SOCKET_RADIUS + thickness) ** 2 - d**2
      shell = np.sqrt(np.maximum(reach, 1e-8))
      pull = np.exp(-0.5 * (near / 0.22) ** 2) * fade * smoothstep(0.0, 0.004, reach)
      pull *= smoothstep(0.0, 0.15, np.abs(es - e_outer))  # exactly the skin at the outer row
      r = skin_r + pull * (shell - skin_r)
      # Never inside the socket, except the margins that lie on it.
      floor_t = 0.004 * (1.0 - fade * np.exp(-near / 0.05))
      floor = np.sqrt(np.maximum((SOCKET_RADIUS + floor_t) ** 2 - d**2, 0.0))
      r = smooth_max(r, floor, 0.004)
      r = np.where(floor > 0, r, skin_r)
      pts = centre + r[:, None] * (np.cos(es)[:, None] * hor + np.sin(es)[:, None] * up_dir)
      density = 1.0 + 2.0 * np.exp(-0.5 * (near / 0.3) ** 2)
      return resample(pts, count, density)[0]

    up = profile(elev[0], eps_up, n_upper, 0.018)  # skin runs top down: elev[0] is the top
    lo = profile(elev[-1], eps_lo, n_lower, 0.014)[::-1]
    if inside:  # the margins lie on the socket sphere
      up[-1] = centre + r_plane * (np.cos(eps_up) * hor + np.sin(eps_up) * up_dir)
      lo[0] = centre + r_plane * (np.cos(eps_lo) * hor + np.sin(eps_lo) * up_dir)
      uppers.append(up[-1])
      lowers.append(lo[0])
    up[0], lo[-1] = grid[j, r0], grid[j, r1]
    pts = np.concatenate([up, lo])
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=-1)
    seg[n_upper - 1] = max(seg[n_upper - 1], 0.01)  # room for the fissure in the texture
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    local[j], frac[j] = pts, arc / arc[-1]
  # Pouch: each slit vertex walks back over the socket sphere (a great circle) to the
  # back pole; vertices sit 1 % out so the faces between them clear the eyeball.
  num_rings = 9
  back = vec(z=-1)

  def walk(start):
    d0 = unit(np.asarray(start) - c)
    omega = np.arccos(np.clip(d0 @ back, -1.0, 1.0))[:, None]
    rings = []
    for k in range(1, num_rings + 1):
      s = k / (num_rings + 1)
      d = (np.sin((1 - s) * omega) * d0 + np.sin(s * omega) * back) / np.sin(omega)
      rings.append(c + 1.01 * SOCKET_RADIUS * d)
    return np.stack(rings)

  return Patch(
    "eye_left",
    c0,
    c1,
    r0,
    r1,
    local,
    frac,
    slit_row,
    ja,
    jb,
    walk(uppers),
    walk(lowers),
    c + SOCKET_RADIUS * back,
    EYE_POUCH_BOXES[0],
    tuple((np.arange(1, num_rings + 1) / num_rings).tolist()),
  )


def mirror_patch(patch, name, uv_box):
  """The patch's mirror image (x -> -x) on the mirrored columns j -> C - j."""
  flip = lambda j: NUM_COLUMNS - j
  return Patch(
    name,
    flip(patch.c1),
    flip(patch.c0),
    patch.r0,
    patch.r1,
    {flip(j): mirror(v) for j, v in patch.local.items()},
    {flip(j): v for j, v in patch.frac.items()},
    patch.slit_row,
    flip(patch.jb),
    flip(patch.ja),
    mirror(patch.pouch_upper[:, ::-1]),
    mirror(patch.pouch_lower[:, ::-1]),
    None if patch.pole is None else mirror(patch.pole),
    uv_box,
    patch.pouch_fraction,
  )


def mouth_patch(grid, theta, params):
  """The mouth's patch: lips, the mouth line (slit) and the vestibule pouch behind it.

  The upper lip ends in a rounded edge (the flap) whose back face drops into the pouch;
  the lower lip's top sits behind that edge and its front comes forward below it along a
  slope, so that opening the jaw (lower lip down) or closing it further (up and back) slides
  the lips past each other instead of through each other.
  """
  half = NUM_COLUMNS // 2
  xs = grid[:, :, 0]
  mid_row = int(np.argmin(np.abs(grid[half, :, 1] - MOUTH_Y)))
  x_mouth = xs[:, mid_row]
  cols = np.arange(NUM_COLUMNS)
  front = np.abs(theta) < 1.0
  jb = cols[front & (x_mouth <= MOUTH_HALF_WIDTH + 1e-9)].max()
  ja = NUM_COLUMNS - jb
  c0, c1 = ja - 3, jb + 3
  r0 = int(np.argmin(np.abs(grid[half, :, 1] + 0.30)))
  r1 = int(np.argmin(np.abs(grid[half, :, 1] + 0.71)))
  n_upper, n_lower = 17, 17
  slit_row = n_upper - 1
  width = x_mouth[jb]
  local, frac, uppers, lowers, taper = {}, {}, [], [], []
  for j in range(c0 + 1, c1):
    hor, _ = column_frame(theta[j])
    skin = dense_column(theta[j], params[j, r0], params[j, r1], 800)
    skin[0], skin[-1] = grid[j, r0], grid[j, r1]
    hs, ys = skin @ hor, skin[:, 1]
    order = np.argsort(ys)
    skin_h = lambda y, ys=ys[order], hs=hs[order]: np.interp(y, ys, hs)
    x = x_mouth[j]
    inside = ja <= j <= jb
    q = np.sqrt(np.clip(1.0 - (x / width) ** 2, 0.0, 1.0))  # 1 mid-mouth, 0 at corners
    q_lip = np.clip(1.0 - (x / width) ** 2, 0.0, 1.0) ** 1.3  # the lips' fullness tapers
    beyond = max(abs(x) - width, 0.0)
    y_top, y_bot = ys[0], ys[-1]
    # Lip shapes (forward bulges in the column plane): the upper lip leans forward down to
    # its vermilion border (a small roll), the lower lip is a rounded cushion.
    y_f = MOUTH_Y + 0.004 * (1.0 - q)  # flap bottom (mouth line)
    upper_lip = lambda y, q=q_lip: (
      q
      * (
        0.022 * smoothstep(MOUTH_Y + 0.16, MOUTH_Y + 0.035, y)
        + 0.005 * np.exp(-0.5 * ((y - MOUTH_Y - 0.038) / 0.010) ** 2)
      )
    )
    lower_lip = lambda y, q=q_lip: q * 0.026 * np.exp(-0.5 * ((y - MOUTH_Y + 0.065) / 0.042) ** 2)
    thick = 0.004 + 0.020 * q  # flap thickness
    gap = 0.002 + 0.016 * q  # vestibule gap between the flap's back and the lower lip
    rise = 0.005 + 0.008 * q  # the curl's height above the flap bottom
    if inside:
      # Upper part: skin and upper lip down to the curl, then around the flap's edge.
      y1 = y_f + rise
      ys_a = np.linspace(y_top, y1, 300)
      a_pts = np.stack([skin_h(ys_a) + upper_lip(ys_a), ys_a], -1)
      h1 = a_pts[-1, 0]
      ang = np.linspace(0.0, np.pi, 60)[1:]
      curl = np.stack([h1 - 0.5 * thick + 0.5 * thick * np.cos(ang), y1 - rise * np.sin(ang)], -1)
      up_curve = np.concatenate([a_pts, curl])
      h_fw = h1 - thick
      # Lower part: down the back wall behind the flap, forward along the contact slope,
      # then the lower lip's front.
      h_bw = h_fw - gap
      ys_b = np.linspace(y1, y_bot, 500)
      slope = 0.28 + 0.7 * (1.0 - q) ** 2
      contact = h_bw + slope * np.clip(y_f - ys_b, 0.0, None)
      lip_front = skin_h(ys_b) + lower_lip(ys_b)
      h_b = -smooth_max(-contact, -lip_front, 0.006)  # smooth min: behind both
      h_b = np.where(ys_b > y_f, h_bw, h_b)
      lo_curve = np.stack([h_b, ys_b], -1)
    else:
      sep = 0.003 + 0.25 * beyond
      ys_a = np.linspace(y_top, MOUTH_Y + sep, 300)
      up_curve = np.stack([skin_h(ys_a), ys_a], -1)
      ys_b = np.linspace(MOUTH_Y - sep, y_bot, 500)
      lo_curve = np.stack([skin_h(ys_b), ys_b], -1)

    def to_3d(curve, j=j, hor=hor):
      # Back from (h, y) in the column plane to 3D.
      return curve[:, :1] * hor[None] + curve[:, 1:2] * vec(y=1)[None]

    dens_up = 1.0 + 3.0 * np.exp(-0.5 * ((up_curve[:, 1] - MOUTH_Y) / 0.05) ** 2)
    dens_lo = 1.0 + 3.0 * np.exp(-0.5 * ((lo_curve[:, 1] - MOUTH_Y) / 0.05) ** 2)
    up, _ = resample(to_3d(up_curve), n_upper, dens_up)
    lo, _ = resample(to_3d(lo_curve), n_lower, dens_lo)
    up[0], lo[-1] = grid[j, r0], grid[j, r1]
    pts = np.concatenate([up, lo])
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=-1)
    seg[n_upper - 1] = max(seg[n_upper - 1], 0.006)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    local[j], frac[j] = pts, arc / arc[-1]
    if inside:
      uppers.append(up[-1])
      lowers.append(lo[0])
      taper.append(q)
  uppers, lowers, taper = np.array(uppers), np.array(lowers), np.array(taper)
  # Pouch: both walls rise behind the upper lip and lean back a little; at the corners it
  # is shallow and recedes into the head.
  num_rings = 7
  height = 0.022 + 0.10 * taper
  rings_u, rings_l = [], []
  for k in range(1, num_rings + 1):
    s = k / num_rings
    lift = height * (1.0 - (1.0 - s) ** 1.5)
    # The walls slide past each other when the lips part, so they lean back only a little
    # (by less than their gap over the slide).
    recede = 0.016 * s + 0.002 * s * (1.0 - taper)
    offset = np.stack([np.zeros_like(lift), lift, -recede], -1)
    rings_u.append(uppers + offset)
    rings_l.append(lowers + offset)
  return Patch(
    "mouth",
    c0,
    c1,
    r0,
    r1,
    local,
    frac,
    slit_row,
    ja,
    jb,
    np.stack(rings_u),
    np.stack(rings_l),
    None,
    MOUTH_POUCH_BOX,
    tuple(1.0 - (1.0 - np.arange(1, num_rings + 1) / num_rings) ** 1.5),
  )


def eyeball(centre, uv_square, rings=16, segments=28):
  """A closed UV sphere (front pole on +z) and its polar texture layout.

  The texture square shows the eye as seen from the front: the front pole (the pupil) at
  its centre, the front hemisphere within 0.4 of the square's size, the back hemisphere in
  the outer rim.

  Returns:
    verts (V, 3), faces (F, 3), uvs (T, 2), uv_faces (F, 3).
  """
  polar = np.pi * (np.arange(1, rings + 1) / (rings + 1)) ** 1.2  # denser at the front
  lon = 2 * np.pi * np.arange(segments) / segments
  ring = np.stack(
    [
      np.sin(polar)[:, None] * np.cos(lon),
      np.sin(polar)[:, None] * np.sin(lon),
      np.cos(polar)[:, None] * np.ones_like(lon),
    ],
    -1,
  ).reshape(-1, 3)
  unit_verts = np.concatenate([vec(z=1)[None], ring, vec(z=-1)[None]])
  verts = centre + EYEBALL_RADIUS * unit_verts
  rid = lambda k, m: 1 + k * segments + m % segments
  back = 1 + rings * segments
  faces = [(0, rid(0, m), rid(0, m + 1)) for m in range(segments)]
  for k in range(rings - 1):
    for m in range(segments):
      a, b, c, d = rid(k, m), rid(k, m + 1), rid(k + 1, m), rid(k + 1, m + 1)
      faces += [(b, a, c), (b, c, d)]
  faces += [(rid(rings - 1, m + 1), rid(rings - 1, m), back) for m in range(segments)]
  # Texture: radius 0.4 at the equator, 0.5 at the back pole (one uv per back face).
  u0, v0, size = uv_square
  radius = lambda g: np.where(
    g <= np.pi / 2, 0.4 * g / (np.pi / 2), 0.4 + 0.1 * (g - np.pi / 2) / (np.pi / 2)
  )
  ang = np.arctan2(unit_verts[:, 1], unit_verts[:, 0])
  g = np.arccos(np.clip(unit_verts[:, 2], -1, 1))
  uvs = np.stack([0.5 + radius(g) * np.cos(ang), 0.5 + radius(g) * np.sin(ang)], -1)
  mid = 2 * np.pi * (np.arange(segments) + 0.5) / segments
  back_uvs = np.stack([0.5 + 0.5 * np.cos(mid), 0.5 + 0.5 * np.sin(mid)], -1)
  uvs = np.concatenate([uvs, back_uvs]) * size + np.array([u0, v0])
  uv_faces = [list(f) for f in faces]
  for m in range(segments):
    uv_faces[-segments + m][2] = len(unit_verts) + m
  return verts, np.array(faces), uvs, np.array(uv_faces)


@dataclasses.dataclass
class Mesh:
  """The assembled mesh (raw units) and per-vertex tags used by the fields."""

  verts: np.ndarray  # (V, 3)
  faces: np.ndarray  # (F, 3)
  uvs: np.ndarray  # (T, 2)
  uv_faces: np.ndarray  # (F, 3)
  parts: list  # (name, first face, end face)
  tags: dict  # name -> (V,) float


def zipper(left, right):
  """Triangles between two columns of vertices, left then right, each ordered top down.

  Each column is a list of (vertex id, uv id, fraction down the column) from the same top
  row to the same bottom row; the strip is merged by fraction.

  Returns:
    faces and uv faces, lists of triples.
  """
  p = q = 0
  faces, uv_faces = [], []
  while p < len(left) - 1 or q < len(right) - 1:
    if q == len(right) - 1 or (p < len(left) - 1 and left[p + 1][2] <= right[q + 1][2]):
      tri = (left[p], left[p + 1], right[q])
      p += 1
    else:
      tri = (left[p], right[q + 1], right[q])
      q += 1
    faces.append(tuple(t[0] for t in tri))
    uv_faces.append(tuple(t[1] for t in tri))
  return faces, uv_faces


def assemble(grid, patches):
  """The head surface: the grid without the patches' interiors, the patches and pouches,
  then the two eyeballs as their own parts. Unused grid vertices and uvs are dropped."""
  c, r = NUM_COLUMNS, NUM_ROWS
  verts = [grid[0, 0][None], grid[:, 1:].transpose(1, 0, 2).reshape(-1, 3)]
  vid = lambda row, col: 0 if row == 0 else 1 + (row - 1) * c + col % c
  uid = lambda row, col: c + (row - 1) * (c + 1) + col  # col in [0, C]
  pole_uv = np.stack([(np.arange(c) + 0.5) / c, np.ones(c)], -1)
  uu, vv = np.meshgrid(np.arange(c + 1) / c, 1.0 - np.arange(1, r) / (r - 1))
  head_v = lambda v: V_HEAD + (1.0 - V_HEAD) * v  # the head's part of the atlas
  uvs = [pole_uv, np.stack([uu.ravel(), vv.ravel()], -1)]
  for chunk in uvs:
    chunk[:, 1] = head_v(chunk[:, 1])
  v_of_row = lambda row: head_v(1.0 - row / (r - 1))
  num_v, num_t = 1 + (r - 1) * c, c + (r - 1) * (c + 1)
  tag_names = ("slit_side", "pouch", "in_slit", "patch", "eyeball", "slit_theta")
  tags = {k: [np.zeros(num_v)] for k in tag_names}

  def add_verts(points, **tag_values):
    nonlocal num_v
    points = np.asarray(points, np.float64).reshape(-1, 3)
    verts.append(points)
    for key in tags:
      tags[key].append(np.full(len(points), float(tag_values.get(key, 0.0))))
    ids = np.arange(num_v, num_v + len(points))
    num_v += len(points)
    return ids

  def add_uvs(points):
    nonlocal num_t
    points = np.asarray(points, np.float64).reshape(-1, 2)
    uvs.append(points)
    ids = np.arange(num_t, num_t + len(points))
    num_t += len(points)
    return ids

  inside = lambda patch, row, col: patch.r0 <= row < patch.r1 and patch.c0 <= col < patch.c1
  faces, uv_faces = [], []
  for j in range(c):
    faces.append((0, vid(1, j), vid(1, j + 1)))
    uv_faces.append((j, uid(1, j), uid(1, j + 1)))
  for row in range(1, r - 1):
    for j in range(c):
      if any(inside(p, row, j) for p in patches):
        continue
      faces.append((vid(row, j), vid(row + 1, j), vid(row, j + 1)))
      faces.append((vid(row, j + 1), vid(row + 1, j), vid(row + 1, j + 1)))
      uv_faces.append((uid(row, j), uid(row + 1, j), uid(row, j + 1)))
      uv_faces.append((uid(row, j + 1), uid(row + 1, j), uid(row + 1, j + 1)))
  boundary_tags = []  # (vertex id, tags) for the patches' boundary rows
  for number, patch in enumerate(patches, start=1):
    n = len(next(iter(patch.local.values())))
    lv, lt = {}, {}
    for j, pts in patch.local.items():
      in_slit = float(patch.ja <= j <= patch.jb)
      side = np.where(np.arange(n) <= patch.slit_row, 1.0, -1.0)
      ids = [vid(patch.r0, j)]
      for rho in range(1, n - 1):
        ids += list(add_verts(pts[rho], slit_side=side[rho], in_slit=in_slit, patch=number))
      ids.append(vid(patch.r1, j))
      boundary_tags += [(ids[0], dict(slit_side=1.0, patch=number))]
      boundary_tags += [(ids[-1], dict(slit_side=-1.0, patch=number))]
      v = v_of_row(patch.r0) + (v_of_row(patch.r1) - v_of_row(patch.r0)) * patch.frac[j]
      inner = add_uvs(np.stack([np.full(n - 2, j / c), v[1:-1]], -1))
      lv[j], lt[j] = ids, [uid(patch.r0, j), *inner, uid(patch.r1, j)]
    for j in range(patch.c0 + 1, patch.c1 - 1):
      for rho in range(n - 1):
        if rho == patch.slit_row and patch.ja <= j < patch.jb:
          continue  # the slit
        a, b, cc, d = lv[j][rho], lv[j][rho + 1], lv[j + 1][rho], lv[j + 1][rho + 1]
        ta, tb, tc, td = lt[j][rho], lt[j][rho + 1], lt[j + 1][rho], lt[j + 1][rho + 1]
        faces += [(a, b, cc), (cc, b, d)]
        uv_faces += [(ta, tb, tc), (tc, tb, td)]
    # Zippers between the kept side columns and the first / last interior columns.
    all_verts = lambda: np.concatenate(verts)

    def column(ids, t_ids):
      y = all_verts()[ids][:, 1]
      f = (y[0] - y) / (y[0] - y[-1])
      return list(zip(ids, t_ids, f))

    side = lambda j: (
      [vid(row, j) for row in range(patch.r0, patch.r1 + 1)],
      [uid(row, j) for row in range(patch.r0, patch.r1 + 1)],
    )
    for left, right in (
      (column(*side(patch.c0)), column(lv[patch.c0 + 1], lt[patch.c0 + 1])),
      (column(lv[patch.c1 - 1], lt[patch.c1 - 1]), column(*side(patch.c1))),
    ):
      f, t = zipper(left, right)
      faces += f
      uv_faces += t
    # The pouch: rings over the slit loop (upper edge left to right, lower edge back).
    cols = list(range(patch.ja, patch.jb + 1))
    loop = [lv[j][patch.slit_row] for j in cols] + [lv[j][patch.slit_row + 1] for j in cols[::-1]]
    num_rings = patch.pouch_upper.shape[0]
    rings = [loop]
    loop_pts = np.concatenate(verts)[loop]
    loop_theta = np.arctan2(loop_pts[:, 0], loop_pts[:, 2])
    for k in range(num_rings):
      pts = np.concatenate([patch.pouch_upper[k], patch.pouch_lower[k][::-1]])
      sides = np.concatenate([np.ones(len(cols)), -np.ones(len(cols))])
      sigma = patch.pouch_fraction[k]
      ids = [
        add_verts(pt, slit_side=sd, pouch=sigma, in_slit=1.0, patch=number, slit_theta=t0)[0]
        for pt, sd, t0 in zip(pts, sides, loop_theta)
      ]
      rings.append(ids)
    u0, v0, w, h = patch.uv_box
    size = len(loop)
    margin = 0.15 if patch.pole is None else 0.0  # room for the zipped roof below
    grid_uv = np.array(
      [
        [
          (u0 + w * i / size, v0 + h * (1.0 - (1.0 - margin) * k / num_rings))
          for i in range(size + 1)
        ]
        for k in range(num_rings + 1)
      ]
    )
    t_grid = add_uvs(grid_uv).reshape(num_rings + 1, size + 1)
    for k in range(num_rings):
      for i in range(size):
        a, b = rings[k][i], rings[k][(i + 1) % size]
        cc, d = rings[k + 1][i], rings[k + 1][(i + 1) % size]
        ta, tb, tc, td = t_grid[k, i], t_grid[k, i + 1], t_grid[k + 1, i], t_grid[k + 1, i + 1]
        faces += [(b, a, cc), (b, cc, d)]
        uv_faces += [(tb, ta, tc), (tb, tc, td)]
    last = rings[-1]
    if patch.pole is not None:
      pole = add_verts(patch.pole, pouch=1.0, in_slit=1.0, patch=number, slit_theta=np.pi)[0]
      t_pole = add_uvs([(u0 + w * (i + 0.5) / size, v0) for i in range(size)])
      for i in range(size):
        faces.append((last[(i + 1) % size], last[i], pole))
        uv_faces.append((t_grid[-1, i + 1], t_grid[-1, i], t_pole[i]))
    else:  # zip the last ring shut: upper vertex i with the lower vertex below it
      m = len(cols)
      top = add_uvs([(u0 + w * i / (m - 1), v0 + h * margin) for i in range(m)])
      bottom = add_uvs([(u0 + w * i / (m - 1), v0) for i in range(m)])
      for i in range(m - 1):
        u_i, u_n, d_i, d_n = last[i], last[i + 1], last[2 * m - 1 - i], last[2 * m - 2 - i]
        faces += [(u_n, u_i, d_i), (u_n, d_i, d_n)]
        uv_faces += [(top[i + 1], top[i], bottom[i]), (top[i + 1], bottom[i], bottom[i + 1])]
  verts = np.concatenate(verts)
  tags = {k: np.concatenate(v) for k, v in tags.items()}
  # Which column plane a vertex is in: its own azimuth, or for pouch vertices, that of the
  # slit vertex its ring column starts from.
  own_theta = np.arctan2(verts[:, 0], verts[:, 2])
  tags["slit_theta"] = np.where(tags["pouch"] > 0, tags["slit_theta"], own_theta)
  for i, values in boundary_tags:
    for k, val in values.items():
      tags[k][i] = val
  uvs = np.concatenate(uvs)
  faces, uv_faces = np.array(faces), np.array(uv_faces)
  head_faces = len(faces)
  parts = [("head", 0, head_faces)]
  for name, centre, square in (
    ("eye_left", EYE_CENTRE, EYEBALL_SQUARES[0]),
    ("eye_right", mirror(EYE_CENTRE), EYEBALL_SQUARES[1]),
  ):
    ev, ef, et, etf = eyeball(centre, square)
    faces = np.concatenate([faces, ef + len(verts)])
    uv_faces = np.concatenate([uv_faces, etf + len(uvs)])
    verts = np.concatenate([verts, ev])
    uvs = np.concatenate([uvs, et])
    for k in tags:
      tags[k] = np.concatenate([tags[k], np.full(len(ev), 1.0 if k == "eyeball" else 0.0)])
    parts.append((name, parts[-1][2], len(faces)))
  # Drop unused grid vertices and uvs (the patches' interiors), keeping the order.
  used = np.zeros(len(verts), bool)
  used[faces.ravel()] = True
  remap = np.cumsum(used) - 1
  faces = remap[faces]
  verts = verts[used]
  tags = {k: v[used] for k, v in tags.items()}
  used_t = np.zeros(len(uvs), bool)
  used_t[uv_faces.ravel()] = True
  uv_faces = (np.cumsum(used_t) - 1)[uv_faces]
  uvs = uvs[used_t]
  return Mesh(verts, faces.astype(np.int32), uvs, uv_faces.astype(np.int32), parts, tags)


def build_mesh():
  grid, theta, params = sample_grid()
  eye = eye_patch(grid, theta, params)
  patches = [
    eye,
    mirror_patch(eye, "eye_right", EYE_POUCH_BOXES[1]),
    mouth_patch(grid, theta, params),
  ]
  return assemble(grid, patches)


# ----------------------------------------------------------------------------------------
# Identity components. Each is (name, amplitude, field): field(p) maps points p (V, 3) to a
# displacement (V, 3); amplitude is the largest vertex displacement at weight 1 (model
# units, 0.01 ≈ 1 mm), applied after orthogonalisation. Fields depend on position only
# (no surface normals), so eyeball, pouch and lids, which are close together, move alike.


def shift(direction, window):
  """Moves the windowed region along a fixed direction."""
  return lambda p: window(p)[..., None] * np.asarray(direction)


def outward(window, lift=0.0):
  """Pushes the windowed region away from the vertical axis (tilted up by `lift`)."""
  return lambda p: window(p)[..., None] * unit(horizontal_normal(p) + vec(y=lift))


def scale_about(centre, axes, window, pair=False):
  """Scales the windowed region about `centre` (or its mirror image on each side)."""

  def f(p):
    origin = np.asarray(centre) * np.stack(
      [np.sign(p[..., 0]) if pair else np.ones(p.shape[:-1]), *[np.ones(p.shape[:-1])] * 2], -1
    )
    return (p - origin) * np.asarray(axes) * window(p)[..., None]

  return f


def per_axis(fx=None, fy=None, fz=None):
  """A displacement given per coordinate as functions of p (None is zero)."""

  def f(p):
    out = np.zeros_like(p)
    for k, g in enumerate((fx, fy, fz)):
      if g is not None:
        out[..., k] = g(p)
    return out

  return f


def rotate_about(p, centre, axis, window, pair=False):
  """Small rotation about `axis` through `centre` (mirrored on the right side, so the
  lateral canthi both rise), weighted by `window`."""
  side = np.sign(p[..., 0]) if pair else np.ones(p.shape[:-1])
  origin = np.asarray(centre) * np.stack([side, *[np.ones(p.shape[:-1])] * 2], -1)
  turn = np.cross(np.asarray(axis), p - origin) * side[..., None]
  return turn * window[..., None]


def plateau_pair(p, centre, stretch, inner, outer):
  """1 within `inner` of `centre` or its mirror image (distances scaled per axis by
  1/stretch), falling smoothly to 0 at `outer`."""
  out = 0.0
  for c in (np.asarray(centre), mirror(centre)):
    d = np.linalg.norm((p - c) / np.asarray(stretch), axis=-1)
    out = out + 1.0 - smoothstep(inner, outer, d)
  return out


def odd_ramp(x, half_width, rounding):
  """-1 .. 1 through 0 at x = 0, linear over ±half_width with rounded ends (slope 1/hw)."""
  b = half_width
  return (softplus(x + b, rounding) - softplus(x - b, rounding) - b) / b


def band(x, lo, hi, rounding):
  """1 on [lo, hi], falling linearly to 0 over `rounding` outside, with rounded corners."""
  w = rounding
  return (
    (softplus(x - lo + w, w / 4) - softplus(x - lo, w / 4))
    / w
    * (softplus(hi + w - x, w / 4) - softplus(hi - x, w / 4))
    / w
  )


def identity_components():
  x_ = lambda p: p[..., 0]
  y_ = lambda p: p[..., 1]
  side = lambda p: np.tanh(p[..., 0] / 0.03)  # smooth sign(x)
  head = lambda p: smoothstep(-1.5, -0.8, p[..., 1])  # above the neck
  neck = lambda p: 1.0 - smoothstep(-1.45, -0.8, p[..., 1])
  # Around the eyes: a plateau over both sockets and lids, falling off towards the temples,
  # cheeks and forehead; `medial` also fades to 0 at the midline (over the nose bridge).
  ey = EYE_CENTRE[1]
  eyes = lambda p: (
    band(p[..., 1], ey - 0.13, ey + 0.13, 0.25)
    * band(p[..., 2], 0.5, 1.1, 0.3)
    * band(np.abs(p[..., 0]), -1.0, EYE_CENTRE[0] + 0.15, 0.35)
  )
  medial = lambda p: smoothstep(0.03, 0.21, np.abs(p[..., 0]))
  eye_ball = lambda p: plateau_pair(p, EYE_CENTRE, (1.0, 1.0, 1.0), 0.16, 0.31)
  nose = lambda p: gauss(p, vec(0.0, -0.08, 1.0), (0.14, 0.17, 0.4))
  tip = vec(0.0, -0.18, 1.2)
  ear = vec(0.80, -0.03, -0.10)
  ears = lambda p: gauss_pair(p, ear, (0.20, 0.28, 0.22)) * smoothstep(0.5, 0.7, np.abs(p[..., 0]))
  up, down, forward, back, left = vec(y=1), vec(y=-1), vec(z=1), vec(z=-1), vec(x=1)

  def ear_rotation(p):  # rotates each ear in its y-z plane, top going forward
    turn = np.stack([np.zeros(p.shape[:-1]), -(p[..., 2] - ear[2]), p[..., 1] - ear[1]], -1)
    return turn / 0.3 * ears(p)[..., None]

  return [
    # Global proportions first, so the local components below are what remains.
    ("head_width", 0.07, per_axis(fx=lambda p: x_(p) * head(p))),
    ("head_height", 0.07, per_axis(fy=lambda p: (y_(p) + 0.2) * head(p))),
    ("head_depth", 0.07, per_axis(fz=lambda p: (p[..., 2] + 0.05) * head(p))),
    (
      "face_length",
      0.045,
      per_axis(
        fy=lambda p: (
          -softplus(0.1 - np.maximum(y_(p), -0.95), 0.15) * (1.0 - smoothstep(-0.95, -1.85, y_(p)))
        )
      ),
    ),
    (
      "jaw_width",
      0.06,
      per_axis(fx=lambda p: x_(p) * gauss(p, vec(0, -0.75, 0.2), (10, 0.25, 0.6)) * head(p)),
    ),
    # Cranium and forehead.
    ("crown_height", 0.07, shift(up, lambda p: gauss(p, vec(0, 1.3, -0.1), (0.6, 0.35, 0.7)))),
    ("back_of_head", 0.07, shift(back, lambda p: gauss(p, vec(0, 0.35, -1.05), (0.5, 0.4, 0.35)))),
    (
      "forehead_slope",
      0.05,
      per_axis(
        fz=lambda p: (
          -softplus(y_(p) - 0.25, 0.05)
          * facing_front(p)
          * np.exp(-0.5 * ((y_(p) - 0.6) / 0.25) ** 2)
          * smoothstep(1.2, 0.9, y_(p))
        )
      ),
    ),
    (
      "forehead_width",
      0.05,
      per_axis(fx=lambda p: side(p) * gauss_pair(p, vec(0.7, 0.6, 0.3), (0.25, 0.35, 0.45))),
    ),
    ("brow_ridge", 0.018, outward(lambda p: gauss_pair(p, vec(0.3, 0.29, 0.95), (0.2, 0.09, 0.3)))),
    ("temples", 0.03, outward(lambda p: gauss_pair(p, vec(0.72, 0.30, 0.35), (0.17, 0.2, 0.25)))),
    # Eyes (made rigid around each eyeball below).
    ("eye_spacing", 0.02, per_axis(fx=lambda p: odd_ramp(x_(p), 0.19, 0.04) * eyes(p))),
    ("eye_size", 0.006, scale_about(EYE_CENTRE, (1, 1, 1), eye_ball, pair=True)),
    ("eye_depth", 0.025, shift(back, lambda p: eyes(p) * medial(p))),
    ("eye_height", 0.025, shift(up, lambda p: eyes(p) * medial(p))),
    (
      "eye_tilt",
      0.008,
      lambda p: rotate_about(p, EYE_CENTRE, vec(z=1), eye_ball(p), pair=True),
    ),
    # Nose.
    ("nose_length", 0.035, per_axis(fy=lambda p: -softplus(0.17 - y_(p), 0.05) * nose(p) / 0.4)),
    (
      "nose_width",
      0.015,
      per_axis(fx=lambda p: x_(p) / 0.12 * gauss(p, vec(0, -0.18, 1.05), (0.17, 0.12, 0.35))),
    ),
    ("nose_bridge", 0.03, shift(forward, lambda p: gauss(p, vec(0, 0.05, 1), (0.09, 0.12, 0.35)))),
    ("nose_tip", 0.035, shift(forward, lambda p: gauss(p, tip, (0.10, 0.10, 0.25)))),
    (
      "nose_tip_upturn",
      0.015,
      shift(up, lambda p: gauss(p, tip + vec(y=-0.03), (0.10, 0.09, 0.2))),
    ),
    (
      "nostril_flare",
      0.012,
      per_axis(
        fx=lambda p: (
          odd_ramp(x_(p), 0.12, 0.03) * gauss_pair(p, vec(0.13, -0.21, 1.0), (0.1, 0.09, 0.25))
        )
      ),
    ),
    ("nose_hump", 0.02, shift(forward, lambda p: gauss(p, vec(0, -0.02, 1.1), (0.08, 0.08, 0.3)))),
    # Cheeks, jaw and chin.
    (
      "cheekbones",
      0.03,
      outward(lambda p: gauss_pair(p, vec(0.54, -0.08, 0.65), (0.15, 0.12, 0.25))),
    ),
    (
      "cheek_fullness",
      0.045,
      outward(lambda p: gauss_pair(p, vec(0.48, -0.38, 0.65), (0.17, 0.17, 0.3))),
    ),
    (
      "jaw_angle",
      0.04,
      outward(lambda p: gauss_pair(p, vec(0.6, -0.82, -0.05), (0.14, 0.14, 0.25))),
    ),
    ("chin_length", 0.045, shift(down, lambda p: gauss(p, vec(0, -0.95, 0.8), (0.35, 0.22, 0.4)))),
    (
      "chin_protrusion",
      0.045,
      shift(forward, lambda p: gauss(p, vec(0, -0.87, 0.95), (0.22, 0.15, 0.35))),
    ),
    (
      "chin_width",
      0.02,
      per_axis(fx=lambda p: x_(p) / 0.15 * gauss(p, vec(0, -0.86, 0.9), (0.22, 0.17, 0.35))),
    ),
    # Mouth (broad before narrow, so the narrow ones are relative to the broad ones).
    (
      "mouth_protrusion",
      0.03,
      shift(forward, lambda p: gauss(p, vec(0, -0.5, 1.0), (0.3, 0.2, 0.4))),
    ),
    (
      "mouth_width",
      0.02,
      per_axis(fx=lambda p: x_(p) / 0.15 * gauss(p, vec(0, -0.47, 1.0), (0.24, 0.10, 0.4))),
    ),
    ("upper_lip", 0.015, shift(forward, lambda p: gauss(p, vec(0, -0.40, 1), (0.18, 0.09, 0.4)))),
    ("lower_lip", 0.015, shift(forward, lambda p: gauss(p, vec(0, -0.56, 1), (0.17, 0.09, 0.4)))),
    (
      "philtrum_length",
      0.02,
      shift(
        down,
        lambda p: smoothstep(-0.24, -0.48, y_(p)) * gauss(p, vec(0, -0.6, 0.9), (0.35, 0.3, 0.4)),
      ),
    ),
    (
      "mouth_corners",
      0.015,
      shift(up, lambda p: gauss_pair(p, vec(0.2, -0.48, 0.9), (0.09, 0.09, 0.3))),
    ),
    # Finer facial details.
    (
      "nose_bridge_width",
      0.008,
      per_axis(fx=lambda p: x_(p) / 0.08 * gauss(p, vec(0, 0.05, 1.0), (0.1, 0.12, 0.35))),
    ),
    (
      "brow_height",
      0.02,
      shift(up, lambda p: gauss_pair(p, vec(0.3, 0.31, 0.9), (0.22, 0.12, 0.3))),
    ),
    (
      "nasolabial_folds",
      0.015,
      outward(lambda p: -gauss_pair(p, vec(0.22, -0.33, 0.95), (0.07, 0.13, 0.25))),
    ),
    # Ears.
    ("ear_size", 0.03, scale_about(ear, (1, 3.3, 3.3), ears, pair=True)),
    ("ear_protrusion", 0.012, lambda p: (ear_height(p) / 0.25)[..., None] * horizontal_normal(p)),
    ("ear_height", 0.035, shift(up, ears)),
    (
      "ear_lobes",
      0.018,
      shift(down, lambda p: gauss_pair(p, vec(0.8, -0.28, -0.08), (0.12, 0.1, 0.12))),
    ),
    ("ear_angle", 0.035, ear_rotation),
    # Neck.
    (
      "neck_thickness",
      0.05,
      per_axis(fx=lambda p: x_(p) * neck(p), fz=lambda p: (p[..., 2] + 0.1) * neck(p)),
    ),
    ("neck_lean", 0.06, shift(forward, lambda p: smoothstep(-1.0, -1.85, y_(p)))),
    (
      "under_chin",
      0.035,
      outward(lambda p: gauss(p, vec(0, -1.07, 0.55), (0.3, 0.12, 0.25)), -2.0),
    ),
    # Asymmetries (odd in x, so orthogonal to every symmetric component).
    ("jaw_shift", 0.035, shift(left, lambda p: gauss(p, vec(0, -0.8, 0.5), (0.6, 0.25, 0.6)))),
    (
      "nose_deviation",
      0.02,
      shift(left, lambda p: gauss(p, vec(0, -0.12, 1.1), (0.12, 0.17, 0.35))),
    ),
    ("eye_asymmetry", 0.015, shift(up, lambda p: eyes(p) * odd_ramp(x_(p), 0.19, 0.04))),
    ("face_asymmetry", 0.035, per_axis(fz=lambda p: x_(p) * facing_front(p) * head(p))),
  ]


def eye_region(p):
  """(V,) 1 within the socket (eyeball, pouch, lid margins) of either eye, fading to 0
  a few millimetres out; and (V,) the side (+1 left eye, -1 right eye)."""
  side = np.where(p[..., 0] >= 0, 1.0, -1.0)
  centre = EYE_CENTRE * np.stack([side, np.ones_like(side), np.ones_like(side)], -1)
  dist = np.linalg.norm(p - centre, axis=-1)
  return 1.0 - smoothstep(SOCKET_RADIUS + 0.005, SOCKET_RADIUS + 0.16, dist), side


def rigid_around_eyes(field, p):
  """The field's displacement (V, 3), replaced around each eye by its first-order (affine)
  part at the eye centre, so eyeball, pouch and lid margins move as one (an affine map keeps
  them from touching) and the blend back to the field costs only its curvature."""
  d = field(p)
  weight, side = eye_region(p)
  h = 1e-4
  for s in (1.0, -1.0):
    c = EYE_CENTRE * np.array([s, 1.0, 1.0])
    probes = c + h * np.concatenate([np.eye(3), -np.eye(3)])
    values = field(probes)
    jac = (values[:3] - values[3:]).T / (2 * h)  # jac[i, k] = d field_i / d x_k
    move = field(c[None])[0] + (p - c) @ jac.T
    w = np.where(side == s, weight, 0.0)[:, None]
    d = d + w * (move - d)
  return d


STRAIN_BUDGET = 0.12  # largest in-surface strain per unit weight of any component


def surface_strain(mean, faces, displacement):
  """(F,) largest in-surface strain of each face under a displacement (V, 3): the spectral
  norm of the displacement's gradient along the face (a 2 × 2 map in the face's frame)."""
  tri, d = mean[faces], displacement[faces]
  e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
  t1 = unit(e1)
  t2 = unit(np.cross(np.cross(e1, e2), e1))
  frame = np.stack([t1, t2], -1)  # (F, 3, 2)
  edges = np.einsum("fci,fcj->fij", frame, np.stack([e1, e2], -1))
  moves = np.einsum("fci,fcj->fij", frame, np.stack([d[:, 1] - d[:, 0], d[:, 2] - d[:, 0]], -1))
  return np.linalg.norm(moves @ np.linalg.inv(edges), ord=2, axis=(1, 2))


def build_basis(mean, faces, components):
  """(K, V, 3) scaled components and their names.

  Each component is its field, made affine around the eyes, scaled so that weight 1 moves
  its most affected vertex by its listed amplitude, or less where that would strain the
  surface by more than STRAIN_BUDGET. Components are not orthogonalised: Gram–Schmidt
  would mix the shapes of earlier components (far from a component's own region, and
  sharper than either) into later ones.
  """
  names, vectors = [], []
  for name, amplitude, field in components:
    d = rigid_around_eyes(field, mean)
    d = d * amplitude / np.linalg.norm(d, axis=-1).max()
    strain = surface_strain(mean, faces, d).max()
    if strain > STRAIN_BUDGET:
      d = d * STRAIN_BUDGET / strain
    names.append(name)
    vectors.append(d)
  return np.stack(vectors), tuple(names)


# ----------------------------------------------------------------------------------------
# Expression components. Each is (name, field): field(mesh) -> (V, 3) displacement at
# weight 1 in raw units. Unlike the identity fields these may use the mesh's tags: which
# side of a slit a vertex is on tells the lips (and lids) apart where they touch.

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
MOUTH_PATCH = 3  # tag value of the mouth patch (eyes are 1 and 2)


def mouth_split(mesh):
  """Which lip each vertex goes with, for fields that move the lips apart.

  Returns:
    lower (V,): 0 with the upper lip, 1 with the lower lip (the pouch's walls go from
      their lip's value at the slit to 0.5 at the top, where they meet);
    confidence (V,): how much `lower` overrides a smooth field, 1 at the middle of the
      slit, fading to 0 at the mouth corners and away from the mouth line.
  """
  p, tags = mesh.verts, mesh.tags
  in_mouth = (tags["patch"] == MOUTH_PATCH) & (tags["in_slit"] > 0)
  width = mouth_slit_half_width(mesh)
  q = np.clip(1.0 - (p[:, 0] / width) ** 2, 0.0, 1.0) ** 1.5
  pouch = tags["pouch"]
  lower = np.where(tags["slit_side"] < 0, 1.0, 0.0)
  lower = np.where(
    pouch > 0, np.where(tags["slit_side"] < 0, 1.0 - 0.5 * pouch, 0.5 * pouch), lower
  )
  near_line = np.exp(-0.5 * ((p[:, 1] - MOUTH_Y) / 0.06) ** 2)
  confidence = np.where(in_mouth, q * np.where(pouch > 0, 1.0, near_line), 0.0)
  return lower, confidence


def mouth_slit_half_width(mesh):
  """|x| of the mouth corners (the slit's end columns), raw units."""
  tags = mesh.tags
  slit = (tags["patch"] == MOUTH_PATCH) & (tags["in_slit"] > 0) & (tags["pouch"] == 0)
  return np.abs(mesh.verts[slit, 0]).max()


def away_from_eyes(p):
  """(V,) 0 in and around the sockets, 1 away from them: expressions other than the lids
  leave eyeballs, pouches and lid margins where they are."""
  return 1.0 - eye_region(p)[0]


def expression_fields():
  y_m = MOUTH_Y
  up = vec(y=1)

  def jaw_open(mesh):
    # The jaw turns about a hinge in front of the ears; near the lips the lower lip slides
    # straight down the back of the upper lip (and down the contact slope below it), so
    # the negative direction (jaw up) slides it up behind the upper lip, not into it.
    p = mesh.verts
    y, z = p[:, 1], p[:, 2]
    jaw = smoothstep(y_m + 0.08, y_m - 0.22, y) * smoothstep(-0.35, 0.05, z)
    jaw *= 1.0 - smoothstep(-1.0, -1.3, y)
    lower, confidence = mouth_split(mesh)
    weight = jaw + confidence * (lower - jaw)
    hinge = vec(y=0.0, z=-0.05)
    turn = np.stack([np.zeros(len(p)), -(z - hinge[2]), y - hinge[1]], -1) / 1.1
    # Below the upper lip's edge the slide follows the lower lip's contact slope (steeper
    # towards the corners, as in mouth_patch) or leans further forward.
    contact = smoothstep(y_m + 0.002, y_m - 0.015, y)
    taper = np.clip(1.0 - (p[:, 0] / mouth_slit_half_width(mesh)) ** 2, 0.0, 1.0) ** 0.5
    slope = 0.3 + 0.7 * (1.0 - taper) ** 2
    in_slit = (mesh.tags["patch"] == MOUTH_PATCH) & (mesh.tags["in_slit"] > 0)
    contact *= np.where(in_slit, np.exp(-0.5 * ((y - y_m) / 0.08) ** 2), 0.0) * taper**2
    slide = np.stack([np.zeros(len(p)), -np.ones(len(p)), slope * contact], -1)
    blend = smoothstep(y_m - 0.08, y_m - 0.35, y)[:, None]
    direction = (1.0 - blend) * slide + blend * turn
    return 0.055 * weight[:, None] * direction * away_from_eyes(p)[:, None]

  def smile(side):
    def f(mesh):
      p = mesh.verts
      corner = vec(side * mouth_slit_half_width(mesh), y_m + 0.01, 0.9)
      w = gauss(p, corner, (0.15, 0.12, 0.35))
      cheek = gauss(p, vec(side * 0.40, -0.25, 0.75), (0.15, 0.13, 0.35))
      move = w[:, None] * unit(vec(side * 0.55, 0.7, -0.45)) * 0.065
      move += cheek[:, None] * unit(horizontal_normal(p) + vec(y=1.5)) * 0.03
      return move * away_from_eyes(p)[:, None]

    return f

  def brow_raise(side):
    def f(mesh):
      p = mesh.verts
      w = gauss(p, vec(side * 0.30, 0.36, 0.9), (0.19, 0.18, 0.35))
      w += 0.4 * gauss(p, vec(side * 0.25, 0.6, 0.8), (0.2, 0.2, 0.4))  # forehead
      return 0.05 * w[:, None] * up * away_from_eyes(p)[:, None]

    return f

  def brow_lower(side):
    def f(mesh):
      p = mesh.verts
      w = gauss(p, vec(side * 0.17, 0.29, 0.95), (0.13, 0.11, 0.35))
      direction = unit(vec(-side * 0.6, -0.8, 0.15))
      return 0.045 * w[:, None] * direction * away_from_eyes(p)[:, None]

    return f

  def eye_close(side):
    def f(mesh):
      return lid_rotation(mesh, side)

    return f

  def lips_pucker(mesh):
    p = mesh.verts
    w = gauss(p, vec(0.0, y_m - 0.01, 1.0), (0.19, 0.12, 0.4))
    move = np.stack([-0.35 * p[:, 0], np.zeros(len(p)), 0.05 * np.ones(len(p))], -1)
    return w[:, None] * move * away_from_eyes(p)[:, None]

  def cheek_puff(side):
    def f(mesh):
      p = mesh.verts
      w = gauss(p, vec(side * 0.38, -0.45, 0.75), (0.15, 0.15, 0.35))
      return 0.075 * w[:, None] * horizontal_normal(p) * away_from_eyes(p)[:, None]

    return f

  def sneer(side):
    def f(mesh):
      # The upper lip lifts on one side (showing the pouch, i.e. the teeth's place) with
      # the nostril wing; the lower lip stays.
      p = mesh.verts
      y = p[:, 1]
      lower, confidence = mouth_split(mesh)
      upper_face = smoothstep(y_m - 0.06, y_m + 0.10, y)
      weight = upper_face + confidence * ((1.0 - lower) - upper_face)
      reach = gauss(p, vec(side * 0.10, y_m + 0.12, 0.95), (0.11, 0.16, 0.35))
      nostril = gauss(p, vec(side * 0.12, -0.21, 1.0), (0.07, 0.07, 0.3))
      lift = 0.03 * weight * reach + 0.035 * nostril
      return lift[:, None] * up * away_from_eyes(p)[:, None]

    return f

  fields = {
    "jaw_open": jaw_open,
    "lips_pucker": lips_pucker,
  }
  for side, suffix in ((1.0, "left"), (-1.0, "right")):
    fields[f"smile_{suffix}"] = smile(side)
    fields[f"brow_raise_{suffix}"] = brow_raise(side)
    fields[f"brow_lower_{suffix}"] = brow_lower(side)
    fields[f"eye_close_{suffix}"] = eye_close(side)
    fields[f"cheek_puff_{suffix}"] = cheek_puff(side)
    fields[f"sneer_{suffix}"] = sneer(side)
  return [(name, fields[name]) for name in EXPRESSION_NAMES]


def lid_rotation(mesh, side):
  """Closing one eye: the upper lid turns down about the eye's horizontal axis, by half
  the fissure's local height at weight 1 (closed at 2), the lower lid turns up a little.

  The turn fades with the angle from the margin, over the lid up to the brow (and back
  over the pouch); the eyeball does not move. A linearised turn moves points slightly
  out from the eye centre, so lids slide over the eyeball, never into it.
  """
  p = mesh.verts
  c = EYE_CENTRE * np.array([side, 1.0, 1.0])
  rel = p - c
  elevation = np.arctan2(rel[:, 1], rel[:, 2])  # 0 straight ahead, π/2 straight up
  # Position along the fissure, -1 medial .. 1 lateral, from the vertex's x.
  _, _, med, lat = canthi(column_azimuths())
  az = mesh.tags["slit_theta"] * side  # mirrored onto the left eye
  d_perp = EYE_CENTRE[0] * np.cos(az) - EYE_CENTRE[2] * np.sin(az)
  f = (med + lat - 2.0 * d_perp) / (med - lat)
  f_clip = np.clip(f, -1.0, 1.0)
  height = (LID_UPPER + LID_LOWER) * (1.0 - f_clip**2) ** 1.4  # smooth at the canthi
  radius = np.sqrt(np.maximum(SOCKET_RADIUS**2 - (rel[:, 0] * 0.9) ** 2, 0.004))
  angle = 0.5 * height / radius * (1.0 - np.clip(np.abs(f) - 1.0, 0.0, 1.0) / 1.0)
  angle = angle * smoothstep(1.6, 0.9, np.abs(f))
  y_split = CANTHAL_TILT * 0.5 * (f_clip + 1.0) - 0.006
  split_elev = np.arctan2(y_split, 0.12)
  in_eye = (mesh.tags["patch"] == (1 if side > 0 else 2)) & (mesh.tags["slit_side"] != 0)
  upper = np.where(in_eye, mesh.tags["slit_side"] > 0, elevation > split_elev).astype(float)
  margin_up = np.arctan2(y_split + LID_UPPER * (1.0 - f_clip**2) ** 0.85, 0.12)
  margin_lo = np.arctan2(y_split - LID_LOWER * (1.0 - f_clip**2) ** 0.85, 0.12)
  # Angles measured away from the fissure: up and back over the top for the upper lid,
  # down and back under the bottom for the lower one (so the back of the pouch is far).
  elev_up = np.where(elevation < -np.pi / 2, elevation + 2 * np.pi, elevation)
  elev_lo = np.where(elevation > np.pi / 2, elevation - 2 * np.pi, elevation)
  fade_up = 1.0 - smoothstep(margin_up + 0.05, margin_up + 1.6, elev_up)
  fade_lo = 1.0 - smoothstep(margin_lo - 0.05, margin_lo - 1.2, elev_lo)
  # ... and with the distance from the eye centre, so the brow barely follows.
  near = 1.0 - smoothstep(SOCKET_RADIUS + 0.03, SOCKET_RADIUS + 0.2, np.linalg.norm(rel, axis=1))
  turn = (upper * angle * fade_up - (1.0 - upper) * 0.12 * angle * fade_lo) * near
  turn *= 1.0 - mesh.tags["eyeball"]
  turn *= np.where(rel[:, 2] > -0.6, 1.0, 0.0) * (np.linalg.norm(rel, axis=1) < 0.6)
  axis_cross = np.stack([np.zeros(len(p)), -rel[:, 2], rel[:, 1]], -1)  # x̂ × rel
  return turn[:, None] * axis_cross


def build_expressions(mesh):
  """(E, V, 3) expression components and their names."""
  fields = expression_fields()
  return np.stack([f(mesh) for _, f in fields]), tuple(n for n, _ in fields)


def build():
  """All arrays of the npz (docs/head_model.md), normalised to the world frame."""
  mesh = build_mesh()
  basis, names = build_basis(mesh.verts, mesh.faces, identity_components())
  expressions, expression_names = build_expressions(mesh)
  mean = mesh.verts
  centre = 0.5 * (mean.min(0) + mean.max(0))
  scale = 1.0 / np.linalg.norm(mean - centre, axis=-1).max()
  # The bases are stored in float16 (a displacement of ~0.03 keeps 4 significant digits,
  # well under 0.001 mm), which halves the file; the loader reads them as float32.
  return dict(
    mean=((mean - centre) * scale).astype(np.float32),
    basis=(basis * scale).astype(np.float16),
    expression_basis=(expressions * scale).astype(np.float16),
    faces=mesh.faces,
    uvs=mesh.uvs.astype(np.float32),
    uv_faces=mesh.uv_faces,
    names=np.array(names),
    expression_names=np.array(expression_names),
    part_names=np.array([name for name, _, _ in mesh.parts]),
    part_ranges=np.array([(a, b) for _, a, b in mesh.parts], np.int32),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = Path(__file__).resolve().parents[1] / "sdsjax" / "data" / "head_model.npz"
  parser.add_argument("--out", type=Path, default=default)
  args = parser.parse_args()
  arrays = build()
  args.out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  print(
    f"wrote {args.out}: {arrays['mean'].shape[0]} vertices, {arrays['faces'].shape[0]} faces, "
    f"{arrays['basis'].shape[0]} identity and {arrays['expression_basis'].shape[0]} expression "
    f"components, {args.out.stat().st_size / 1e6:.1f} MB"
  )


if __name__ == "__main__":
  main()
