"""Single ops at SD-1.5 shapes, JAX on CPU against PyTorch: where the models' CPU time goes.

Convolutions at the shapes of the UNet (64×64 latents, batch 2) and the VAE encoder (512²,
batch 1), forward, float32: NCHW `torch.nn.functional.conv2d`, NHWC `lax.conv_general_dilated`
(XLA's own), and sdsjax's `Conv2D` (its CPU algorithm, `resnet.conv_algorithm`, in the "path"
column). Then GEMMs at the UNet's shapes. Freed memory stays mapped for both
(sdsjax/host_memory.py). Prints JSON, then a markdown table.
Run: `python benchmarks/bench_ops.py --threads 2`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import torch

from sdsjax import host_memory
from sdsjax.models.resnet import Conv2D
from sdsjax.models.resnet import conv_algorithm

CONVS = [
  (2, 64, 320, 320, 3),
  (2, 32, 640, 640, 3),
  (2, 16, 1280, 1280, 3),
  (2, 8, 1280, 1280, 3),
  (2, 64, 640, 320, 3),
  (2, 64, 320, 320, 1),  # UNet
  (1, 512, 128, 128, 3),
  (1, 256, 256, 256, 3),
  (1, 128, 512, 512, 3),
  (1, 64, 512, 512, 3),
  (1, 512, 3, 128, 3),
]  # VAE; (batch, size, in, out, kernel)
GEMMS = [
  (8192, 320, 320),
  (8192, 320, 2560),
  (8192, 1280, 320),
  (2048, 640, 640),
  (512, 1280, 1280),
]  # (M, K, N)


def best_time(fn, args, repeats: int) -> float:
  """Best wall time of `fn(*args)` over `repeats` runs after one warm-up, in seconds."""
  fn(*args)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args)
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  host_memory.keep_freed_memory()
  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  rows = []
  conv_jax = jax.jit(
    lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  for batch, size, cin, cout, k in CONVS:
    x = rng.standard_normal((batch, size, size, cin), np.float32)
    w = (0.02 * rng.standard_normal((k, k, cin, cout))).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    with torch.no_grad():
      t_torch = best_time(
        lambda a, b: torch.nn.functional.conv2d(a, b, padding=k // 2), (xt, wt), args.repeats
      )
    t_jax = best_time(lambda a, b: conv_jax(a, b).block_until_ready(), (x, w), args.repeats)
    conv = Conv2D(cout, k, padding=k // 2)
    params = {"params": {"kernel": w, "bias": np.zeros(cout, np.float32)}}
    conv_sdsjax = jax.jit(conv.apply)
    t_sdsjax = best_time(
      lambda p, a: conv_sdsjax(p, a).block_until_ready(), (params, x), args.repeats
    )
    rows.append(
      {
        "op": f"conv{k}x{k} {batch}×{size}²×{cin}→{cout}",
        "gflop": 2 * batch * size**2 * cin * cout * k * k / 1e9,  # 2 per MAC
        "jax_ms": 1e3 * t_jax,
        "torch_ms": 1e3 * t_torch,
        "sdsjax_ms": 1e3 * t_sdsjax,
        "path": conv_algorithm(x, k, cout, 1, k // 2),
      }
    )
  matmul_jax = jax.jit(lambda a, b: a @ b)
  for m, kdim, n in GEMMS:
    a = rng.standard_normal((m, kdim), np.float32)
    b = rng.standard_normal((kdim, n), np.float32)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
      t_torch = best_time(torch.mm, (at, bt), args.repeats)
    t_jax = best_time(lambda p, q: matmul_jax(p, q).block_until_ready(), (a, b), args.repeats)
    rows.append(
      {
        "op": f"gemm {m}×{kdim}×{n}",
        "gflop": 2 * m * kdim * n / 1e9,
        "jax_ms": 1e3 * t_jax,
        "torch_ms": 1e3 * t_torch,
      }
    )
  print(
    json.dumps(
      {"device": jax.devices()[0].device_kind, "torch_threads": args.threads, "rows": rows},
      indent=1,
    )
  )
  print(
    "\n| op | GFLOP | PyTorch ms | XLA ms | PyTorch / XLA | sdsjax path | sdsjax ms "
    "| PyTorch / sdsjax |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    ours = (
      f"{r['path']} | {r['sdsjax_ms']:.1f} | {r['torch_ms'] / r['sdsjax_ms']:.2f}"
      if "path" in r
      else "| |"
    )
    print(
      f"| {r['op']} | {r['gflop']:.2f} | {r['torch_ms']:.1f} | {r['jax_ms']:.1f} | "
      f"{r['torch_ms'] / r['jax_ms']:.2f} | {ours} |"
    )


if __name__ == "__main__":
  main()
