"""Builds the builtin head, `sdsjax/data/head_model.npz`, from analytic shapes.

Deterministic (no randomness): running it twice writes the same arrays.

    python scripts/build_head_model.py [--out sdsjax/data/head_model.npz]

Construction (units: 1 ≈ 10 cm, +y up, face towards +z, ear canals near y = 0):

1. A *base surface*: every column at azimuth θ (0 = face, +x to the model's left) has a
   profile curve from the top pole down to the bottom of the neck, spline-interpolated
   through 13 control points. Each control point's radius at θ comes from a
   superellipse through the front, side and back key profiles below, so horizontal
   sections are rounded boxes that are flatter at the face.
2. *Features* are smooth displacements of that surface: eye sockets and eyeballs, brow
   ridge, nose, lips, chin, cheekbones and ears (height fields on the side of the head).
3. *Sampling*: each column is resampled by weighted arc length of the final profile, with
   more rows over the face, and columns are denser around the face and ears.
4. *Components*: 50 named displacement fields, each localised by smooth Gaussian windows,
   Gram–Schmidt orthogonalised in the listed order (so earlier names keep their meaning)
   and scaled so weight ±1 moves the most affected vertex by the listed amplitude.
5. Normalisation to the world frame of docs/design.md (bounding-box centre at 0, bounding
   radius 1), applied to mean and basis alike.

The layout of the file is documented in docs/head_model.md.
"""

from __future__ import annotations

import argparse
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


def horizontal_normal(p):
  """(..., 3) unit vectors pointing away from the vertical axis."""
  h = p * np.array([1.0, 0.0, 1.0])
  return h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-9)


def facing_front(p):
  """1 where the surface faces the front (+z), fading to 0 at the sides."""
  return smoothstep(0.15, 0.55, horizontal_normal(p)[..., 2])


def vec(x=0.0, y=0.0, z=0.0):
  return np.array([x, y, z], np.float64)


# ----------------------------------------------------------------------------------------
# Mean shape.


def base_surface(theta, t):
  """Base surface before features.

  Args:
    theta: (C,) azimuths in radians, 0 at the face, increasing towards +x.
    t: (S,) profile parameters in [0, 1] (0 top pole, 1 bottom of the neck).

  Returns:
    (C, S, 3) points.
  """
  s, c = np.abs(np.sin(theta))[:, None], np.cos(theta)[:, None]
  front = c >= 0
  other = np.where(front[..., None], FRONT[None], BACK[None])  # (C, M, 2)
  exponent = np.where(front, FRONT_EXPONENT[None], BACK_EXPONENT[None])
  r_side, r_other = np.maximum(SIDE[None, :, 0], 1e-6), np.maximum(other[..., 0], 1e-6)
  radius = ((s / r_side) ** exponent + (np.abs(c) / r_other) ** exponent) ** (-1 / exponent)
  radius[:, 0] = 0.0
  height = SIDE[None, :, 1] + (other[..., 1] - SIDE[None, :, 1]) * c**2
  knots = np.linspace(0.0, 1.0, FRONT.shape[0])
  # Clamped slope at the pole keeps the top of the head smooth.
  pole_slope = radius[:, 1] / knots[1]
  radius_t = CubicSpline(knots, radius, axis=1, bc_type=((1, pole_slope), "not-a-knot"))(t)
  flat = np.zeros(len(theta))
  height_t = CubicSpline(knots, height, axis=1, bc_type=((1, flat), "not-a-knot"))(t)
  direction = np.stack([np.sin(theta), np.zeros_like(theta), np.cos(theta)], -1)
  return radius_t[..., None] * direction[:, None, :] + height_t[..., None] * vec(y=1.0)


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
  """Facial features as displacements of the base surface; p is (..., 3)."""
  front = facing_front(p)
  out = np.zeros_like(p)
  # Eye sockets with the eyeball bulging inside, and the brow ridge above.
  eye = vec(0.32, 0.11, 0.0)
  socket = gauss_pair(p, eye, (0.15, 0.095, 10.0))
  eyeball = gauss_pair(p, eye, (0.075, 0.045, 10.0))
  out[..., 2] += front * (-0.15 * socket + 0.07 * eyeball)
  brow = gauss_pair(p, vec(0.30, 0.27, 0.0), (0.20, 0.05, 10.0))
  out[..., 2] += front * 0.04 * brow
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
  # Lips, with a mouth line between them, and the chin.
  upper = gauss(p, vec(0.0, -0.40, 0.0), (0.17, 0.045, 10.0))
  lower = gauss(p, vec(0.0, -0.54, 0.0), (0.15, 0.05, 10.0))
  line = gauss(p, vec(0.0, -0.47, 0.0), (0.19, 0.012, 10.0))
  sulcus = gauss(p, vec(0.0, -0.66, 0.0), (0.15, 0.04, 10.0))
  chin = gauss(p, vec(0.0, -0.84, 0.0), (0.16, 0.08, 10.0))
  out[..., 2] += front * (0.07 * upper + 0.06 * lower - 0.04 * line - 0.03 * sulcus + 0.05 * chin)
  # Cheekbones.
  cheek = gauss_pair(p, vec(0.50, -0.02, 0.0), (0.13, 0.09, 10.0))
  outward = horizontal_normal(p)
  out += 0.035 * cheek[..., None] * outward * smoothstep(-0.1, 0.3, outward[..., 2:3])
  # Ears.
  out += ear_height(p)[..., None] * horizontal_normal(p)
  return out


def sample_grid():
  """The mean's vertices (1 + (R - 1)·C, 3): the pole, then ring by ring; and azimuths (C,)."""
  # Denser columns over the face and the ears: invert the cumulative density.
  fine = np.linspace(-np.pi, np.pi, 4097)
  density = (
    1.0
    + 0.9 * np.exp(-0.5 * (fine / 0.6) ** 2)
    + 0.8 * np.exp(-0.5 * ((np.abs(fine) - 1.72) / 0.22) ** 2)
  )
  cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]))])
  cdf /= cdf[-1]
  theta = np.interp(np.arange(NUM_COLUMNS) / NUM_COLUMNS, cdf, fine)  # theta[0] = -π (back)
  t = np.linspace(0.0, 1.0, DENSE)
  base = base_surface(theta, t)
  dense = base + feature_displacement(base)  # (C, S, 3)
  # Resample each column by arc length weighted towards the face rows.
  seg = np.linalg.norm(np.diff(dense, axis=1), axis=-1)
  mid_y = 0.5 * (dense[:, 1:, 1] + dense[:, :-1, 1])
  weight = 1.0 + 1.1 * np.exp(-0.5 * ((mid_y + 0.25) / 0.45) ** 2)
  weight *= 1.0 - 0.35 * smoothstep(-1.15, -1.5, mid_y)  # sparser neck
  arc = np.concatenate([np.zeros((NUM_COLUMNS, 1)), np.cumsum(seg * weight, 1)], 1)
  rows = []
  for j in range(NUM_COLUMNS):
    target = np.linspace(0.0, arc[j, -1], NUM_ROWS)
    tj = np.interp(target, arc[j], t)
    b = base_surface(theta[j : j + 1], tj)[0]
    rows.append(b + feature_displacement(b))
  grid = np.stack(rows, 0)  # (C, R, 3)
  pole = grid[:, 0].mean(0, keepdims=True)
  ring = grid[:, 1:].transpose(1, 0, 2).reshape(-1, 3)  # row-major rings
  return np.concatenate([pole, ring], 0), theta


def grid_topology():
  """Faces (F, 3), uvs (T, 2) and uv_faces (F, 3) of the pole + rings grid.

  Vertex 0 is the top pole; vertex 1 + (r - 1)·C + j is ring r ≥ 1, column j. The UV
  layout is the grid itself: u = j / C (seam at the back, column C repeats column 0 at
  u = 1), v = 1 - r / (R - 1) (top at v = 1); the pole gets one uv per column.
  """
  c, r = NUM_COLUMNS, NUM_ROWS
  vid = lambda row, col: 1 + (row - 1) * c + col % c
  uid = lambda row, col: c + (row - 1) * (c + 1) + col  # col in [0, C]
  faces, uv_faces = [], []
  for j in range(c):
    faces.append((0, vid(1, j), vid(1, j + 1)))
    uv_faces.append((j, uid(1, j), uid(1, j + 1)))
  for row in range(1, r - 1):
    for j in range(c):
      faces.append((vid(row, j), vid(row + 1, j), vid(row, j + 1)))
      faces.append((vid(row, j + 1), vid(row + 1, j), vid(row + 1, j + 1)))
      uv_faces.append((uid(row, j), uid(row + 1, j), uid(row, j + 1)))
      uv_faces.append((uid(row, j + 1), uid(row + 1, j), uid(row + 1, j + 1)))
  pole_uv = np.stack([(np.arange(c) + 0.5) / c, np.ones(c)], -1)
  uu, vv = np.meshgrid(np.arange(c + 1) / c, 1.0 - np.arange(1, r) / (r - 1))
  uvs = np.concatenate([pole_uv, np.stack([uu.ravel(), vv.ravel()], -1)], 0)
  return np.array(faces, np.int32), uvs.astype(np.float32), np.array(uv_faces, np.int32)


def vertex_normals(verts, faces):
  tri = verts[faces]
  n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  out = np.zeros_like(verts)
  for k in range(3):
    np.add.at(out, faces[:, k], n)
  return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------------
# Components. Each is (name, amplitude, field): field(p, n) maps the mean's points p (V, 3)
# and unit normals n (V, 3) to a displacement (V, 3); amplitude is the largest vertex
# displacement at weight 1 (model units, 0.01 ≈ 1 mm), applied after orthogonalisation.


def side_centre(p, centre):
  """(V, 3) the centre of a mirrored pair of features on each point's own side."""
  return np.asarray(centre) * np.stack(
    [np.sign(p[..., 0]), np.ones(p.shape[:-1]), np.ones(p.shape[:-1])], -1
  )


def shift(direction, window):
  """Moves the windowed region along a fixed direction."""
  return lambda p, n: window(p)[..., None] * np.asarray(direction)


def bulge(window):
  """Pushes the windowed region out along the surface normal."""
  return lambda p, n: window(p)[..., None] * n


def scale_about(centre, axes, window, pair=False):
  """Scales the windowed region about `centre` (or its mirror image on each side)."""

  def f(p, n):
    origin = side_centre(p, centre) if pair else np.asarray(centre)
    return (p - origin) * np.asarray(axes) * window(p)[..., None]

  return f


def per_axis(fx=None, fy=None, fz=None):
  """A displacement given per coordinate as functions of p (None is zero)."""

  def f(p, n):
    out = np.zeros_like(p)
    for k, g in enumerate((fx, fy, fz)):
      if g is not None:
        out[..., k] = g(p)
    return out

  return f


def _components():
  x_ = lambda p: p[..., 0]
  y_ = lambda p: p[..., 1]
  side = lambda p: np.sign(p[..., 0])
  head = lambda p: smoothstep(-1.15, -0.85, p[..., 1])  # above the neck
  neck = lambda p: 1.0 - smoothstep(-1.35, -0.85, p[..., 1])
  eye = vec(0.32, 0.11, 0.85)
  eyes = lambda p: gauss_pair(p, eye, (0.14, 0.10, 0.25))
  nose = lambda p: gauss(p, vec(0.0, -0.08, 1.0), (0.12, 0.15, 0.35))
  tip = vec(0.0, -0.20, 1.22)
  ear = vec(0.80, -0.03, -0.10)
  ears = lambda p: gauss_pair(p, ear, (0.20, 0.28, 0.22)) * smoothstep(0.5, 0.7, np.abs(p[..., 0]))
  up, down, forward, back, left = vec(y=1), vec(y=-1), vec(z=1), vec(z=-1), vec(x=1)

  def ear_rotation(p, n):  # rotates each ear in its y-z plane, top going forward
    turn = np.stack([np.zeros(p.shape[:-1]), -(p[..., 2] - ear[2]), p[..., 1] - ear[1]], -1)
    return turn / 0.3 * ears(p)[..., None]

  return [
    # Global proportions first, so the local components below are what remains.
    ("head_width", 0.07, per_axis(fx=lambda p: x_(p) * head(p))),
    ("head_height", 0.07, per_axis(fy=lambda p: (y_(p) + 0.2) * head(p))),
    ("head_depth", 0.07, per_axis(fz=lambda p: (p[..., 2] + 0.05) * head(p))),
    ("face_length", 0.05, per_axis(fy=lambda p: -softplus(0.1 - y_(p), 0.15) * head(p))),
    (
      "jaw_width",
      0.06,
      per_axis(fx=lambda p: x_(p) * gauss(p, vec(0, -0.75, 0.2), (10, 0.2, 0.6)) * head(p)),
    ),
    # Cranium and forehead.
    ("crown_height", 0.07, shift(up, lambda p: gauss(p, vec(0, 1.3, -0.1), (0.6, 0.35, 0.7)))),
    ("back_of_head", 0.07, shift(back, lambda p: gauss(p, vec(0, 0.35, -1.05), (0.5, 0.4, 0.35)))),
    (
      "forehead_slope",
      0.05,
      per_axis(
        fz=lambda p: (
          -np.clip(y_(p) - 0.25, 0, None)
          * facing_front(p)
          * np.exp(-0.5 * ((y_(p) - 0.6) / 0.3) ** 2)
        )
      ),
    ),
    (
      "forehead_width",
      0.05,
      per_axis(fx=lambda p: side(p) * gauss_pair(p, vec(0.7, 0.6, 0.3), (0.25, 0.35, 0.45))),
    ),
    ("brow_ridge", 0.03, bulge(lambda p: gauss_pair(p, vec(0.3, 0.28, 0.95), (0.18, 0.05, 0.2)))),
    ("temples", 0.035, bulge(lambda p: gauss_pair(p, vec(0.72, 0.30, 0.35), (0.15, 0.18, 0.22)))),
    # Eyes.
    ("eye_spacing", 0.035, per_axis(fx=lambda p: side(p) * eyes(p))),
    (
      "eye_size",
      0.025,
      scale_about(eye, (1, 1, 0), lambda p: gauss_pair(p, eye, (0.12, 0.08, 0.25)), pair=True),
    ),
    ("eye_depth", 0.04, shift(back, lambda p: gauss_pair(p, eye, (0.09, 0.06, 0.2)))),
    ("eye_height", 0.035, shift(up, eyes)),
    ("eye_tilt", 0.025, per_axis(fy=lambda p: (np.abs(x_(p)) - 0.32) / 0.12 * eyes(p))),
    # Nose.
    ("nose_length", 0.045, per_axis(fy=lambda p: -(0.17 - y_(p)).clip(0) * nose(p) / 0.4)),
    (
      "nose_width",
      0.03,
      per_axis(fx=lambda p: x_(p) / 0.12 * gauss(p, vec(0, -0.18, 1.05), (0.15, 0.1, 0.3))),
    ),
    ("nose_bridge", 0.035, shift(forward, lambda p: gauss(p, vec(0, 0.05, 1), (0.06, 0.1, 0.3)))),
    ("nose_tip", 0.045, shift(forward, lambda p: gauss(p, tip, (0.07, 0.07, 0.2)))),
    (
      "nose_tip_upturn",
      0.035,
      shift(up, lambda p: gauss(p, tip + vec(y=-0.03), (0.07, 0.06, 0.15))),
    ),
    (
      "nostril_flare",
      0.025,
      per_axis(fx=lambda p: side(p) * gauss_pair(p, vec(0.13, -0.22, 1.0), (0.05, 0.05, 0.2))),
    ),
    ("nose_hump", 0.025, shift(forward, lambda p: gauss(p, vec(0, -0.03, 1.1), (0.05, 0.05, 0.3)))),
    # Cheeks, jaw and chin.
    (
      "cheekbones",
      0.045,
      bulge(lambda p: gauss_pair(p, vec(0.52, -0.02, 0.65), (0.13, 0.09, 0.2))),
    ),
    (
      "cheek_fullness",
      0.05,
      bulge(lambda p: gauss_pair(p, vec(0.48, -0.38, 0.65), (0.15, 0.15, 0.25))),
    ),
    ("jaw_angle", 0.045, bulge(lambda p: gauss_pair(p, vec(0.6, -0.82, -0.05), (0.12, 0.12, 0.2)))),
    ("chin_length", 0.05, shift(down, lambda p: gauss(p, vec(0, -0.95, 0.8), (0.35, 0.22, 0.4)))),
    (
      "chin_protrusion",
      0.05,
      shift(forward, lambda p: gauss(p, vec(0, -0.87, 0.95), (0.2, 0.13, 0.3))),
    ),
    (
      "chin_width",
      0.035,
      per_axis(fx=lambda p: x_(p) / 0.15 * gauss(p, vec(0, -0.86, 0.9), (0.2, 0.15, 0.3))),
    ),
    # Mouth.
    (
      "mouth_width",
      0.03,
      per_axis(fx=lambda p: x_(p) / 0.15 * gauss(p, vec(0, -0.47, 1.0), (0.22, 0.08, 0.3))),
    ),
    ("upper_lip", 0.03, shift(forward, lambda p: gauss(p, vec(0, -0.40, 1), (0.15, 0.04, 0.3)))),
    ("lower_lip", 0.03, shift(forward, lambda p: gauss(p, vec(0, -0.55, 1), (0.14, 0.045, 0.3)))),
    (
      "mouth_protrusion",
      0.03,
      shift(forward, lambda p: gauss(p, vec(0, -0.5, 1.0), (0.3, 0.2, 0.4))),
    ),
    ("philtrum_length", 0.04, shift(down, lambda p: gauss(p, vec(0, -0.6, 0.9), (0.35, 0.2, 0.4)))),
    (
      "mouth_corners",
      0.025,
      shift(up, lambda p: gauss_pair(p, vec(0.2, -0.48, 0.9), (0.05, 0.05, 0.2))),
    ),
    # Finer facial details.
    (
      "nose_bridge_width",
      0.025,
      per_axis(fx=lambda p: x_(p) / 0.08 * gauss(p, vec(0, 0.05, 1.0), (0.08, 0.1, 0.3))),
    ),
    (
      "brow_height",
      0.03,
      shift(up, lambda p: gauss_pair(p, vec(0.3, 0.28, 0.9), (0.18, 0.08, 0.25))),
    ),
    (
      "nasolabial_folds",
      0.02,
      bulge(lambda p: -gauss_pair(p, vec(0.2, -0.33, 0.95), (0.06, 0.12, 0.2))),
    ),
    # Ears.
    ("ear_size", 0.05, scale_about(ear, (1, 3.3, 3.3), ears, pair=True)),
    ("ear_protrusion", 0.06, lambda p, n: (ear_height(p) / 0.25)[..., None] * horizontal_normal(p)),
    ("ear_height", 0.04, shift(up, ears)),
    (
      "ear_lobes",
      0.03,
      shift(down, lambda p: gauss_pair(p, vec(0.8, -0.28, -0.08), (0.1, 0.06, 0.07))),
    ),
    ("ear_angle", 0.04, ear_rotation),
    # Neck.
    (
      "neck_thickness",
      0.05,
      per_axis(fx=lambda p: x_(p) * neck(p), fz=lambda p: (p[..., 2] + 0.1) * neck(p)),
    ),
    ("neck_lean", 0.06, shift(forward, lambda p: smoothstep(-1.0, -1.85, y_(p)))),
    ("under_chin", 0.04, bulge(lambda p: gauss(p, vec(0, -1.07, 0.55), (0.3, 0.1, 0.2)))),
    # Asymmetries (odd in x, so orthogonal to every symmetric component).
    ("jaw_shift", 0.04, shift(left, lambda p: gauss(p, vec(0, -0.8, 0.5), (0.6, 0.25, 0.6)))),
    (
      "nose_deviation",
      0.025,
      shift(left, lambda p: gauss(p, vec(0, -0.12, 1.1), (0.1, 0.15, 0.3))),
    ),
    ("eye_asymmetry", 0.02, shift(up, lambda p: eyes(p) * side(p))),
    ("face_asymmetry", 0.04, per_axis(fz=lambda p: x_(p) * facing_front(p) * head(p))),
  ]


def build_basis(mean, faces):
  """(K, V, 3) orthogonal, scaled components and their names."""
  normals = vertex_normals(mean, faces)
  names, vectors = [], []
  for name, amplitude, field in _components():
    d = field(mean, normals).reshape(-1)
    for prev in vectors:  # Gram–Schmidt, fixed order
      d = d - prev * (prev @ d) / (prev @ prev)
    d = d.reshape(-1, 3)
    d = d * amplitude / np.linalg.norm(d, axis=-1).max()
    names.append(name)
    vectors.append(d.reshape(-1))
  return np.stack(vectors).reshape(len(names), -1, 3), tuple(names)


def build():
  mean, _ = sample_grid()
  faces, uvs, uv_faces = grid_topology()
  basis, names = build_basis(mean, faces)
  centre = 0.5 * (mean.min(0) + mean.max(0))
  mean = mean - centre
  scale = 1.0 / np.linalg.norm(mean, axis=-1).max()
  return dict(
    mean=(mean * scale).astype(np.float32),
    basis=(basis * scale).astype(np.float32),
    faces=faces,
    uvs=uvs,
    uv_faces=uv_faces,
    names=np.array(names),
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
    f"{arrays['basis'].shape[0]} components, {args.out.stat().st_size / 1e6:.1f} MB"
  )


if __name__ == "__main__":
  main()
