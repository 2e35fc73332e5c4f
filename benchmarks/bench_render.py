"""Benchmark of the soft renderer: forward + backward time and peak memory.

For each image size it renders the builtin head (K = 8, default RasterSettings, a 256²
texture, smooth normals), takes loss = sum(rgb) and its gradient w.r.t. the vertices and
the texture, and reports:

* compile_s: lowering + XLA compilation of the jitted value-and-grad;
* step_ms: median wall time of one forward + backward after compilation (and min);
* peak_mb: on CPU, the process's peak resident memory while running the compiled step
  (warm-up and timed runs) above the resident memory just before (Linux VmHWM reset
  through /proc/self/clear_refs; falls back to the getrusage maxrss delta, which can
  under-report when compilation peaked higher); on GPU, the device's peak_bytes_in_use;
* xla_temp_mb: XLA's own estimate of the temporary buffers of the compiled step.

Each size runs in its own subprocess so peaks do not mix. Runs unchanged on GPU.

Usage:
  python benchmarks/bench_render.py                 # 256 and 512, 1 view
  python benchmarks/bench_render.py --sizes 128 256 --views 4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

# Import the package from this checkout even when an editable install resolves it as a
# namespace package (then importlib.resources cannot find sdsjax/data).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def _read_status_kb(field: str) -> int | None:
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
      clear_refs.write("5")
    return True
  except OSError:
    return False


def run_worker(size: int, views: int, repeats: int, texture_size: int) -> dict:
  """Benchmarks one image size in this process and returns the figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from sdsjax import camera as camera_lib  # pylint: disable=g-import-not-at-top
  from sdsjax import morphable  # pylint: disable=g-import-not-at-top
  from sdsjax import raster  # pylint: disable=g-import-not-at-top
  from sdsjax import shading  # pylint: disable=g-import-not-at-top

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
  xla_temp_mb = None
  try:
    analysis = compiled.memory_analysis()
    if analysis is not None:
      xla_temp_mb = analysis.temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except
    pass

  def run_once():
    (value, overflow), grads = compiled(verts, texture)
    jax.block_until_ready(grads)
    return float(value), int(overflow), grads

  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  # The peak covers the first run too: it allocates the step's buffers.
  rss_before_kb = _read_status_kb("VmRSS")
  maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  reset = on_cpu and _reset_peak_rss()
  run_once()  # warm-up (allocations, thread pools), not timed
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    value, overflow, grads = run_once()
    times.append(time.perf_counter() - start)
  if on_cpu:
    hwm_kb = _read_status_kb("VmHWM") if reset else None
    if hwm_kb is not None and rss_before_kb is not None:
      peak_mb, peak_method = (hwm_kb - rss_before_kb) / 1024, "VmHWM-VmRSS"
    else:
      peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before_kb) / 1024
      peak_method = "maxrss delta"
  else:
    stats = device.memory_stats() or {}
    peak_mb = stats.get("peak_bytes_in_use", 0) / 2**20
    peak_method = "peak_bytes_in_use"
  grad_ok = all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  times.sort()
  return {
    "size": size,
    "views": views,
    "faces": int(faces.shape[0]),
    "vertices": int(verts.shape[0]),
    "texture": texture_size,
    "K": settings.faces_per_pixel,
    "bin_size": settings.resolved_bin_size(),
    "max_faces_per_bin": settings.resolved_max_faces_per_bin(int(faces.shape[0])),
    "overflow": overflow,
    "compile_s": round(compile_s, 2),
    "step_ms_median": round(1e3 * times[len(times) // 2], 1),
    "step_ms_min": round(1e3 * times[0], 1),
    "peak_mb": round(peak_mb, 1),
    "peak_method": peak_method,
    "xla_temp_mb": None if xla_temp_mb is None else round(xla_temp_mb, 1),
    "grads_finite": grad_ok,
    "loss": value,
    "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
    "jax": jax.__version__,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
  parser.add_argument("--views", type=int, default=1, help="cameras rendered under vmap")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--texture-size", type=int, default=256)
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker is not None:
    print(json.dumps(run_worker(args.worker, args.views, args.repeats, args.texture_size)))
    return

  results = []
  for size in args.sizes:
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--worker",
      str(size),
      "--views",
      str(args.views),
      "--repeats",
      str(args.repeats),
      "--texture-size",
      str(args.texture_size),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      print(proc.stderr, file=sys.stderr)
      raise SystemExit(f"benchmark worker for size {size} failed")
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

  print(
    json.dumps({"host": platform.node(), "cpu_count": os.cpu_count(), "results": results}, indent=1)
  )
  print()
  print(
    "| size | views | faces | K | bin | C | compile (s) | fwd+bwd median (ms) | "
    "min (ms) | peak mem (MB) | XLA temp (MB) | overflow | device |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(
      f"| {r['size']}² | {r['views']} | {r['faces']} | {r['K']} | {r['bin_size']} | "
      f"{r['max_faces_per_bin']} | {r['compile_s']} | {r['step_ms_median']} | "
      f"{r['step_ms_min']} | {r['peak_mb']} | {r['xla_temp_mb']} | {r['overflow']} | "
      f"{r['device']} |"
    )


if __name__ == "__main__":
  main()
