"""Fit throughput against the number of prompts P: sdsjax (jit + vmap) against the PyTorch baseline.

    python -m benchmarks.bench_fit --config tiny                  # P = 1, 8, 32
    python -m benchmarks.bench_fit --config small --prompts 1 4
    python -m benchmarks.bench_fit --config sd15 --prompts 1 --repeats 2

The grid is --prompts. For every P it times, in one process and alternating after a warm-up step:

* `sdsjax`: `make_batched_step(make_fit_step(...))`, all P prompts in one jitted call;
* `torch-loop`: the article's way, prompts one after another (`LoopBaseline`);
* `torch-batched`: P prompts in one batch (`BatchedBaseline`).

One step updates all P prompts once. Reported per P and implementation: s/step, steps/s and
prompts·steps/s (medians over --repeats of --steps steps), compile time, XLA's FLOP count of the
sdsjax step (`common.xla_flops`) and each side's achieved rate against it, and peak memory: host
RSS of a child process that runs only that implementation at that P (--memory), and on GPU the
device peaks. The scaling table gives prompts·steps/s against P for sdsjax and torch-batched,
memory per prompt, sdsjax's share of the dense matmul rate measured on the device, and the batch
that `prompts_per_device: auto` picks (`sdsjax.fit_run.auto_prompts_per_device`). JSON goes to
stdout (and --json), then the markdown tables. Freed host memory stays mapped, for every
implementation, as in `python -m sdsjax.fit` (`--malloc default`: not). Models (random weights,
written once under $SDSJAX_CACHE, never downloaded): tiny is the built-in tiny-random with
configs/tiny.yaml (render 32², SD 64²); small and sd15 are in `benchmarks/model_specs.py`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from . import common
from . import fit_runners
from . import fit_stages
from .model_specs import checkpoint
from .model_specs import fit_config

IMPLS = ("sdsjax", "torch-loop", "torch-batched")
DEFAULT_STEPS = {"tiny": 5, "small": 1, "sd15": 1}
log = common.logger("bench_fit")


def auto_batch(cfg, shared, prompts: list[int]) -> dict:
  """What `prompts_per_device: auto` would pick on this device for each P, and why.

  `sdsjax.fit_run.auto_prompts_per_device` compiles the step at 1 and 2 prompts (reusing the
  ones the grid compiled) and fits the linear memory model to the free memory; its choice for
  the largest P, capped by P, is its choice for every P (only the cap depends on P).
  """
  from sdsjax import fit_run

  compiled = shared.setdefault("compiled", {})
  compile_at = lambda b: compiled.get(b) or fit_runners.JaxRunner(cfg, b, shared).compiled
  batch, reason, _, *estimate = fit_run.auto_prompts_per_device(compile_at, max(prompts), 1)
  per_prompts = {p: min(p, batch) for p in prompts}
  return {"per_prompts": per_prompts, "reason": reason, "estimate": (estimate or [None])[0]}


# ------------------------------------------------------------------------------------------
# Peak memory: one child process per implementation and P, so each figure is that one's alone.


def child_main(args) -> None:
  """--child IMPL: load, compile, run a warm-up and one step, report peak memory."""
  cfg = fit_config(args.config, checkpoint(args.config), args.dtype)
  shared = fit_runners.load_shared(
    cfg, [args.child], args.torch_compile, args.torch_threads, args.head_file
  )
  fit_runners.make_runner(args.child, cfg, args.prompts[0], shared).run(2)
  out = {"peak_rss_mb": common.peak_rss_mb()}
  if args.child == "sdsjax":
    device_mb = common.jax_device_peak_mb()
  else:
    device_mb = common.torch_device_peak_mb()
  if device_mb is not None:
    out["device_peak_mb"] = device_mb
  common.child_result(out)


def measure_memory(args, impl: str, num_prompts: int, head_file: str) -> dict:
  flags = ["--config", args.config, "--prompts", num_prompts, "--dtype", args.dtype]
  flags += ["--head-file", head_file, "--malloc", args.malloc]
  flags += ["--torch-threads", args.torch_threads] + ["--torch-compile"] * args.torch_compile
  return common.run_child("benchmarks.bench_fit", ["--child", impl, *flags])


# ------------------------------------------------------------------------------------------
# The benchmark: a grid over P.


def measure_prompts(prompts: int, *, cfg, shared, impls, args, steps: int) -> dict:
  """One P: every implementation set up, warmed up, then timed in alternation."""
  runners, rows = {}, {}
  for impl in impls:
    t0 = time.perf_counter()
    runners[impl] = fit_runners.make_runner(impl, cfg, prompts, shared)
    setup_s = time.perf_counter() - t0
    first = common.timed(lambda r=runners[impl]: r.run(1))  # warm-up (and torch.compile)
    rows[impl] = dict(impl=impl, prompts=prompts, setup_s=setup_s, first_step_s=first.seconds)
    rows[impl]["compile_s"] = runners[impl].compile_s
    log(f"P={prompts} {impl}: set up {setup_s:.1f}s, first step {first.seconds:.2f}s")
  fns = {impl: (lambda r=runners[impl]: r.run(steps)) for impl in impls}
  samples = common.alternate(fns, args.repeats, log=lambda m: log(f"P={prompts} {m}"))
  flops = runners["sdsjax"].flops if "sdsjax" in runners else None
  device_peaks = {"sdsjax": common.jax_device_peak_mb() if "sdsjax" in impls else None}
  if any(i.startswith("torch") for i in impls):  # since this P's runners were made
    device_peaks["torch"] = common.torch_device_peak_mb()
  for impl, row in rows.items():
    stats = common.summary(samples[impl], per=steps)
    sec = stats["median_s"]
    row.update(s_per_step=sec, times=stats["times_s"], page_faults=stats["page_faults"])
    row.update(steps_per_s=1 / sec, prompt_steps_per_s=prompts / sec, step_flops=flops)
    row["achieved_gflops"] = flops / sec / 1e9 if flops else None
    row["device_peak_mb"] = device_peaks["sdsjax" if impl == "sdsjax" else "torch"]
    if impl.startswith("torch") and args.torch_compile:
      row["compile_s"] = max(row["first_step_s"] - sec, 0.0)
  if "sdsjax" in runners:  # for auto_batch (a compiled program holds no buffers)
    shared.setdefault("compiled", {})[prompts] = runners["sdsjax"].compiled
  runners.clear()
  common.release_torch_cache()  # this P's torch buffers, before the next P's JAX ones
  return {"runs": list(rows.values())}


def bench(args) -> dict:
  folder = checkpoint(args.config)
  cfg = fit_config(args.config, folder, args.dtype)
  impls = [i for i in IMPLS if i in args.impls]
  prompts = sorted(set(args.prompts))  # ascending, so that JAX's device peak is this P's
  steps = args.steps or DEFAULT_STEPS[args.config]
  memory = {}  # first, from children started while this process is still small
  if args.memory != "none":
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
      head_file = str(Path(tmp) / "head.npz")
      np.savez(head_file, **fit_runners.head_arrays(cfg))
      for case in common.grid(p=prompts if args.memory == "all" else prompts[-1:], impl=impls):
        p, impl = case["p"], case["impl"]
        memory[impl, p] = measure_memory(args, impl, p, head_file)
        log(f"P={p} {impl}: memory {memory[impl, p]}")
  t0 = time.perf_counter()
  shared = fit_runners.load_shared(cfg, impls, args.torch_compile, args.torch_threads)
  results = common.run_info(
    "benchmarks.bench_fit",
    config=args.config,
    model=str(folder),
    dtype=args.dtype,
    render_resolution=cfg.render_resolution,
    sd_resolution=cfg.sd_resolution,
    num_components=cfg.num_components,
    steps_per_repeat=steps,
    repeats=args.repeats,
    torch_compile=args.torch_compile,
    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    malloc_keep_freed_memory=args.malloc_kept,
    load_s=time.perf_counter() - t0,
  )
  if "parts" in shared:
    import torch

    results["torch_threads"] = torch.get_num_threads()
  if "sdsjax" in impls:
    results["matmul_flops_per_s"] = common.jax_matmul_flops_per_s(args.dtype)
  measure = lambda prompts: measure_prompts(
    prompts, cfg=cfg, shared=shared, impls=impls, args=args, steps=steps
  )
  cases = common.run_grid(measure, common.grid(prompts=prompts), log=None)
  results["runs"] = [row for case in cases for row in case.get("runs", [])]
  results["errors"] = {c["prompts"]: c["error"] for c in cases if "error" in c}
  if args.auto_batch and "sdsjax" in impls:
    auto = auto_batch(cfg, shared, prompts)
    results["auto_batch"], results["auto_batch_reason"] = auto["per_prompts"], auto["reason"]
    results["auto_batch_estimate"] = auto["estimate"]
    log(auto["reason"])
  jax_rate = {r["prompts"]: r["steps_per_s"] for r in results["runs"] if r["impl"] == "sdsjax"}
  for row in results["runs"]:
    row.update(memory.get((row["impl"], row["prompts"]), {}))
    # The run's peak: on the device where there is one, else the host's RSS.
    row["peak_mb"] = row.get("device_peak_mb") or row.get("peak_rss_mb")
    if row["impl"] != "sdsjax" and row["prompts"] in jax_rate:
      row["sdsjax_speedup"] = jax_rate[row["prompts"]] / row["steps_per_s"]
  results["scaling"] = scaling(results)
  if args.breakdown and "sdsjax" in impls and "torch-batched" in impls:
    results["breakdown"] = {}
    for p in sorted({prompts[0], prompts[-1]}):
      results["breakdown"][p] = fit_stages.breakdown(cfg, shared, p)
      log(f"P={p} breakdown: {results['breakdown'][p]}")
  return results


# ------------------------------------------------------------------------------------------
# Tables.

RUN_COLUMNS = (  # (header, key, format)
  ("s/step", "s_per_step", ".4g"),
  ("steps/s", "steps_per_s", ".4g"),
  ("prompts·steps/s", "prompt_steps_per_s", ".4g"),
  ("sdsjax ×", "sdsjax_speedup", ".2f"),
  ("compile s", "compile_s", ".1f"),
  ("GFLOP/s", "achieved_gflops", ".1f"),
  ("peak MB", "peak_mb", ".0f"),
)
SCALING_COLUMNS = (
  ("sdsjax prompts·steps/s", "sdsjax_prompt_steps_per_s", ".4g"),
  ("torch-batched prompts·steps/s", "torch-batched_prompt_steps_per_s", ".4g"),
  ("sdsjax ×", "sdsjax_speedup", ".2f"),
  ("sdsjax MB/prompt", "sdsjax_mb_per_prompt", ".0f"),
  ("sdsjax Δ MB/prompt", "sdsjax_marginal_mb_per_prompt", ".0f"),
  ("torch MB/prompt", "torch-batched_mb_per_prompt", ".0f"),
  ("torch Δ MB/prompt", "torch-batched_marginal_mb_per_prompt", ".0f"),
  ("sdsjax % of matmul peak", "sdsjax_percent_of_matmul_peak", ".1f"),
  ("auto batch", "auto_batch", ""),
)


def scaling(results: dict) -> dict:
  """Per P: prompts·steps/s of sdsjax and torch-batched and their ratio, MB per prompt (peak / P)
  and per extra prompt (since the previous P), sdsjax's share of the matmul rate, the auto batch.
  """
  by = {(r["impl"], r["prompts"]): r for r in results["runs"]}
  out, last = {}, {}
  for p in sorted({r["prompts"] for r in results["runs"]}):
    row = out[p] = {"auto_batch": results.get("auto_batch", {}).get(p)}
    for impl in ("sdsjax", "torch-batched"):
      r, (p0, mb0) = by.get((impl, p)), last.get(impl, (None, None))
      if r is None:
        continue
      mb = r["peak_mb"]
      row[f"{impl}_prompt_steps_per_s"] = r["prompt_steps_per_s"]
      row[f"{impl}_mb_per_prompt"] = mb and mb / p
      row[f"{impl}_marginal_mb_per_prompt"] = mb and mb0 and (mb - mb0) / (p - p0)
      last[impl] = p, mb
    if ("torch-batched", p) in by:
      row["sdsjax_speedup"] = by["torch-batched", p].get("sdsjax_speedup")
    peak, achieved = results.get("matmul_flops_per_s"), by.get(("sdsjax", p), {})
    if peak and achieved.get("achieved_gflops"):
      row["sdsjax_percent_of_matmul_peak"] = 100 * achieved["achieved_gflops"] * 1e9 / peak
  return out


def markdown(results: dict) -> list[str]:
  """The runs with the ratio of sdsjax to each baseline, the scaling table, the stages."""
  fmt, runs = common.fmt, results["runs"]
  header = ["P", "impl", *(c[0] for c in RUN_COLUMNS)]
  rows = [[r["prompts"], r["impl"], *(fmt(r.get(k), f) for _, k, f in RUN_COLUMNS)] for r in runs]
  tables = [common.markdown_table(header, rows)]
  peak = results.get("matmul_flops_per_s")
  title = (
    f"Scaling with P ({results['device']}): MB/prompt = peak / P, Δ = per extra prompt since the"
    f" previous P; % = share of {fmt(peak and peak / 1e12, '.3g')} TFLOP/s, JAX's dense matmul"
    " in this dtype, at XLA's FLOP count."
  )
  header = ["P", *(c[0] for c in SCALING_COLUMNS)]
  rows = [
    [p, *(fmt(s.get(k), f) for _, k, f in SCALING_COLUMNS)] for p, s in results["scaling"].items()
  ]
  tables.append(f"{title}\n\n{common.markdown_table(header, rows)}")
  for p, stages in results.get("breakdown", {}).items():
    tables.append(fit_stages.markdown(p, stages))
  flops = {r["prompts"]: r["step_flops"] for r in runs if r.get("step_flops")}
  if flops:
    per_p = ", ".join(f"P={p}: {f / 1e9:.2f} GFLOP" for p, f in sorted(flops.items()))
    tables.append(f"XLA FLOPs per step: {per_p}")
  if results["errors"]:
    tables.append("Failed: " + "; ".join(f"P={p}: {e}" for p, e in results["errors"].items()))
  return tables


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", choices=("tiny", "small", "sd15"), default="tiny")
  p.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32], help="the grid of P")
  p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
  p.add_argument("--steps", type=int, default=0, help="steps per timed repeat (0: per config)")
  p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--torch-threads", type=int, default=0, help="0: os.cpu_count()")
  p.add_argument(
    "--omp-wait-policy",
    choices=("default", "passive", "active"),
    default="default",
    help="OMP_WAIT_POLICY for torch's OpenMP threads (the environment's wins). default: "
    "libgomp's, fastest for torch on an idle machine without slowing XLA; passive suits a "
    "machine shared with other jobs; active spins forever and slows XLA",
  )
  common.add_malloc_option(p)
  p.add_argument("--torch-compile", action="store_true", help="torch.compile the baseline")
  p.add_argument(
    "--memory",
    choices=("none", "max", "all"),
    default="all",
    help="peak memory from child processes: at every P (all), the largest P (max), none",
  )
  p.add_argument(
    "--breakdown",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also time render / VAE / UNet alone on both sides (smallest and largest P)",
  )
  p.add_argument(
    "--auto-batch",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also report the batch prompts_per_device: auto picks (compiles P = 2 if not run)",
  )
  p.add_argument("--json", help="also write the results to this file")
  p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
  p.add_argument("--head-file", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  # Read by libgomp when torch loads it, which happens after this point (imports are lazy).
  if args.omp_wait_policy != "default":
    os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy.upper())
  args.malloc_kept = common.apply_malloc(args.malloc)  # before any framework allocates
  if args.child:
    child_main(args)
    return
  results = bench(args)
  common.emit(results, markdown(results), args.json)


if __name__ == "__main__":
  main()
