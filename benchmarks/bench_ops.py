"""Single UNet-shaped ops, XLA:CPU against PyTorch: where the UNet's CPU time goes.

Convolutions (NHWC `lax.conv_general_dilated` vs NCHW `torch.nn.functional.conv2d`) and GEMMs
at the shapes of the SD-1.5 UNet at 64×64 latents, batch 2, float32. Prints JSON, then a
markdown table. Run: `python benchmarks/bench_ops.py --threads 2`.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import torch

CONVS = [(64, 320, 320, 3), (32, 640, 640, 3), (16, 1280, 1280, 3), (8, 1280, 1280, 3),
         (64, 640, 320, 3), (64, 320, 320, 1)]          # (size, in, out, kernel)
GEMMS = [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (2048, 640, 640),
         (512, 1280, 1280)]                              # (M, K, N)


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
  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  rows = []
  conv_jax = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  for size, cin, cout, k in CONVS:
    x = rng.standard_normal((2, size, size, cin), np.float32)
    w = (0.02 * rng.standard_normal((k, k, cin, cout))).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    with torch.no_grad():
      t_torch = best_time(lambda a, b: torch.nn.functional.conv2d(a, b, padding=k // 2),
                          (xt, wt), args.repeats)
    t_jax = best_time(lambda a, b: conv_jax(a, b).block_until_ready(), (x, w), args.repeats)
    rows.append({"op": f"conv{k}x{k} {size}²×{cin}→{cout}",
                 "gflop": 2 * 2 * size ** 2 * cin * cout * k * k / 1e9,   # batch 2, 2 per MAC
                 "jax_ms": 1e3 * t_jax, "torch_ms": 1e3 * t_torch})
  matmul_jax = jax.jit(lambda a, b: a @ b)
  for m, kdim, n in GEMMS:
    a = rng.standard_normal((m, kdim), np.float32)
    b = rng.standard_normal((kdim, n), np.float32)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
      t_torch = best_time(torch.mm, (at, bt), args.repeats)
    t_jax = best_time(lambda p, q: matmul_jax(p, q).block_until_ready(), (a, b), args.repeats)
    rows.append({"op": f"gemm {m}×{kdim}×{n}", "gflop": 2 * m * kdim * n / 1e9,
                 "jax_ms": 1e3 * t_jax, "torch_ms": 1e3 * t_torch})
  print(json.dumps({"device": jax.devices()[0].device_kind, "torch_threads": args.threads,
                    "rows": rows}, indent=1))
  print("\n| op | GFLOP | JAX ms | PyTorch ms | PyTorch / JAX | JAX GFLOP/s |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['op']} | {r['gflop']:.2f} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | "
          f"{r['torch_ms'] / r['jax_ms']:.2f} | {r['gflop'] / r['jax_ms'] * 1e3:.0f} |")


if __name__ == "__main__":
  main()
