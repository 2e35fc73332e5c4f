"""The soft renderer: forward + backward time and peak memory.

The grid is --sizes × --views. Each case renders the builtin head (K = 8, default
RasterSettings, a 256² texture, smooth normals) from `views` cameras under vmap, takes
loss = sum(rgb) and its gradient w.r.t. the vertices and the texture, and reports:

* compile_s: lowering + XLA compilation of the jitted value-and-grad;
* step_ms: median wall time of one forward + backward after compilation (and min);
* peak_mb: on CPU, the process's peak resident memory while running the compiled step (warm-up
  and timed runs) above the resident memory just before (`common.RssPeak`); on GPU, the
  device's peak_bytes_in_use;
* xla_temp_mb: XLA's own estimate of the temporary buffers of the compiled step.

Each case runs in its own child process (`common.run_child`), so peaks do not mix. Runs
unchanged on GPU.

    python -m benchmarks.bench_render                 # 256 and 512, 1 view
    python -m benchmarks.bench_render --sizes 128 256 --views 1 4 --repeats 5
"""

from __future__ import annotations

import argparse
import time

from . import common

log = common.logger("bench_render")


def run_case(size: int, views: int, repeats: int, texture_size: int) -> dict:
  """Benchmarks one case in this process and returns the figures."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sdsjax import camera as camera_lib
  from sdsjax import morphable
  from sdsjax import raster
  from sdsjax import shading

  model = morphable.load_model("builtin", num_components=4)
  verts, faces = model.mean, model.faces
  texture = jnp.full((texture_size, texture_size, 3), 0.6, jnp.float32)
  settings = raster.RasterSettings(image_size=size, faces_per_pixel=8)
  azimuths = np.linspace(-60.0, 60.0, views) if views > 1 else np.array([20.0])
  cams = [camera_lib.orbit_camera(a, 10.0, 2.8, 40.0) for a in azimuths]
  cam_batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *cams)
  lights = jax.vmap(lambda c: camera_lib.default_light(c))(cam_batch)

  def loss(v, tex):
    def one(cam, light):
      out = shading.render_soft(
        v, faces, cam, light, settings, texture=tex, uvs=model.uvs, uv_faces=model.uv_faces
      )
      return jnp.sum(out.rgb), out.overflow

    sums, overflow = jax.vmap(one)(cam_batch, lights)
    return jnp.sum(sums), jnp.sum(overflow)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  start = time.perf_counter()
  compiled = step.lower(verts, texture).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  result = {}

  def run_once():
    (value, overflow), grads = compiled(verts, texture)
    jax.block_until_ready(grads)
    result.update(loss=float(value), overflow=int(overflow), grads=grads)

  on_cpu = jax.devices()[0].platform == "cpu"
  peak = common.RssPeak()  # the peak covers the first run too: it allocates the step's buffers
  stats = common.summary(common.alternate({"render": run_once}, repeats, warmup=1)["render"])
  if on_cpu:
    peak_mb, peak_method = peak.mb()
  else:
    peak_mb, peak_method = common.jax_device_peak_mb() or 0.0, "peak_bytes_in_use"
  return {
    "faces": int(faces.shape[0]),
    "vertices": int(verts.shape[0]),
    "texture": texture_size,
    "K": settings.faces_per_pixel,
    "bin_size": settings.resolved_bin_size(),
    "max_faces_per_bin": settings.resolved_max_faces_per_bin(int(faces.shape[0])),
    "overflow": result["overflow"],
    "compile_s": round(compile_s, 2),
    "step_ms_median": round(1e3 * stats["median_s"], 1),
    "step_ms_min": round(1e3 * stats["min_s"], 1),
    "peak_mb": round(peak_mb, 1),
    "peak_method": peak_method,
    "xla_temp_mb": None if analysis is None else round(analysis.temp_size_in_bytes / 2**20, 1),
    "grads_finite": all(bool(jnp.all(jnp.isfinite(g))) for g in result["grads"]),
    "loss": result["loss"],
    "device": common.device_name(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
  parser.add_argument("--views", type=int, nargs="+", default=[1], help="cameras under vmap")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--texture-size", type=int, default=256)
  parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)  # SIZE VIEWS
  args = parser.parse_args()
  if args.child:
    common.child_result(run_case(*args.child, args.repeats, args.texture_size))
    return

  def measure(size: int, views: int) -> dict:
    flags = ["--child", size, views, "--repeats", args.repeats, "--texture-size", args.texture_size]
    out = common.run_child("benchmarks.bench_render", flags)
    if "error" in out:
      raise RuntimeError(out["error"])
    return out

  info = common.run_info("benchmarks.bench_render")
  rows = common.run_grid(measure, common.grid(size=args.sizes, views=args.views), log)
  header = ["size", "views", "faces", "K", "bin", "C", "compile (s)", "fwd+bwd median (ms)"]
  header += ["min (ms)", "peak mem (MB)", "XLA temp (MB)", "overflow", "device"]
  keys = ["faces", "K", "bin_size", "max_faces_per_bin", "compile_s", "step_ms_median"]
  keys += ["step_ms_min", "peak_mb", "xla_temp_mb", "overflow", "device"]
  table = common.markdown_table(
    header,
    [[f"{r['size']}²", r["views"], *(r.get(k, r.get("error", "–")) for k in keys)] for r in rows],
  )
  common.emit(dict(info, results=rows), table)


if __name__ == "__main__":
  main()
