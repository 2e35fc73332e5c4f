"""Fit throughput: sdsjax (jit + vmap over prompts) against the PyTorch baseline.

    python benchmarks/bench_fit.py --config tiny
    python benchmarks/bench_fit.py --config small --prompts 1 4
    python benchmarks/bench_fit.py --config sd15 --prompts 1 --repeats 2

For every P in --prompts it times, in one process and alternating between them after a warm-up:

* `sdsjax`: `make_batched_step(make_fit_step(...))`, all P prompts in one jitted call;
* `torch-loop`: the article's way, prompts one after another (`LoopBaseline`);
* `torch-batched`: P prompts in one batch (`BatchedBaseline`).

One step updates all P prompts once. Reported: steps/s and prompts·steps/s (medians over
--repeats), compile time, XLA's FLOP estimate of the jitted step (`cost_analysis`) and the
achieved FLOP/s of every implementation against it, and peak memory (host RSS of a child process
that runs only that implementation; device peak on GPU). JSON goes to stdout (and --json),
followed by a markdown table with the ratios to the baseline. Freed memory stays mapped in the
process, for every implementation, as in `python -m sdsjax.fit` (`--malloc default`: not).

Models (random weights, written once under $SDSJAX_CACHE, never downloaded):
* tiny: the built-in tiny-random model, configs/tiny.yaml (render 32², SD 64²);
* small: SD-shaped with reduced channels (UNet 64-128-256-256, one layer per block; VAE
  32-64-128-128), render 128², SD 256²;
* sd15: SD-1.5 UNet and VAE dimensions, render 128², SD 512² (the text encoder has one layer:
  it runs once per prompt, outside the step).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# On a GPU both frameworks share the device in one process: JAX must not pre-allocate 75% of
# its memory, or PyTorch runs out. (Also makes JAX's peak_bytes_in_use its real peak.)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from sdsjax import config as config_lib  # noqa: E402  (jax-free)
from sdsjax import host_memory  # noqa: E402  (jax-free)
from sdsjax.models import tiny_random  # noqa: E402  (jax-free)

IMPLS = ("sdsjax", "torch-loop", "torch-batched")
DEFAULT_STEPS = {"tiny": 5, "small": 1, "sd15": 1}

_TEXT_ENCODER_768 = dict(
  tiny_random.TEXT_ENCODER_CONFIG,
  hidden_size=768,
  intermediate_size=3072,
  projection_dim=768,
  num_hidden_layers=1,
  num_attention_heads=12,
)

MODEL_SPECS = {
  "small": {
    "unet": dict(
      tiny_random.UNET_CONFIG,
      sample_size=32,
      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
      block_out_channels=[64, 128, 256, 256],
      layers_per_block=1,
      norm_num_groups=32,
      cross_attention_dim=768,
      attention_head_dim=8,
    ),
    "vae": dict(
      tiny_random.VAE_CONFIG,
      block_out_channels=[32, 64, 128, 128],
      layers_per_block=1,
      norm_num_groups=32,
      sample_size=256,
    ),
    "text_encoder": _TEXT_ENCODER_768,
    "overrides": dict(render_resolution=128, sd_resolution=256),
  },
  "sd15": {
    "unet": dict(
      tiny_random.UNET_CONFIG,
      sample_size=64,
      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
      block_out_channels=[320, 640, 1280, 1280],
      layers_per_block=2,
      norm_num_groups=32,
      cross_attention_dim=768,
      attention_head_dim=8,
    ),
    "vae": dict(
      tiny_random.VAE_CONFIG,
      block_out_channels=[128, 256, 512, 512],
      layers_per_block=2,
      norm_num_groups=32,
      sample_size=512,
    ),
    "text_encoder": _TEXT_ENCODER_768,
    "overrides": dict(render_resolution=128, sd_resolution=512),
  },
}


# ------------------------------------------------------------------------------------------
# Models and configs.


def model_folder(name: str) -> Path:
  """The diffusers-format folder of a benchmark config, written once (random weights)."""
  if name == "tiny":
    return tiny_random.materialize_tiny_random()
  spec = MODEL_SPECS[name]
  folder = tiny_random.cache_root() / f"bench-{name}-v1"
  if (folder / "model_index.json").is_file():
    return folder
  import shutil

  from safetensors.numpy import save_file

  log(f"writing the random {name} model to {folder} (once)")
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".bench-{name}-", dir=folder.parent))
  # The tiny model supplies the tokenizer, scheduler and index; the networks are replaced.
  tiny_random.write_tiny_random(tmp)
  vocab, _ = tiny_random.tokenizer_files()
  text = dict(
    spec["text_encoder"],
    vocab_size=len(vocab),
    bos_token_id=vocab[tiny_random.BOS_TOKEN],
    eos_token_id=vocab[tiny_random.EOS_TOKEN],
    pad_token_id=vocab[tiny_random.EOS_TOKEN],
  )
  parts = (
    ("unet", spec["unet"], tiny_random.unet_state_shapes, "diffusion_pytorch_model.safetensors"),
    ("vae", spec["vae"], tiny_random.vae_state_shapes, "diffusion_pytorch_model.safetensors"),
    ("text_encoder", text, tiny_random.clip_text_state_shapes, "model.safetensors"),
  )
  for i, (sub, config, layout, filename) in enumerate(parts):
    (tmp / sub / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
      tiny_random.random_state(layout(config), 1234 + i),
      str(tmp / sub / filename),
      metadata={"format": "pt"},
    )
  try:
    os.rename(tmp, folder)
  except OSError:  # another process wrote it first
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


def fit_config(name: str, folder: Path, dtype: str):
  if name == "tiny":
    return config_lib.load_config(
      ROOT / "configs" / "tiny.yaml", [dict(model=str(folder), dtype=dtype)]
    )
  return config_lib.load_config(
    None, [dict(MODEL_SPECS[name]["overrides"], model=str(folder), dtype=dtype)]
  )


def prompts_for(num: int) -> list[str]:
  return [f"a portrait of head number {i}" for i in range(num)]


def peak_rss_mb() -> float:
  """This process's peak RSS: VmHWM, else getrusage's ru_maxrss.

  ru_maxrss survives fork + exec on Linux, so a child started by a big parent would report the
  parent's size; VmHWM belongs to the child's own address space.
  """
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------
# The two implementations behind one interface: run(k) does k steps and waits for them.


class JaxRunner:
  """sdsjax: make_batched_step (vmap over prompts) under jit, state donated."""

  def __init__(self, cfg, num_prompts: int, shared):
    import jax
    import jax.numpy as jnp

    from sdsjax import fit_step
    from sdsjax.fit_run import embedding_table

    sd, head = shared["sd"], shared["head"]
    self.jax = jax
    step = fit_step.make_fit_step(cfg, head, sd.encode_image, sd.predict_noise)
    self.frozen = fit_step.Frozen(
      vae_params=sd.params["vae"],
      unet_params=sd.params["unet"],
      alphas_cumprod=jnp.asarray(sd.alphas_cumprod, jnp.float32),
    )
    self.emb = jnp.asarray(embedding_table(sd.encode_text, prompts_for(num_prompts), cfg))
    self.keys = fit_step.prompt_keys([cfg.seed + i for i in range(num_prompts)])
    self.state = fit_step.batch_states(
      [fit_step.init_state(cfg, head.basis.shape[0])] * num_prompts
    )
    t0 = time.perf_counter()
    batched = fit_step.make_batched_step(step, donate=True)
    self.compiled = batched.lower(self.state, self.keys, self.emb, self.frozen).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = cost_flops(self.compiled)

  def run(self, k: int) -> None:
    for _ in range(k):
      self.state, metrics = self.compiled(self.state, self.keys, self.emb, self.frozen)
    self.jax.block_until_ready((self.state, metrics))


class TorchRunner:
  """The PyTorch baseline, prompts looped (`LoopBaseline`) or batched (`BatchedBaseline`)."""

  def __init__(self, cfg, num_prompts: int, shared, batched: bool):
    from benchmarks.torch_baseline import sds_step

    parts, head = shared["parts"], shared["torch_head"]
    emb = sds_step.embedding_table(
      parts, prompts_for(num_prompts), cfg.negative_prompt, cfg.view_prompts
    )
    compile_render = shared["torch_compile"]
    if parts.device.type == "cuda":  # this P's peak, not an earlier P's
      import torch

      torch.cuda.reset_peak_memory_stats()
    if batched:
      self.baseline = sds_step.BatchedBaseline(cfg, head, parts, emb, cfg.seed, compile_render)
    else:
      self.baseline = sds_step.LoopBaseline(
        cfg, head, parts, emb, [cfg.seed + i for i in range(num_prompts)], compile_render
      )
    self.compile_s = 0.0  # eager; with --torch-compile the first (warm-up) step compiles
    self.flops = None
    self.device = parts.device

  def run(self, k: int) -> None:
    def steps():
      for _ in range(k):
        self.baseline.step()

    run_torch(self.device, steps)


def run_torch(device, fn) -> None:
  """Runs `fn` with `device` as torch's default device, then waits for it (CUDA is
  asynchronous, so a clock read must follow the synchronisation). The baseline names its
  devices itself; the default device only guards against a factory call that does not."""
  import torch

  with torch.device(device):
    fn()
  if device.type == "cuda":
    torch.cuda.synchronize()


def cost_flops(compiled) -> float | None:
  """XLA's FLOP estimate of a compiled computation (cost_analysis: a dict or a list of dicts)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def load_shared(
  cfg, impls, torch_compile: bool, head_file: str | None = None, torch_threads: int = 0
) -> dict:
  """Loads each side's models once, from the same folder."""
  shared = {"torch_compile": torch_compile, "torch_threads": torch_threads}
  if "sdsjax" in impls:
    import jax.numpy as jnp

    from sdsjax import morphable
    from sdsjax.models.stable_diffusion import load_stable_diffusion

    shared["sd"] = load_stable_diffusion(
      cfg.model, dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    )
    shared["head"] = morphable.load_model(cfg.head, cfg.num_components)
  if any(i.startswith("torch") for i in impls):
    from benchmarks.torch_baseline import sds_step

    sds_step.configure_threads(shared["torch_threads"])
    parts = sds_step.load_parts(
      cfg.model, sds_step.TORCH_DTYPES[cfg.dtype], compile_models=torch_compile
    )
    sds_step.configure_precision(parts.device)
    shared["parts"] = parts
    shared["torch_head"] = sds_step.Head.from_arrays(
      **head_arrays(cfg, head_file), device=parts.device
    )
  return shared


def head_arrays(cfg, head_file: str | None = None) -> dict:
  """The normalised head (mean, basis, faces) as numpy: from sdsjax.morphable, or from the
  file the parent wrote, so torch-only children never import jax."""
  import numpy as np

  if head_file:
    with np.load(head_file) as data:
      return {k: data[k] for k in ("mean", "basis", "faces")}
  from sdsjax import morphable

  head = morphable.load_model(cfg.head, cfg.num_components)
  return {
    "mean": np.asarray(head.mean),
    "basis": np.asarray(head.basis),
    "faces": np.asarray(head.faces),
  }


def make_runner(impl: str, cfg, num_prompts: int, shared):
  if impl == "sdsjax":
    return JaxRunner(cfg, num_prompts, shared)
  return TorchRunner(cfg, num_prompts, shared, batched=impl == "torch-batched")


def device_name() -> str:
  try:
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
      return f"{dev.device_kind} ({dev.platform})"
  except Exception:
    pass
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"CPU: {cpu}, {os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------
# Peak memory: one child process per implementation, so each figure is that implementation's.


def child_main(args) -> None:
  """--child IMPL: load, compile, run a warm-up and one step, print peak memory as JSON."""
  folder = model_folder(args.config)
  cfg = fit_config(args.config, folder, args.dtype)
  impl = args.child
  shared = load_shared(cfg, [impl], args.torch_compile, args.head_file, args.torch_threads)
  runner = make_runner(impl, cfg, args.prompts[0], shared)
  runner.run(2)
  out = {"peak_rss_mb": peak_rss_mb()}
  if impl == "sdsjax":
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  else:
    import torch

    if torch.cuda.is_available():
      out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  print("CHILD_RESULT " + json.dumps(out))


def measure_memory(args, impl: str, num_prompts: int, head_file: str) -> dict:
  cmd = [
    sys.executable,
    str(Path(__file__).resolve()),
    "--child",
    impl,
    "--config",
    args.config,
    "--prompts",
    str(num_prompts),
    "--dtype",
    args.dtype,
    "--head-file",
    head_file,
  ]
  if args.torch_compile:
    cmd.append("--torch-compile")
  if args.torch_threads:
    cmd += ["--torch-threads", str(args.torch_threads)]
  cmd += ["--malloc", args.malloc]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  for line in proc.stdout.splitlines():
    if line.startswith("CHILD_RESULT "):
      return json.loads(line[len("CHILD_RESULT ") :])
  return {"error": (proc.stderr or proc.stdout)[-500:]}


def device_peaks_mb(impls) -> dict:
  """Accelerator memory peaks in this process (no child processes needed there): JAX's
  peak_bytes_in_use since the start (it cannot be reset, and P grows, so at the largest P it is
  that P's), and PyTorch's max_memory_allocated since this P's runners were made (the larger of
  torch-loop and torch-batched). Empty on CPU, where the child processes measure RSS."""
  out = {}
  if "sdsjax" in impls:
    import jax

    dev = jax.devices()[0]
    stats = (dev.memory_stats() or {}) if dev.platform != "cpu" else {}
    if "peak_bytes_in_use" in stats:
      out["sdsjax"] = stats["peak_bytes_in_use"] / 2**20
  if any(i.startswith("torch") for i in impls):
    import torch

    if torch.cuda.is_available():
      out["torch"] = torch.cuda.max_memory_allocated() / 2**20
  return out


# ------------------------------------------------------------------------------------------
# The benchmark.


def bench(args) -> dict:
  folder = model_folder(args.config)
  cfg = fit_config(args.config, folder, args.dtype)
  impls = [i for i in IMPLS if i in args.impls]
  steps = args.steps or DEFAULT_STEPS[args.config]
  # Peak memory first, from children started while this process is still small.
  memory = {}
  if args.memory:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
      head_file = str(Path(tmp) / "head.npz")
      np.savez(head_file, **head_arrays(cfg))
      for num_prompts in args.prompts if args.memory == "all" else [max(args.prompts)]:
        for impl in impls:
          memory[impl, num_prompts] = measure_memory(args, impl, num_prompts, head_file)
          log(f"P={num_prompts} {impl}: memory {memory[impl, num_prompts]}")
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  shared = load_shared(cfg, impls, args.torch_compile, torch_threads=args.torch_threads)
  load_s = time.perf_counter() - t0
  results = {
    "config": args.config,
    "model": str(folder),
    "dtype": args.dtype,
    "render_resolution": cfg.render_resolution,
    "sd_resolution": cfg.sd_resolution,
    "num_components": cfg.num_components,
    "steps_per_repeat": steps,
    "repeats": args.repeats,
    "torch_compile": args.torch_compile,
    "torch_threads": None,
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    "malloc_keep_freed_memory": args.malloc_kept,
    "device": device_name(),
    "load_s": load_s,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    "runs": [],
  }
  if any(i.startswith("torch") for i in impls):
    import torch

    results["torch_threads"] = torch.get_num_threads()
  for num_prompts in args.prompts:
    runners, rows = {}, {}
    for impl in impls:
      t0 = time.perf_counter()
      runners[impl] = make_runner(impl, cfg, num_prompts, shared)
      setup_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      runners[impl].run(1)  # warm-up (and torch.compile's compilation)
      first_s = time.perf_counter() - t0
      rows[impl] = {
        "impl": impl,
        "prompts": num_prompts,
        "setup_s": setup_s,
        "compile_s": runners[impl].compile_s,
        "first_step_s": first_s,
        "times": [],
      }
      log(f"P={num_prompts} {impl}: set up {setup_s:.1f}s, first step {first_s:.2f}s")
    for rep in range(args.repeats):
      order = impls[rep % len(impls) :] + impls[: rep % len(impls)]  # rotate who goes first
      for impl in order:
        t0 = time.perf_counter()
        runners[impl].run(steps)
        rows[impl]["times"].append((time.perf_counter() - t0) / steps)
      log(
        f"P={num_prompts} repeat {rep}: "
        + ", ".join(f"{i} {rows[i]['times'][-1]:.3f}s/step" for i in impls)
      )
    flops = runners["sdsjax"].flops if "sdsjax" in runners else None
    results.setdefault("device_peak_mb", {})[str(num_prompts)] = device_peaks_mb(impls)
    for impl in impls:
      row = rows[impl]
      sec = statistics.median(row["times"])
      row.update(
        s_per_step=sec,
        steps_per_s=1.0 / sec,
        prompt_steps_per_s=num_prompts / sec,
        step_flops=flops,
        achieved_gflops=flops / sec / 1e9 if flops else None,
      )
      if impl.startswith("torch") and args.torch_compile:
        row["compile_s"] = max(row["first_step_s"] - sec, 0.0)
      results["runs"].append(row)
    del runners
  if args.breakdown and "sdsjax" in impls and "torch-batched" in impls:
    results["breakdown"] = {}
    for num_prompts in sorted({min(args.prompts), max(args.prompts)}):
      stages = breakdown(cfg, shared, num_prompts)
      results["breakdown"][str(num_prompts)] = stages
      log(f"P={num_prompts} breakdown: {stages}")
  # The machine may be shared: the load average says how contended the timings were.
  results["loadavg_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
  for (impl, num_prompts), mem in memory.items():
    for row in results["runs"]:
      if row["impl"] == impl and row["prompts"] == num_prompts:
        row.update(mem)
  return results


# ------------------------------------------------------------------------------------------
# Where the time goes: the step's three heavy stages timed alone on each side.


def breakdown(cfg, shared, num_prompts: int, repeats: int = 3) -> dict:
  """Seconds (best of `repeats`) and XLA FLOPs of render fwd+bwd, VAE encode fwd+bwd (with the
  upsampling) and the UNet on [uncond, cond], for N = P·sds_samples views."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from benchmarks.torch_baseline import raster as torch_raster
  from benchmarks.torch_baseline import sds_step
  from sdsjax import fit_step

  sd, head, parts = shared["sd"], shared["head"], shared["parts"]
  n = num_prompts * cfg.sds_samples
  res, size, h = cfg.render_resolution, cfg.sd_resolution, cfg.sd_resolution // 8
  rng = np.random.default_rng(0)
  inputs = jax.vmap(lambda k: fit_step.make_sampler(cfg)(k, 0, len(sd.alphas_cumprod)))(
    jax.random.split(jax.random.PRNGKey(0), num_prompts)
  )
  views = jax.tree.map(lambda x: x.reshape((n, *x.shape[2:])), inputs.views)
  settings = fit_step.raster_settings(cfg, res)
  weights = jnp.asarray(0.3 * rng.standard_normal((n, cfg.num_components)), jnp.float32)
  cot_img = jnp.asarray(rng.standard_normal((n, res, res, 3)), jnp.float32)
  images = jnp.asarray(rng.random((n, res, res, 3)), jnp.float32)
  cot_z = jnp.asarray(rng.standard_normal((n, h, h, 4)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((2 * n, h, h, 4)), jnp.float32)
  t = jnp.asarray(rng.integers(20, 980, 2 * n), jnp.int32)
  emb = jnp.asarray(rng.standard_normal((2 * n, sd.text_length, sd.text_dim)), jnp.float32)

  def render_loss(w):
    rgb = jax.vmap(lambda wi, v: fit_step.render_view(head, {"weights": wi}, v, settings)[0])(
      w, views
    )
    return jnp.sum(rgb * cot_img)

  def encode_loss(x, vae):
    x = jax.image.resize(x, (n, size, size, 3), method="bilinear")
    return jnp.sum(sd.encode_image(vae, x) * cot_z)

  jax_stages = {
    "render fwd+bwd": (jax.grad(render_loss), (weights,)),
    "VAE encode fwd+bwd": (jax.grad(encode_loss), (images, sd.params["vae"])),
    "UNet [uncond, cond]": (sd.predict_noise, (sd.params["unet"], z, t, emb)),
  }
  out = {}
  for name, (fn, args) in jax_stages.items():
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    out[name] = {
      "flops": cost_flops(compiled),
      "sdsjax_s": best_time(lambda: jax.block_until_ready(compiled(*args)), repeats),
    }

  thead = shared["torch_head"]
  grad = sds_step.SdsGradient(cfg, thead, parts, shared["torch_compile"])
  dev = parts.device
  to_t = lambda x: torch.from_numpy(np.array(x)).to(dev)
  tin = sds_step.SdsInputs(
    cameras=torch_raster.Cameras(
      world_to_view=to_t(views.camera.world_to_view),
      focal=to_t(views.camera.focal),
      eye=to_t(views.camera.eye),
    ),
    lights=torch_raster.Lights(
      direction=to_t(views.light.direction),
      ambient=to_t(views.light.ambient),
      diffuse=to_t(views.light.diffuse),
    ),
    azimuth=to_t(views.azimuth),
    elevation=to_t(views.elevation),
    t=None,
    noise=None,
  )
  tw = to_t(weights).requires_grad_(True)
  t_cot_img, t_images = to_t(cot_img), to_t(images).requires_grad_(True)
  t_cot_z = to_t(cot_z).permute(0, 3, 1, 2)
  t_z, t_t, t_emb = to_t(z).permute(0, 3, 1, 2).contiguous(), to_t(t).long(), to_t(emb)

  def torch_render():
    tw.grad = None
    verts = thead.vertices(tw)
    rgb, _, _ = grad._render(verts, thead.faces, tin.cameras, tin.lights, grad.settings)
    (rgb * t_cot_img).sum().backward()

  def torch_encode():
    t_images.grad = None
    grad.encode(t_images).backward(t_cot_z)

  @torch.no_grad()
  def torch_unet():
    parts.unet(t_z.to(parts.dtype), t_t, encoder_hidden_states=t_emb.to(parts.dtype))

  for name, fn in zip(jax_stages, (torch_render, torch_encode, torch_unet)):
    timed = lambda fn=fn: run_torch(dev, fn)
    timed()
    out[name]["torch_s"] = best_time(timed, repeats)
  return out


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def markdown(results: dict) -> str:
  """A table of the medians with ratios of sdsjax to each baseline."""
  runs = results["runs"]
  by = {(r["impl"], r["prompts"]): r for r in runs}
  lines = [
    "| P | impl | s/step | steps/s | prompts·steps/s | sdsjax × | compile s | "
    "GFLOP/s | peak RSS MB |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in runs:
    jax_row = by.get(("sdsjax", r["prompts"]))
    ratio = (jax_row["steps_per_s"] / r["steps_per_s"]) if jax_row else None
    fmt = lambda v, spec: "–" if v is None else format(v, spec)
    lines.append(
      f"| {r['prompts']} | {r['impl']} | {r['s_per_step']:.3f} | {r['steps_per_s']:.3f} | "
      f"{r['prompt_steps_per_s']:.3f} | "
      f"{'' if r['impl'] == 'sdsjax' else fmt(ratio, '.2f')} | "
      f"{fmt(r.get('compile_s'), '.1f')} | {fmt(r.get('achieved_gflops'), '.1f')} | "
      f"{fmt(r.get('peak_rss_mb'), '.0f')} |"
    )
  for num_prompts, stages in results.get("breakdown", {}).items():
    lines += [
      "",
      f"Stages alone, P={num_prompts} (best of 3; GFLOP from XLA cost_analysis):",
      "",
      "| stage | GFLOP | sdsjax s | torch s | torch / sdsjax |",
      "|---|---|---|---|---|",
    ]
    for name, st in stages.items():
      gflop = "–" if not st["flops"] else f"{st['flops'] / 1e9:.2f}"
      lines.append(
        f"| {name} | {gflop} | {st['sdsjax_s']:.4f} | {st['torch_s']:.4f} | "
        f"{st['torch_s'] / st['sdsjax_s']:.2f} |"
      )
  peaks = {p: v for p, v in results.get("device_peak_mb", {}).items() if v}
  if peaks:
    lines.append("")
    lines.append(
      "Device memory peaks (MB): "
      + "; ".join(
        f"P={p}: " + ", ".join(f"{k} {mb:.0f}" for k, mb in v.items()) for p, v in peaks.items()
      )
    )
  flops = {r["prompts"]: r["step_flops"] for r in runs if r.get("step_flops")}
  if flops:
    lines.append("")
    lines.append(
      "XLA cost_analysis FLOPs per step: "
      + ", ".join(f"P={p}: {f / 1e9:.2f} GFLOP" for p, f in sorted(flops.items()))
    )
  return "\n".join(lines)


def log(msg: str) -> None:
  print(f"[bench_fit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", choices=("tiny", "small", "sd15"), default="tiny")
  p.add_argument("--prompts", type=int, nargs="+", default=[1, 4, 8])
  p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
  p.add_argument("--steps", type=int, default=0, help="steps per timed repeat (0: per config)")
  p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument(
    "--torch-threads",
    type=int,
    default=0,
    help="torch intra-op threads (0: os.cpu_count(), the default tuned setting)",
  )
  p.add_argument(
    "--omp-wait-policy",
    choices=("default", "passive", "active"),
    default="default",
    help="OMP_WAIT_POLICY for torch's OpenMP threads (an explicit environment "
    "setting wins). default: libgomp's (spin briefly, then sleep), which was "
    "fastest for torch on an idle machine without slowing XLA; passive suits "
    "a machine shared with other jobs; active spins forever and slows XLA",
  )
  p.add_argument(
    "--malloc",
    choices=("keep", "default"),
    default="keep",
    help="keep: sdsjax.host_memory.keep_freed_memory(), as python -m sdsjax.fit "
    "does, for every implementation (they share the process); default: "
    "glibc's defaults",
  )
  p.add_argument(
    "--torch-compile",
    action="store_true",
    help="torch.compile the baseline's renderer, UNet and VAE encoder",
  )
  p.add_argument(
    "--memory",
    choices=("none", "max", "all"),
    default="max",
    help="peak memory from child processes: at the largest P (max), every P, none",
  )
  p.add_argument(
    "--breakdown",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also time render / VAE / UNet alone on both sides (smallest and largest P)",
  )
  p.add_argument("--json", help="also write the results to this file")
  p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
  p.add_argument("--head-file", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.memory = None if args.memory == "none" else args.memory
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  # Read by libgomp when torch loads it, which happens after this point (imports are lazy).
  if args.omp_wait_policy != "default":
    os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy.upper())
  # Before any framework allocates (see sdsjax/host_memory.py); the child processes too.
  args.malloc_kept = args.malloc == "keep" and host_memory.keep_freed_memory()
  if args.child:
    child_main(args)
    return
  results = bench(args)
  text = json.dumps(results, indent=2)
  print(text)
  if args.json:
    Path(args.json).write_text(text + "\n")
  print()
  print(markdown(results))


if __name__ == "__main__":
  main()
