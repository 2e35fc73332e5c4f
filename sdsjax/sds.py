"""Score Distillation Sampling: the pieces of DreamFusion's gradient as small pure functions.

For latents z = E(render(θ)), a timestep t and noise ε:

    z_t = √ᾱ_t·z + √(1−ᾱ_t)·ε
    ε̂   = ε_uncond + s·(ε_text − ε_uncond)          (classifier-free guidance)
    ∂L/∂z = w(t)·(ε̂ − ε)                            (the denoiser's Jacobian is dropped)

ᾱ is the scheduler's `alphas_cumprod`, never the per-step `alphas`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

# eps_fn(params, latents_noisy (N,h,w,4), t (N,), text_embeddings (N,L,D), context) -> ε
# (N,h,w,4). `context` is a pytree with leading (N,) that tells the denoiser what it looks at
# (sdsjax.fit_step.DenoiserContext: the sampled views and the head's geometry); Stable
# Diffusion ignores it, view-aware denoisers (teachers, ControlNets) read it.
EpsFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Any], jax.Array]


def anneal_steps(total_steps: int, anneal_fraction: float) -> int:
  """Steps over which a schedule moves from t_max to t_max_end: the first `anneal_fraction` of
  the run (at least 1); later steps hold the end."""
  return max(round(anneal_fraction * total_steps), 1)


def annealed_t_max(step, num_anneal_steps: int, t_max: float, t_max_end: float):
  """Max of the t range, annealed linearly from `t_max` to `t_max_end` over the first
  `num_anneal_steps` steps, then held."""
  frac = jnp.clip(step / max(num_anneal_steps - 1, 1), 0.0, 1.0)
  return t_max + (t_max_end - t_max) * frac


# DreamTime's ± jitter around its monotone t(step), as a fraction of [t_min, t_max].
DREAMTIME_JITTER = 0.025


def timestep_bounds(t_min, t_max, num_train_timesteps: int):
  """[lo, hi) of the integers `sample_timesteps` draws for U(t_min, t_max)·T (before clipping
  to T − 1)."""
  return jnp.floor(t_min * num_train_timesteps), jnp.ceil(t_max * num_train_timesteps)


def sample_timesteps(key, shape, t_min, t_max, num_train_timesteps: int) -> jax.Array:
  """Integer timesteps t ~ U(t_min, t_max)·T, as int32 of `shape`."""
  lo, hi = timestep_bounds(t_min, t_max, num_train_timesteps)
  t = jax.random.uniform(key, shape, minval=lo, maxval=hi)
  return jnp.clip(t.astype(jnp.int32), 0, num_train_timesteps - 1)


def schedule_timesteps(
  key,
  shape,
  step,
  num_anneal_steps: int,
  t_range: tuple[float, float],
  t_max_end: float,
  schedule: str,
  num_train_timesteps: int,
) -> jax.Array:
  """Integer timesteps for one step of a run, as int32 of `shape`.

  `num_anneal_steps` (`anneal_steps`) is how long the "anneal" and "dreamtime" schedules take
  to reach `t_max_end`; they hold it afterwards, so a run can end with many steps at low t.
  - "random": t ~ U(t_min, t_max) (DreamFusion).
  - "anneal": t ~ U(t_min, t_hi) with t_hi falling linearly from t_max to t_max_end
    (coarse shape first, details later; threestudio's max-t annealing, HumanNorm's 0.8 → 0.2).
  - "dreamtime": a monotone non-increasing t(step) = t_max − (t_max − t_max_end)·√frac
    (the square-root anneal of HiFA/threestudio, DreamTime's monotone idea), jittered by
    ±2.5% of [t_min, t_max] so that repeated draws differ.
  """
  t_min, t_max = t_range
  if schedule == "random":
    return sample_timesteps(key, shape, t_min, t_max, num_train_timesteps)
  if schedule == "anneal":
    t_hi = annealed_t_max(step, num_anneal_steps, t_max, t_max_end)
    return sample_timesteps(key, shape, t_min, t_hi, num_train_timesteps)
  if schedule == "dreamtime":
    frac = jnp.clip(step / max(num_anneal_steps - 1, 1), 0.0, 1.0)
    centre = t_max - (t_max - t_max_end) * jnp.sqrt(frac)
    jitter = DREAMTIME_JITTER * (t_max - t_min)
    jitter = jitter * jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
    t = jnp.clip(centre + jitter, t_min, t_max) * num_train_timesteps
    return jnp.clip(t.astype(jnp.int32), 0, num_train_timesteps - 1)
  raise ValueError(f"unknown t schedule '{schedule}'")


def final_t_range(t_range: tuple[float, float], t_max_end: float, schedule: str):
  """(t_min, t_max) that `schedule_timesteps` draws from at the last step of a run."""
  t_min, t_max = t_range
  if schedule == "anneal":
    return t_min, t_max_end
  if schedule == "dreamtime":
    jitter = DREAMTIME_JITTER * (t_max - t_min)
    return max(t_min, t_max_end - jitter), min(t_max, t_max_end + jitter)
  return t_min, t_max


def sds_weight(alpha_bar, weighting: str = "sds"):
  """w(t) from ᾱ_t: 'sds' = 1−ᾱ (σ²), 'uniform' = 1, 'fantasia3d' = √ᾱ·(1−ᾱ)."""
  if weighting == "sds":
    return 1.0 - alpha_bar
  if weighting == "uniform":
    return jnp.ones_like(alpha_bar)
  if weighting == "fantasia3d":
    return jnp.sqrt(alpha_bar) * (1.0 - alpha_bar)
  raise ValueError(f"unknown SDS weighting '{weighting}'")


def add_noise(latents, noise, alpha_bar):
  """z_t = √ᾱ·z + √(1−ᾱ)·ε. `alpha_bar` is (N,), latents and noise (N,h,w,c)."""
  a = alpha_bar.reshape((-1,) + (1,) * (latents.ndim - 1))
  return jnp.sqrt(a) * latents + jnp.sqrt(1.0 - a) * noise


def classifier_free_guidance(eps_uncond, eps_text, guidance_scale):
  """ε̂ = ε_uncond + s·(ε_text − ε_uncond)."""
  return eps_uncond + guidance_scale * (eps_text - eps_uncond)


def sds_gradient(
  eps_fn: EpsFn,
  denoiser_params,
  latents,
  t,
  noise,
  text_embeddings,
  uncond_embeddings,
  alphas_cumprod,
  guidance_scale: float,
  weighting: str = "sds",
  context: Any = None,
):
  """The SDS gradient w(t)·(ε̂ − ε) on `latents`, with no path back through the denoiser.

  Args:
    eps_fn: the noise predictor.
    denoiser_params: its parameters.
    latents: (N, h, w, c) clean latents z.
    t: (N,) int32 timesteps.
    noise: (N, h, w, c) ε.
    text_embeddings: (N, L, D) conditional embeddings.
    uncond_embeddings: (N, L, D) unconditional (or negative-prompt) embeddings.
    alphas_cumprod: (T,) ᾱ.
    guidance_scale: s.
    weighting: see `sds_weight`.
    context: pytree with leading (N,) passed on to `eps_fn` (duplicated for both halves).

  Returns:
    (grad (N, h, w, c), eps_residual (N, h, w, c) = ε̂ − ε), both free of gradients.
  """
  chex.assert_equal_shape([latents, noise])
  chex.assert_rank([latents, t], [4, 1])
  latents = jax.lax.stop_gradient(latents)
  alpha_bar = jnp.asarray(alphas_cumprod)[t]
  noisy = add_noise(latents, noise, alpha_bar)
  # One UNet batch of 2N: [uncond; text], as every SD pipeline does.
  eps = eps_fn(
    denoiser_params,
    jnp.concatenate([noisy, noisy]),
    jnp.concatenate([t, t]),
    jnp.concatenate([uncond_embeddings, text_embeddings]),
    jax.tree.map(lambda x: jnp.concatenate([x, x]), context),
  )
  eps = jax.lax.stop_gradient(eps).astype(latents.dtype)
  eps_uncond, eps_text = jnp.split(eps, 2)
  residual = classifier_free_guidance(eps_uncond, eps_text, guidance_scale) - noise
  w = sds_weight(alpha_bar, weighting).reshape(-1, 1, 1, 1)
  # A non-finite gradient must not poison Adam's moments: the step checks and skips it.
  return w * residual, residual


def sds_surrogate_loss(latents, grad):
  """0.5·Σ(z − sg(z − grad))² / N: a scalar whose gradient w.r.t. z is exactly `grad`."""
  target = jax.lax.stop_gradient(latents - grad)
  return 0.5 * jnp.sum((latents - target) ** 2) / latents.shape[0]
