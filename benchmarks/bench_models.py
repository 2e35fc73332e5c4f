"""The Flax SD models against diffusers (PyTorch) on the same machine.

* unet: SD-1.5-sized UNet forward, batch 2, 64x64x4 latents, 77x768 context.
* vae: VAE (SD sizes) encode forward + backward w.r.t. the image at 512², batch 1
  (posterior mean summed; the JAX encoder rematerialises as the bundle does,
  `autoencoder_kl.remat_policy`).

The grid is --what × --dtype. Both sides use the same random weights (PyTorch's default init,
copied with `sdsjax.models.convert`; no download) and the same inputs, and run in turn
(`common.alternate`: who goes first rotates) after --warmup untimed runs each, so shared-machine
noise hits both; medians are reported. JAX compile time (lowering + XLA compilation) is reported
separately, and the outputs are compared. Page faults and kernel time per run are reported too:
by default the process keeps freed memory mapped (`sdsjax.host_memory`, as `python -m sdsjax.fit`
does), which speeds up both frameworks; `--malloc default` measures with glibc's defaults.

Prints one JSON object and a markdown table. Runs unchanged on GPU (PyTorch uses CUDA there).

    python -m benchmarks.bench_models                       # unet and vae, 3 timed runs each
    python -m benchmarks.bench_models --what unet --repeats 5 --torch-threads 2
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from sdsjax.models import convert
from sdsjax.models.autoencoder_kl import AutoencoderKL
from sdsjax.models.unet_2d_condition import UNet2DConditionModel

from . import common
from .model_specs import SD15_UNET
from .model_specs import SD15_VAE
from .torch_baseline import sds_step

JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
log = common.logger("bench_models")


def _numpy_state(model):
  return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def _rel_err(got, want_nchw) -> float:
  """max |got − want| / max(1, max |want|), with want converted from NCHW to NHWC."""
  want = want_nchw.float().cpu().numpy().transpose(0, 2, 3, 1)
  got = np.asarray(got, np.float32)
  return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


def unet_case(dtype: str, *, batch: int, device):
  """The SD-1.5 UNet forward: {name, run_jax, run_torch, compiled, compile_s}."""
  import diffusers

  torch.manual_seed(0)
  pt = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
  state = _numpy_state(pt)  # float32, before any cast
  pt = pt.to(device=device, dtype=sds_step.TORCH_DTYPES[dtype])
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
  pt_args = (
    torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(device, pt.dtype),
    torch.from_numpy(t.astype(np.int64)).to(device),
    torch.from_numpy(context).to(device, pt.dtype),
  )

  @torch.inference_mode()
  def run_torch():
    return pt(*pt_args).sample

  run_jax = lambda: compiled({"params": params}, *args).block_until_ready()
  name = f"unet forward (SD-1.5, batch {batch}, 64x64x4, 77x768, {dtype})"
  return dict(
    name=name, run_jax=run_jax, run_torch=run_torch, compiled=compiled, compile_s=compile_s
  )


def vae_case(dtype: str, *, size: int, remat: bool, device):
  """The SD VAE encode fwd+bwd w.r.t. the image: {name, run_jax, run_torch, compiled, compile_s}."""
  import diffusers

  torch.manual_seed(0)
  pt = diffusers.AutoencoderKL(**SD15_VAE)
  state = _numpy_state(pt)
  # Gradients w.r.t. the image only, as in the SDS step: without this PyTorch would also
  # compute the weight gradients (about a third more work) that JAX's grad never computes.
  pt = pt.to(device=device, dtype=sds_step.TORCH_DTYPES[dtype]).requires_grad_(False)
  model = AutoencoderKL.from_config(SD15_VAE, dtype=JAX_DTYPES[dtype], remat=remat)
  images = np.tanh(np.random.default_rng(0).standard_normal((1, size, size, 3)))
  images = images.astype(np.float32)
  target = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
  params = jax.device_put(convert.convert_state_dict(state, target))

  def loss(p, x):
    mean, _ = model.apply({"params": p}, x, method=model.encode)
    return mean.astype(jnp.float32).sum()

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss, argnums=1)).lower(params, images).compile()
  compile_s = time.perf_counter() - start
  x = jax.device_put(images)
  pt_x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device, pt.dtype)

  def run_torch():
    xg = pt_x.clone().requires_grad_(True)
    pt.encode(xg).latent_dist.mean.float().sum().backward()
    return xg.grad

  run_jax = lambda: compiled(params, x).block_until_ready()
  name = f"vae encode fwd+bwd ({size}², batch 1, remat={remat}, {dtype})"
  return dict(
    name=name, run_jax=run_jax, run_torch=run_torch, compiled=compiled, compile_s=compile_s
  )


def measure(what: str, dtype: str, *, args, device) -> dict:
  """One case: build both sides, alternate them, compare their outputs."""
  if what == "unet":
    case = unet_case(dtype, batch=args.batch, device=device)
  else:
    case = vae_case(dtype, size=args.vae_size, remat=not args.no_remat, device=device)
  run_jax, run_torch = case["run_jax"], lambda: common.on_torch_device(device, case["run_torch"])
  samples = common.alternate({"jax": run_jax, "torch": run_torch}, args.repeats, args.warmup, log)
  jax_s, torch_s = (common.summary(samples[side]) for side in ("jax", "torch"))
  out = dict(name=case["name"], jax=jax_s, torch=torch_s, jax_compile_s=round(case["compile_s"], 1))
  out["ratio_torch_over_jax"] = round(torch_s["median_s"] / jax_s["median_s"], 3)
  out["rel_max_abs_err"] = _rel_err(run_jax(), run_torch())
  memory = case["compiled"].memory_analysis()
  if memory is not None:
    out["jax_temp_mb"] = round(memory.temp_size_in_bytes / 2**20)
  return out


def table_row(r: dict) -> list:
  jax_s, torch_s = r["jax"], r["torch"]
  return [
    r["name"],
    f"{jax_s['median_s']:.4g}",
    f"{torch_s['median_s']:.4g}",
    f"{r['ratio_torch_over_jax']:.2f}",
    r["jax_compile_s"],
    f"{r['rel_max_abs_err']:.1e}",
    f"{jax_s['page_faults']} / {torch_s['page_faults']}",
    f"{jax_s['system_s']} / {torch_s['system_s']}",
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--what", nargs="+", default=["unet", "vae"], choices=["unet", "vae"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--warmup", type=int, default=2, help="untimed runs per side first (the heap settles)"
  )
  parser.add_argument("--batch", type=int, default=2, help="UNet batch")
  parser.add_argument("--vae-size", type=int, default=512)
  parser.add_argument("--no-remat", action="store_true", help="VAE encoder without remat")
  parser.add_argument(
    "--dtype",
    nargs="+",
    choices=sorted(JAX_DTYPES),
    default=["float32"],
    help="compute dtypes: JAX computes in it with float32 weights, PyTorch casts the model to "
    "it (as a PyTorch user would)",
  )
  parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
  common.add_malloc_option(parser)
  args = parser.parse_args()
  malloc_kept = common.apply_malloc(args.malloc)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  device = sds_step.default_device()
  sds_step.configure_precision(device)  # TF32 on CUDA, as XLA's default precision there
  cases = common.grid(what=args.what, dtype=args.dtype)
  info = common.run_info(
    "benchmarks.bench_models",
    torch_device=str(device),
    torch_threads=torch.get_num_threads(),
    malloc_keep_freed_memory=malloc_kept,
  )
  rows = common.run_grid(lambda **case: measure(**case, args=args, device=device), cases, log)
  header = ["benchmark", "JAX median (s)", "PyTorch median (s)", "PyTorch / JAX"]
  header += [
    "JAX compile (s)",
    "rel. max err",
    "page faults JAX / PyTorch",
    "kernel s JAX / PyTorch",
  ]
  tables = [common.markdown_table(header, [table_row(r) for r in rows if "error" not in r])]
  tables += [f"Failed: {r['what']} {r['dtype']}: {r['error']}" for r in rows if "error" in r]
  common.emit(dict(info, results=rows), tables)


if __name__ == "__main__":
  main()
