"""Single ops at SD-1.5 shapes, JAX on CPU against PyTorch: where the models' CPU time goes.

The grid is the shapes below. Convolutions at the shapes of the UNet (64×64 latents, batch 2) and
the VAE encoder (512², batch 1), forward, float32: NCHW `torch.nn.functional.conv2d`, NHWC
`lax.conv_general_dilated` (XLA's own), and sdsjax's `Conv2D` (its CPU algorithm,
`resnet.conv_algorithm`, in the "path" column). Then GEMMs at the UNet's shapes. The sides take
turns after one warm-up each; best of --repeats. Freed memory stays mapped for both
(sdsjax/host_memory.py). Prints JSON, then a markdown table.

    python -m benchmarks.bench_ops --threads 2
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch

from sdsjax.models.resnet import Conv2D
from sdsjax.models.resnet import conv_algorithm

from . import common

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
log = common.logger("bench_ops")


def best_ms(fns: dict, repeats: int) -> dict:
  """{name: best ms} of functions timed in turn after one warm-up each."""
  samples = common.alternate(fns, repeats, warmup=1)
  return {name: 1e3 * common.summary(s)["min_s"] for name, s in samples.items()}


def conv(shape: tuple, *, repeats: int) -> dict:
  batch, size, cin, cout, k = shape
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, cin), np.float32)
  w = (0.02 * rng.standard_normal((k, k, cin, cout))).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
  dims = ("NHWC", "HWIO", "NHWC")
  xla = jax.jit(
    lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=dims)
  )
  params = {"params": {"kernel": w, "bias": np.zeros(cout, np.float32)}}
  ours = jax.jit(Conv2D(cout, k, padding=k // 2).apply)
  with torch.no_grad():
    ms = best_ms(
      {
        "torch": lambda: torch.nn.functional.conv2d(xt, wt, padding=k // 2),
        "jax": lambda: xla(x, w).block_until_ready(),
        "sdsjax": lambda: ours(params, x).block_until_ready(),
      },
      repeats,
    )
  return {
    "op": f"conv{k}x{k} {batch}×{size}²×{cin}→{cout}",
    "gflop": 2 * batch * size**2 * cin * cout * k * k / 1e9,  # 2 per MAC
    **{f"{name}_ms": t for name, t in ms.items()},
    "path": conv_algorithm(x, k, cout, 1, k // 2),
  }


def gemm(shape: tuple, *, repeats: int) -> dict:
  m, kdim, n = shape
  rng = np.random.default_rng(0)
  a = rng.standard_normal((m, kdim), np.float32)
  b = rng.standard_normal((kdim, n), np.float32)
  at, bt = torch.from_numpy(a), torch.from_numpy(b)
  matmul = jax.jit(lambda p, q: p @ q)
  with torch.no_grad():
    ms = best_ms(
      {"torch": lambda: torch.mm(at, bt), "jax": lambda: matmul(a, b).block_until_ready()},
      repeats,
    )
  ms = {f"{name}_ms": t for name, t in ms.items()}
  return {"op": f"gemm {m}×{kdim}×{n}", "gflop": 2 * m * kdim * n / 1e9, **ms}


def table_row(r: dict) -> list:
  if "error" in r:
    return [str(r["shape"]), "–", "–", "–", "–", r["error"], "–", "–"]
  ours = ["", "", ""]
  if "sdsjax_ms" in r:
    ours = [r["path"], f"{r['sdsjax_ms']:.1f}", f"{r['torch_ms'] / r['sdsjax_ms']:.2f}"]
  return [
    r["op"],
    f"{r['gflop']:.2f}",
    f"{r['torch_ms']:.1f}",
    f"{r['jax_ms']:.1f}",
    f"{r['torch_ms'] / r['jax_ms']:.2f}",
    *ours,
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--first", type=int, default=None, help="only the first N shapes of each")
  args = parser.parse_args()
  common.apply_malloc("keep")
  torch.set_num_threads(args.threads)
  info = common.run_info("benchmarks.bench_ops", torch_threads=args.threads)
  rows = common.run_grid(
    lambda shape: conv(shape, repeats=args.repeats), common.grid(shape=CONVS[: args.first])
  )
  rows += common.run_grid(
    lambda shape: gemm(shape, repeats=args.repeats), common.grid(shape=GEMMS[: args.first])
  )
  header = ["op", "GFLOP", "PyTorch ms", "XLA ms", "PyTorch / XLA", "sdsjax path", "sdsjax ms"]
  table = common.markdown_table([*header, "PyTorch / sdsjax"], map(table_row, rows))
  common.emit(dict(info, rows=rows), table)


if __name__ == "__main__":
  main()
