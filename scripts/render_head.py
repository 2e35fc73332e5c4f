"""Renders a turntable PNG of a morphable head at a few weight vectors.

Rows are weight vectors (the mean, then one row per seed with weights ~ N(0, scale²));
columns are views at evenly spaced azimuths (0° faces the camera), rendered with
`sdsjax.shading.render_soft` under a light from above the camera.

    python scripts/render_head.py --out head_turntable.png [--model builtin] [--seeds 3]

`--blend softras` renders with SoftRas' depth softmax instead of the default layered
compositing (see `sdsjax.raster`), e.g. to compare the two.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sdsjax import camera as camera_lib
from sdsjax import export
from sdsjax import morphable
from sdsjax import raster
from sdsjax import shading


@functools.partial(jax.jit, static_argnames=("settings", "distance", "fov_deg", "elevation_deg"))
def render_views(
  head: morphable.MorphableModel,
  weights: jax.Array,
  azimuths: jax.Array,
  settings: raster.RasterSettings,
  distance: float,
  fov_deg: float,
  elevation_deg: float,
) -> jax.Array:
  """(N, S, S, 3) renders of one weight vector (K,) at N azimuths (degrees)."""
  verts = morphable.vertices(head, weights)

  def one(azimuth):
    cam = camera_lib.orbit_camera(azimuth, elevation_deg, distance, fov_deg)
    # Light from above and to the right of the eye, so the face reads in relief.
    eye_dir = cam.eye / jnp.linalg.norm(cam.eye)
    right = jnp.cross(eye_dir, jnp.array([0.0, 1.0, 0.0]))
    light = camera_lib.default_light(
      direction=eye_dir + 0.6 * jnp.array([0.0, 1.0, 0.0]) - 0.4 * right, ambient=0.25, diffuse=0.75
    )
    return shading.render_soft(verts, head.faces, cam, light, settings).rgb

  return jax.lax.map(one, azimuths)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--model", default="builtin", help="builtin | flame:PATH | ict:PATH | PATH.npz"
  )
  parser.add_argument("--num-components", type=int, default=50)
  parser.add_argument("--out", default="head_turntable.png")
  parser.add_argument("--seeds", type=int, default=3, help="random rows after the mean row")
  parser.add_argument("--scale", type=float, default=1.0, help="std of the random weights")
  parser.add_argument("--views", type=int, default=8)
  parser.add_argument("--size", type=int, default=192)
  parser.add_argument("--distance", type=float, default=2.8)
  parser.add_argument("--fov", type=float, default=40.0)
  parser.add_argument("--elevation", type=float, default=10.0)
  parser.add_argument("--blend", choices=raster.BLENDS, default="layered")
  args = parser.parse_args()

  head = morphable.load_model(args.model, args.num_components)
  k = head.num_components
  weights = [jnp.zeros(k)] + [
    args.scale * jax.random.normal(jax.random.PRNGKey(seed), (k,)) for seed in range(args.seeds)
  ]
  azimuths = jnp.arange(args.views, dtype=jnp.float32) * (360.0 / args.views)
  pixel = 2.0 / args.size
  settings = raster.RasterSettings(
    image_size=args.size, sigma=0.5 * pixel * pixel, blend=args.blend
  )
  rows = [
    np.asarray(render_views(head, w, azimuths, settings, args.distance, args.fov, args.elevation))
    for w in weights
  ]
  grid = export.image_grid(np.concatenate(rows, 0), columns=args.views)
  export.write_png(args.out, grid)
  print(f"wrote {args.out}: {len(rows)} rows × {args.views} views at {args.size}²")


if __name__ == "__main__":
  main()
