"""sdsjax and the PyTorch baseline behind one interface, for bench_fit and fit_stages.

`load_shared` loads each side's models once, from the same diffusers folder; `make_runner(impl,
cfg, P, shared)` sets up P prompts of one implementation ("sdsjax", "torch-loop" or
"torch-batched"), whose `run(k)` does k steps and waits for them. jax is imported only for sdsjax,
so a torch-only child process never imports it.
"""

from __future__ import annotations

import time

from . import common


def prompts_for(num: int) -> list[str]:
  return [f"a portrait of head number {i}" for i in range(num)]


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
    self.emb = jnp.asarray(embedding_table(sd, prompts_for(num_prompts), cfg))
    self.keys = fit_step.prompt_keys([cfg.seed + i for i in range(num_prompts)])
    self.state = fit_step.batch_states([fit_step.init_state(cfg, head)] * num_prompts)
    t0 = time.perf_counter()
    batched = fit_step.make_batched_step(step, donate=True)
    lowered = batched.lower(self.state, self.keys, self.emb, self.frozen)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = common.xla_flops(lowered, self.compiled)

  def run(self, k: int) -> None:
    for _ in range(k):
      self.state, metrics = self.compiled(self.state, self.keys, self.emb, self.frozen)
    self.jax.block_until_ready((self.state, metrics))


class TorchRunner:
  """The PyTorch baseline, prompts looped (`LoopBaseline`) or batched (`BatchedBaseline`)."""

  def __init__(self, cfg, num_prompts: int, shared, batched: bool):
    from sdsjax import fit_step

    from .torch_baseline import sds_step

    parts, head, compile_render = shared["parts"], shared["torch_head"], shared["torch_compile"]
    cfg = fit_step.resolve_closeup_target(cfg, head.mean.detach().cpu().numpy())
    emb = sds_step.embedding_table(
      parts, prompts_for(num_prompts), cfg.negative_prompt, cfg.view_prompts
    )
    common.torch_device_peak_mb(reset=True)  # this P's peak, not an earlier P's
    if batched:
      self.baseline = sds_step.BatchedBaseline(cfg, head, parts, emb, cfg.seed, compile_render)
    else:
      seeds = [cfg.seed + i for i in range(num_prompts)]
      self.baseline = sds_step.LoopBaseline(cfg, head, parts, emb, seeds, compile_render)
    self.compile_s = None  # eager; with --torch-compile the first (warm-up) step compiles
    self.device = parts.device

  def run(self, k: int) -> None:
    common.on_torch_device(self.device, lambda: [self.baseline.step() for _ in range(k)])


def make_runner(impl: str, cfg, num_prompts: int, shared):
  if impl == "sdsjax":
    return JaxRunner(cfg, num_prompts, shared)
  return TorchRunner(cfg, num_prompts, shared, batched=impl == "torch-batched")


def load_shared(
  cfg, impls, torch_compile=False, torch_threads: int = 0, head_file: str | None = None
) -> dict:
  """Loads each side's models once, from the same folder. torch_compile: `torch.compile` the
  baseline's renderer, UNet and VAE encoder; torch_threads: intra-op threads (0: every core)."""
  shared = {"torch_compile": torch_compile}
  if "sdsjax" in impls:
    import jax.numpy as jnp

    from sdsjax import morphable
    from sdsjax.models.stable_diffusion import load_stable_diffusion

    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    shared["sd"] = load_stable_diffusion(cfg.model, dtype=dtype)
    shared["head"] = morphable.load_model(cfg.head, cfg.num_components)
  if any(i.startswith("torch") for i in impls):
    from .torch_baseline import sds_step

    sds_step.configure_threads(torch_threads)
    parts = sds_step.load_parts(
      cfg.model, sds_step.TORCH_DTYPES[cfg.dtype], compile_models=torch_compile
    )
    sds_step.configure_precision(parts.device)
    shared["parts"] = parts
    arrays = head_arrays(cfg, head_file)
    shared["torch_head"] = sds_step.Head.from_arrays(**arrays, device=parts.device)
  return shared


def head_arrays(cfg, head_file: str | None = None) -> dict:
  """The normalised head (mean, basis, faces) as numpy: from sdsjax.morphable, or from the file
  the parent wrote, so torch-only children never import jax."""
  import numpy as np

  if head_file:
    with np.load(head_file) as data:
      return {k: data[k] for k in ("mean", "basis", "faces")}
  from sdsjax import morphable

  head = morphable.load_model(cfg.head, cfg.num_components)
  return {k: np.asarray(getattr(head, k)) for k in ("mean", "basis", "faces")}
