"""Memory and time of the VAE encoder's backward pass per rematerialisation policy (JAX only).

SD-1.5 VAE dimensions, random weights, encode forward + backward w.r.t. the image (as in the SDS
step) at 512². For each policy (autoencoder_kl.remat_policy: "convs", "blocks", or no remat) and
batch size it reports XLA's temp buffer size (`memory_analysis`, the memory the step needs
beyond its inputs and outputs) and the median time. Prints JSON and a markdown table.

    python benchmarks/bench_vae_remat.py                       # batch 1 and 4, 3 timed runs
    python benchmarks/bench_vae_remat.py --batch 4 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_models import SD15_VAE  # noqa: E402
from sdsjax import host_memory  # noqa: E402
from sdsjax.models.autoencoder_kl import AutoencoderKL  # noqa: E402


def measure(policy: str, batch: int, size: int, repeats: int) -> dict:
  model = AutoencoderKL.from_config(
    SD15_VAE, remat=policy != "none", remat_policy="auto" if policy == "none" else policy
  )
  images = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), images[:1, :64, :64])["params"]

  def loss(p, x):
    return model.apply({"params": p}, x, method=model.encode)[0].sum()

  compiled = jax.jit(jax.grad(loss, argnums=1)).lower(params, images).compile()
  for _ in range(2):  # warm-up (and the heap settles, see sdsjax/host_memory.py)
    compiled(params, images).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(params, images).block_until_ready()
    times.append(time.perf_counter() - start)
  return dict(
    policy=policy,
    batch=batch,
    temp_mb=round(compiled.memory_analysis().temp_size_in_bytes / 2**20),
    median_s=round(statistics.median(times), 5),
    times=[round(t, 5) for t in times],
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--policies",
    nargs="+",
    default=["convs", "blocks", "none"],
    choices=["convs", "blocks", "none"],
  )
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  host_memory.keep_freed_memory()
  rows = []
  for batch in args.batch:
    for policy in args.policies:
      rows.append(measure(policy, batch, args.size, args.repeats))
      host_memory.release_freed_memory()  # or the next, larger temporaries stack up
      print(f"{policy} batch {batch}: {rows[-1]}", file=sys.stderr, flush=True)
  print(
    json.dumps(
      dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=str(jax.devices()[0]),
        jax=jax.__version__,
        size=args.size,
        command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        results=rows,
      ),
      indent=1,
    )
  )
  print()
  print("| policy | batch | XLA temp (MB) | median (s) |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['policy']} | {r['batch']} | {r['temp_mb']} | {r['median_s']:.4g} |")


if __name__ == "__main__":
  main()
