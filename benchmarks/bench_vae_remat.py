"""Memory and time of the VAE encoder's backward pass per rematerialisation policy (JAX only).

SD-1.5 VAE dimensions, random weights, encode forward + backward w.r.t. the image (as in the SDS
step) at 512². The grid is --batch × --policies (autoencoder_kl.remat_policy: "convs", "blocks",
or no remat). Each case reports XLA's temp buffer size (`memory_analysis`, the memory the step
needs beyond its inputs and outputs) and the median time after two warm-up runs. Prints JSON and a
markdown table.

    python -m benchmarks.bench_vae_remat                       # batch 1 and 4, 3 timed runs
    python -m benchmarks.bench_vae_remat --batch 4 --repeats 5
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from sdsjax import host_memory
from sdsjax.models.autoencoder_kl import AutoencoderKL

from . import common
from .model_specs import SD15_VAE

log = common.logger("bench_vae_remat")


def measure(batch: int, policy: str, *, size: int, repeats: int) -> dict:
  model = AutoencoderKL.from_config(
    SD15_VAE, remat=policy != "none", remat_policy="auto" if policy == "none" else policy
  )
  images = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), images[:1, :64, :64])["params"]

  def loss(p, x):
    return model.apply({"params": p}, x, method=model.encode)[0].sum()

  compiled = jax.jit(jax.grad(loss, argnums=1)).lower(params, images).compile()
  run = lambda: compiled(params, images).block_until_ready()
  # Two warm-ups: allocations, and the heap settles (see sdsjax/host_memory.py).
  stats = common.summary(common.alternate({policy: run}, repeats, warmup=2)[policy])
  host_memory.release_freed_memory()  # or the next, larger temporaries stack up
  return dict(
    temp_mb=round(compiled.memory_analysis().temp_size_in_bytes / 2**20),
    median_s=round(stats["median_s"], 5),
    times=stats["times_s"],
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  policies = ["convs", "blocks", "none"]
  parser.add_argument("--policies", nargs="+", default=policies, choices=policies)
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  malloc_kept = common.apply_malloc("keep")
  info = common.run_info("benchmarks.bench_vae_remat", size=args.size, malloc_kept=malloc_kept)
  cases = common.grid(batch=args.batch, policy=args.policies)
  measure_case = lambda **case: measure(**case, size=args.size, repeats=args.repeats)
  rows = common.run_grid(measure_case, cases, log)
  table = common.markdown_table(
    ["policy", "batch", "XLA temp (MB)", "median (s)"],
    [
      [r["policy"], r["batch"], r.get("temp_mb", "–"), common.fmt(r.get("median_s"), ".4g")]
      for r in rows
    ],
  )
  common.emit(dict(info, results=rows), table)


if __name__ == "__main__":
  main()
