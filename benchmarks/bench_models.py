"""Benchmark of the Flax SD models against diffusers (PyTorch) on the same machine.

* unet: SD-1.5-sized UNet forward, batch 2, 64x64x4 latents, 77x768 context.
* vae: VAE (SD sizes) encode forward + backward w.r.t. the image at 512², batch 1
  (posterior mean summed; the JAX encoder rematerialises its blocks, keeping convolution
  outputs, as the bundle does).

Both sides use the same random weights (PyTorch's default init, copied with
`sdsjax.models.convert`; no download), the same inputs, and run alternately (JAX, PyTorch, JAX,
...) after two warm-up runs each, so shared-machine noise hits both; medians are reported. JAX
compile time (lowering + XLA compilation) is reported separately. The outputs are compared as
well. Page faults and kernel time per run are reported too: by default the process keeps freed
memory mapped (`sdsjax.host_memory`, as `python -m sdsjax.fit` does), which speeds up both
frameworks; `--malloc default` measures with glibc's defaults.

Prints one JSON object and a markdown table. Runs unchanged on GPU (PyTorch uses CUDA when
available).

Usage:
  python benchmarks/bench_models.py                       # unet and vae, 3 timed runs each
  python benchmarks/bench_models.py --what unet --repeats 5 --torch-threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

# On a GPU both frameworks share the device: JAX must not pre-allocate 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.torch_baseline import sds_step  # noqa: E402
from sdsjax import host_memory  # noqa: E402
from sdsjax.models import convert  # noqa: E402
from sdsjax.models.autoencoder_kl import AutoencoderKL  # noqa: E402
from sdsjax.models.unet_2d_condition import UNet2DConditionModel  # noqa: E402

# SD 1.5's unet/config.json and vae/config.json (the keys that matter).
SD15_UNET = dict(
  sample_size=64,
  in_channels=4,
  out_channels=4,
  layers_per_block=2,
  block_out_channels=[320, 640, 1280, 1280],
  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
  cross_attention_dim=768,
  attention_head_dim=8,
  norm_num_groups=32,
  norm_eps=1e-5,
  flip_sin_to_cos=True,
  freq_shift=0,
)
SD15_VAE = dict(
  in_channels=3,
  out_channels=3,
  latent_channels=4,
  layers_per_block=2,
  block_out_channels=[128, 256, 512, 512],
  norm_num_groups=32,
  sample_size=512,
  down_block_types=["DownEncoderBlock2D"] * 4,
  up_block_types=["UpDecoderBlock2D"] * 4,
  scaling_factor=0.18215,
)


JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sync_torch(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def _numpy_state(model):
  return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def _alternate(jax_fn, torch_fn, repeats: int, warmup: int):
  """`warmup` untimed runs each, then `repeats` alternating timed runs. Returns per-side times (s)
  and page-fault / kernel-time counts."""
  for _ in range(warmup):
    jax_fn(), torch_fn()
  times = {
    "jax": [],
    "torch": [],
    "jax_faults": [],
    "torch_faults": [],
    "jax_sys": [],
    "torch_sys": [],
  }
  for _ in range(repeats):
    for side, fn in (("jax", jax_fn), ("torch", torch_fn)):
      before = resource.getrusage(resource.RUSAGE_SELF)
      start = time.perf_counter()
      fn()
      times[side].append(time.perf_counter() - start)
      after = resource.getrusage(resource.RUSAGE_SELF)
      # Page faults and kernel time: first touches of freshly mapped memory show up here.
      times[side + "_faults"].append(after.ru_minflt - before.ru_minflt)
      times[side + "_sys"].append(after.ru_stime - before.ru_stime)
  return times


def bench_unet(batch: int, repeats: int, warmup: int, device, dtype: str) -> dict:
  import diffusers

  torch.manual_seed(0)
  pt = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
  state = _numpy_state(pt)  # float32, before any cast
  pt = pt.to(device=device, dtype=TORCH_DTYPES[dtype])
  model = UNet2DConditionModel.from_config(SD15_UNET, dtype=JAX_DTYPES[dtype])
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((batch, 64, 64, 4)).astype(np.float32)
  t = np.full((batch,), 500, np.int32)
  context = rng.standard_normal((batch, 77, 768)).astype(np.float32)
  target = jax.eval_shape(model.init, jax.random.PRNGKey(0), latents, t, context)["params"]
  params = jax.device_put(convert.convert_state_dict(state, target))

  start = time.perf_counter()
  compiled = jax.jit(model.apply).lower({"params": params}, latents, t, context).compile()
  compile_s = time.perf_counter() - start
  args = [jax.device_put(a) for a in (latents, t, context)]
  run_jax = lambda: compiled({"params": params}, *args).block_until_ready()

  pt_args = (
    torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(device, pt.dtype),
    torch.from_numpy(t.astype(np.int64)).to(device),
    torch.from_numpy(context).to(device, pt.dtype),
  )

  def run_torch():
    with torch.inference_mode():
      out = pt(*pt_args).sample
    _sync_torch(device)
    return out

  times = _alternate(run_jax, run_torch, repeats, warmup)
  want = run_torch().float().cpu().numpy().transpose(0, 2, 3, 1)
  got = np.asarray(run_jax(), np.float32)
  err = float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))
  return _summary(
    f"unet forward (SD-1.5, batch {batch}, 64x64x4, 77x768, {dtype})", times, compile_s, err
  )


def bench_vae(size: int, repeats: int, warmup: int, device, remat: bool, dtype: str) -> dict:
  import diffusers

  torch.manual_seed(0)
  pt = diffusers.AutoencoderKL(**SD15_VAE)
  state = _numpy_state(pt)
  # Gradients w.r.t. the image only, as in the SDS step: without this PyTorch would also
  # compute the weight gradients (about a third more work) that JAX's grad never computes.
  pt = pt.to(device=device, dtype=TORCH_DTYPES[dtype]).requires_grad_(False)
  model = AutoencoderKL.from_config(SD15_VAE, dtype=JAX_DTYPES[dtype], remat=remat)
  rng = np.random.default_rng(0)
  images = np.tanh(rng.standard_normal((1, size, size, 3))).astype(np.float32)
  target = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
  params = jax.device_put(convert.convert_state_dict(state, target))

  def loss(p, x):
    mean, _ = model.apply({"params": p}, x, method=model.encode)
    return mean.astype(jnp.float32).sum()

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss, argnums=1)).lower(params, images).compile()
  compile_s = time.perf_counter() - start
  x = jax.device_put(images)
  run_jax = lambda: compiled(params, x).block_until_ready()

  pt_x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device, pt.dtype)

  def run_torch():
    xg = pt_x.clone().requires_grad_(True)
    pt.encode(xg).latent_dist.mean.float().sum().backward()
    _sync_torch(device)
    return xg.grad

  times = _alternate(run_jax, run_torch, repeats, warmup)
  want = run_torch().float().cpu().numpy().transpose(0, 2, 3, 1)
  got = np.asarray(run_jax(), np.float32)
  err = float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))
  out = _summary(
    f"vae encode fwd+bwd ({size}², batch 1, remat={remat}, {dtype})", times, compile_s, err
  )
  memory = compiled.memory_analysis()
  if memory is not None:
    out["jax_temp_mb"] = round(memory.temp_size_in_bytes / 2**20)
  return out


def _summary(name, times, compile_s, err):
  jax_med, torch_med = statistics.median(times["jax"]), statistics.median(times["torch"])
  # 5 decimals: GPU runs take milliseconds.
  return dict(
    name=name,
    jax_s=round(jax_med, 5),
    torch_s=round(torch_med, 5),
    ratio_torch_over_jax=round(torch_med / jax_med, 3),
    jax_min_s=round(min(times["jax"]), 5),
    torch_min_s=round(min(times["torch"]), 5),
    jax_compile_s=round(compile_s, 1),
    rel_max_abs_err=err,
    jax_page_faults=int(statistics.median(times["jax_faults"])),
    torch_page_faults=int(statistics.median(times["torch_faults"])),
    jax_sys_s=round(statistics.median(times["jax_sys"]), 2),
    torch_sys_s=round(statistics.median(times["torch_sys"]), 2),
    jax_times=[round(s, 5) for s in times["jax"]],
    torch_times=[round(s, 5) for s in times["torch"]],
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--what", nargs="+", default=["unet", "vae"], choices=["unet", "vae"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--warmup",
    type=int,
    default=2,
    help="untimed runs per side first (the heap settles over the first two)",
  )
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--vae-size", type=int, default=512)
  parser.add_argument("--no-remat", action="store_true", help="VAE encoder without remat")
  parser.add_argument(
    "--dtype",
    choices=sorted(JAX_DTYPES),
    default="float32",
    help="compute dtype: JAX computes in it with float32 weights, PyTorch casts "
    "the model to it (as a PyTorch user would)",
  )
  parser.add_argument(
    "--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)"
  )
  parser.add_argument(
    "--malloc",
    choices=["keep", "default"],
    default="keep",
    help="keep: sdsjax.host_memory.keep_freed_memory() (as python -m sdsjax.fit "
    "does), for both frameworks, which share this process; default: "
    "glibc's defaults",
  )
  args = parser.parse_args()
  malloc_kept = args.malloc == "keep" and host_memory.keep_freed_memory()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  device = sds_step.default_device()
  sds_step.configure_precision(device)  # TF32 on CUDA, as XLA's default precision there
  results = []
  for what in args.what:
    if what == "unet":
      results.append(bench_unet(args.batch, args.repeats, args.warmup, device, args.dtype))
    else:
      results.append(
        bench_vae(args.vae_size, args.repeats, args.warmup, device, not args.no_remat, args.dtype)
      )
  report = dict(
    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    jax_device=str(jax.devices()[0]),
    torch_device=str(device),
    torch_threads=torch.get_num_threads(),
    cpu_count=os.cpu_count(),
    machine=platform.processor() or platform.machine(),
    jax=jax.__version__,
    torch=torch.__version__,
    malloc_keep_freed_memory=malloc_kept,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    command=" ".join([os.path.basename(sys.executable), *sys.argv]),
    results=results,
  )
  print(json.dumps(report, indent=1))
  print()
  print(
    "| benchmark | JAX median (s) | PyTorch median (s) | PyTorch / JAX | JAX compile (s) "
    "| rel. max err |"
  )
  print("|---|---|---|---|---|---|")
  for r in results:
    print(
      f"| {r['name']} | {r['jax_s']:.4g} | {r['torch_s']:.4g} | "
      f"{r['ratio_torch_over_jax']:.2f} | {r['jax_compile_s']:.1f} | "
      f"{r['rel_max_abs_err']:.1e} |"
    )


if __name__ == "__main__":
  main()
