"""Renders the builtin head's pictures in docs/: expressions and identity samples.

    python scripts/render_builtin_pictures.py [--out-dir docs] [--model PATH.npz]

* `builtin_expressions.png`: one row per expression component at weight 1 (the first
  column is weight 2 from the front), a turntable from -60° to 60°;
* `builtin_sigma.png`: identity turntables (0°, 45°, 90°, 180°): the mean, three heads with
  weights ~ N(0, 2²) and three with weights ~ N(0, 3²) clipped to ±3.

Both use a plain demo texture painted in the model's texture atlas (skin, lips, mouth
interior, sclera, iris, pupil) so that open mouths and lids read; it is not part of the
model. The texture is painted from the build script's layout (scripts/build_head_model.py).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdsjax import camera as camera_lib
from sdsjax import export
from sdsjax import morphable
from sdsjax import raster
from sdsjax import shading

SKIN = (0.80, 0.64, 0.55)
LIPS = (0.72, 0.36, 0.36)
MOUTH = (0.22, 0.06, 0.07)
SOCKET = (0.55, 0.25, 0.25)
SCLERA = (0.95, 0.94, 0.92)
IRIS = (0.30, 0.45, 0.70)
PUPIL = (0.04, 0.04, 0.05)


def _build_script():
  path = Path(__file__).resolve().parent / "build_head_model.py"
  spec = importlib.util.spec_from_file_location("build_head_model", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def demo_texture(size: int = 512) -> np.ndarray:
  """(size, size, 3) texture for the builtin head's atlas (row 0 is v = 1)."""
  build = _build_script()
  mesh = build.build_mesh()
  tags, verts, faces = mesh.tags, mesh.verts, mesh.faces
  # Per-face colours: lips around the mouth line, the pouches dark, the rest skin.
  centre = verts[faces].mean(1)
  face_tag = lambda key: tags[key][faces].max(1)
  mouth = (face_tag("patch") == build.MOUTH_PATCH) & (face_tag("in_slit") > 0)
  half = build.mouth_slit_half_width(mesh)
  lip_band = 0.055 * np.sqrt(np.clip(1.0 - (centre[:, 0] / half) ** 2, 0.0, 1.0)) + 0.004
  lips = mouth & (np.abs(centre[:, 1] - build.MOUTH_Y - 0.005) < lip_band)
  pouch = face_tag("pouch") > 0
  colour = np.tile(np.array(SKIN), (len(faces), 1))
  colour[lips] = LIPS
  colour[pouch & (face_tag("patch") == build.MOUTH_PATCH)] = MOUTH
  colour[pouch & (face_tag("patch") != build.MOUTH_PATCH)] = SOCKET
  texture = np.tile(np.array(SKIN), (size, size, 1))
  uv = mesh.uvs[mesh.uv_faces] * size  # (F, 3, 2) in texels
  for f in np.nonzero(face_tag("eyeball") == 0)[0]:
    _fill_triangle(texture, uv[f], colour[f])
  # Eyeballs: the texture square shows the front view, pupil at its centre.
  v, u = np.meshgrid(
    1.0 - (np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij"
  )
  for u0, v0, side in build.EYEBALL_SQUARES:
    r = np.hypot(u - (u0 + side / 2), v - (v0 + side / 2)) / side  # 0.4 at the equator
    inside = (np.abs(u - u0 - side / 2) < side / 2) & (np.abs(v - v0 - side / 2) < side / 2)
    texture[inside] = SCLERA
    texture[inside & (r < 0.15)] = IRIS
    texture[inside & (r < 0.06)] = PUPIL
  return texture


def _fill_triangle(texture, tri, colour):
  """Paints one uv triangle (3, 2) in texel units, v up."""
  size = texture.shape[0]
  lo = np.floor(tri.min(0)).astype(int).clip(0, size - 1)
  hi = np.ceil(tri.max(0)).astype(int).clip(0, size - 1)
  us, vs = np.meshgrid(np.arange(lo[0], hi[0] + 1) + 0.5, np.arange(lo[1], hi[1] + 1) + 0.5)
  p = np.stack([us.ravel(), vs.ravel()], -1)
  a, b, c = tri
  det = (b[0] - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (b[1] - a[1])
  if abs(det) < 1e-12:
    return
  l1 = ((p[:, 0] - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (p[:, 1] - a[1])) / det
  l2 = ((b[0] - a[0]) * (p[:, 1] - a[1]) - (p[:, 0] - a[0]) * (b[1] - a[1])) / det
  pad = 0.6 / max(abs(det), 1.0) ** 0.5  # a little over the edges, so seams do not show
  inside = (l1 >= -pad) & (l2 >= -pad) & (l1 + l2 <= 1 + pad)
  cols, rows = (p[inside, 0] - 0.5).astype(int), (p[inside, 1] - 0.5).astype(int)
  texture[size - 1 - rows, cols] = colour


@functools.partial(jax.jit, static_argnames=("settings",))
def _render(verts, faces, uvs, uv_faces, texture, azimuth, elevation, distance, target, settings):
  eye = camera_lib.orbit_position(azimuth, elevation, distance) + target
  cam = camera_lib.look_at(eye, target=target, fov_deg=30.0)
  eye_dir = (cam.eye - target) / jnp.linalg.norm(cam.eye - target)
  right = jnp.cross(eye_dir, jnp.array([0.0, 1.0, 0.0]))
  light = camera_lib.default_light(
    direction=eye_dir + 0.7 * jnp.array([0.0, 1.0, 0.0]) - 0.5 * right, ambient=0.3, diffuse=0.7
  )
  return shading.render_soft(
    verts, faces, cam, light, settings, texture=texture, uvs=uvs, uv_faces=uv_faces
  ).rgb


def render_rows(model, rows, views, size, distance, target, texture):
  """(len(rows) · len(views), S, S, 3): each (V, 3) vertex array from each view."""
  pixel = 2.0 / size
  # A small depth tolerance keeps the lids and the eyeballs 1.5 mm behind them apart.
  settings = raster.RasterSettings(
    image_size=size, sigma=0.5 * pixel * pixel, depth_tolerance=0.003
  )
  args = (model.faces, model.uvs, model.uv_faces, jnp.asarray(texture, jnp.float32))
  target = jnp.asarray(target, jnp.float32)
  images = []
  for verts in rows:
    for azimuth, elevation in views:
      image = _render(
        jnp.asarray(verts, jnp.float32), *args, azimuth, elevation, distance, target, settings
      )
      images.append(np.asarray(image))
  return np.stack(images)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  root = Path(__file__).resolve().parents[1]
  parser.add_argument("--out-dir", type=Path, default=root / "docs")
  parser.add_argument("--model", default="builtin", help="builtin | PATH.npz (the builtin layout)")
  parser.add_argument("--size", type=int, default=176)
  args = parser.parse_args()
  model = morphable.load_model(args.model, 50, 14)
  texture = demo_texture()
  k = model.num_components
  mean = np.asarray(model.mean)
  # Expressions: weight 1 turntable, plus weight 2 from the front (first column).
  views = [(0.0, 5.0), (-60.0, 5.0), (-30.0, 5.0), (0.0, 5.0), (30.0, 5.0), (60.0, 5.0)]
  rows = []
  for e in range(model.num_expressions):
    for weight, view in zip((2.0,) + (1.0,) * 5, views):
      x = np.zeros(model.num_expressions)
      x[e] = weight
      verts = morphable.vertices(model, jnp.zeros(k), jnp.asarray(x, jnp.float32))
      rows.append((np.asarray(verts), view))
  images = []
  for verts, view in rows:  # one render per (row, view)
    images.append(render_rows(model, [verts], [view], args.size, 1.75, (0, 0.0, 0.3), texture))
  grid = export.image_grid(np.concatenate(images), columns=len(views))
  export.write_png(args.out_dir / "builtin_expressions.png", grid)
  print("rows:", ", ".join(model.expression_names))
  # Identity: the mean, N(0, 2²) and N(0, 3²) clipped to ±3.
  rng = np.random.default_rng(0)
  weights = [np.zeros(k)]
  weights += [2.0 * rng.normal(size=k) for _ in range(3)]
  weights += [np.clip(3.0 * rng.normal(size=k), -3.0, 3.0) for _ in range(3)]
  heads = [mean + np.einsum("k,kvc->vc", w, np.asarray(model.basis)) for w in weights]
  views = [(0.0, 5.0), (45.0, 5.0), (90.0, 5.0), (180.0, 5.0)]
  images = render_rows(model, heads, views, args.size, 3.9, (0, 0.05, 0), texture)
  grid = export.image_grid(images, columns=len(views))
  export.write_png(args.out_dir / "builtin_sigma.png", grid)
  print(
    f"wrote {args.out_dir / 'builtin_expressions.png'} and {args.out_dir / 'builtin_sigma.png'}"
  )


if __name__ == "__main__":
  main()
