"""Teachers: denoisers with known answers, to measure fit quality without Stable Diffusion.

No SD weights reach the machines this project is built on, so fit quality is shown with
denoisers whose optimum is known and whose SDS gradients have the shape of real ones:

- **Gaussian teacher.** Both classifier-free-guidance branches are the *exact* denoisers of
  Gaussian data in latent space, seen from the view being fitted:
  - conditional: narrow (std `cond_std`) around the latents of a target head w* rendered from
    the sampled view (`DenoiserContext.view`);
  - unconditional: broad (std `uncond_std`) around the mean head.
  For data x₀ ~ N(μ, s²I) and z_t = √ᾱ·x₀ + √(1−ᾱ)·ε the posterior mean of ε is
  `√(1−ᾱ)·(z_t − √ᾱ·μ) / (ᾱ·s² + 1 − ᾱ)`. With guidance s = 100, ε̂ = ε_u + s(ε_c − ε_u)
  pulls towards the target and carries the (ε − ε_u) noise of real SDS, but it settles
  *past* the target (`guided_overshoot`): CFG's over-saturation. How far depends on
  `uncond_std`: with the spread of random heads (≈ 0.05 in latent units) the fixed point lies
  ~60× further from the mean head than w* does; with SD's unit-variance latents (real SD's
  unconditional branch models all images, not all heads) and t annealed to 0.5, 0.64×.
- **Null teacher.** The same with conditional = unconditional: no information about any
  target, so a good prior keeps the weights near 0.

Targets travel in the text embeddings (`teacher_embeddings`: row 0 unconditional, rows 1-4 a
flag and the prompt's target index), so many targets run as one vmapped fit. The teacher's
parameters (`Frozen.unet_params`) hold the targets and ᾱ.

The means μ are renders of the target (or mean) head. `gaussian_teacher` renders them from each
sampled view; `banked_gaussian_teacher` looks them up in a `ViewBank`: random views drawn once
from the fit's own camera and light distribution, with their latents precomputed, so a step
costs one render (the fit's) instead of three.

`latent_rgb_encoder` is a cheap stand-in for SD's VAE: 8× area downsampling and the
least-squares inverse of the published SD-1.x latent → RGB "preview" factors (ComfyUI's
`latent_formats.py`, SD15), so its latent geometry resembles the real VAE's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sdsjax import config as config_lib
from sdsjax import fit_step
from sdsjax import morphable
from sdsjax import sds
from sdsjax.config import FitConfig

# SD-1.x latents (UNet-scaled) -> RGB in [-1, 1]: rgb ≈ Σ_c z_c · F[c]. Source: ComfyUI
# comfy/latent_formats.py (SD15), via ../shared/REFERENCE.md.
SD15_LATENT_RGB = np.array(
  [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
  ],
  np.float32,
)


def latent_rgb_encoder(factors: np.ndarray = SD15_LATENT_RGB):
  """`encode(params, images (N, H, W, 3) in [0, 1]) -> (N, H/8, W/8, 4)`; params unused.

  Area-averages 8×8 blocks, maps to [−1, 1] and applies the least-squares inverse of
  `factors` (the minimum-norm latent whose preview is the block's colour).
  """
  inverse = jnp.asarray(np.linalg.pinv(factors), jnp.float32)  # (3, 4)

  def encode(params, images):
    del params
    n, h, w, _ = images.shape
    blocks = images.reshape(n, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
    return (2.0 * blocks - 1.0) @ inverse

  return encode


def teacher_embeddings(target_index, conditional: bool = True) -> np.ndarray:
  """(P, 5, 1, 2) embedding tables telling a teacher each prompt's target.

  Row 0 is the unconditional row (flag 0); rows 1-4 carry flag 1 (0 for a null teacher, whose
  conditional branch then equals the unconditional one) and the target's index.
  """
  index = np.asarray(target_index, np.float32)
  p = index.shape[0]
  cond = np.stack([np.full(p, float(conditional), np.float32), index], axis=-1)
  uncond = np.stack([np.zeros(p, np.float32), index], axis=-1)
  rows = np.concatenate([uncond[:, None], np.repeat(cond[:, None], 4, axis=1)], axis=1)
  return rows[:, :, None, :]


def _decode_rows(embeddings):
  code = embeddings[:, 0, :]
  return code[:, 0] > 0.5, code[:, 1].astype(jnp.int32)


def render_latents(cfg: FitConfig, head, encode_fn, params: dict, view) -> jax.Array:
  """Latents (h, w, 4) of the head at `params` seen from `view`, exactly as the fit renders."""
  settings = config_lib.raster_settings(cfg, cfg.render_resolution)
  rgb, _ = fit_step.render_view(cfg, head, params, view, settings)
  size = cfg.sd_resolution
  image = jax.image.resize(rgb[None], (1, size, size, 3), method="bilinear")
  return encode_fn(None, image)[0]


def target_params(cfg: FitConfig, head, targets: dict, i, conditional) -> dict:
  """The head parameters whose render is the teacher's mean: target i, or the mean head."""
  params = {"weights": jnp.where(conditional, targets["weights"][i], 0.0)}
  if cfg.num_expressions:
    params["expression"] = jnp.where(conditional, targets["expression"][i], 0.0)
  if cfg.pose_joints:
    params["pose"] = jnp.zeros((len(cfg.pose_joints), 3), jnp.float32)
  if "texture" in targets:
    texture = jnp.where(conditional, targets["texture"][i], targets["base_texture"])
    texture = jnp.clip(texture, 1e-4, 1.0 - 1e-4)
    params["texture_logits"] = jnp.log(texture / (1.0 - texture))
  return params


def gaussian_eps(z_t, abar, mu, std):
  """ε's posterior mean for data N(μ, std²): √(1−ᾱ)(z_t − √ᾱ μ)/(ᾱ std² + 1 − ᾱ), (N, h, w, c)."""
  abar = abar[:, None, None, None]
  std = std[:, None, None, None]
  z_t = z_t.astype(jnp.float32)
  return jnp.sqrt(1.0 - abar) * (z_t - jnp.sqrt(abar) * mu) / (abar * std**2 + 1.0 - abar)


def _denoiser_coefficients(abar, std):
  """(a, β) of the exact denoiser of N(μ, std²) data at ᾱ = `abar` (NumPy, float64):
  ε_θ(z_t) = a·(z − μ) + β·ε for z_t = √ᾱ·z + √(1−ᾱ)·ε (`gaussian_eps`)."""
  denominator = abar * std**2 + 1.0 - abar
  return np.sqrt(abar * (1.0 - abar)) / denominator, (1.0 - abar) / denominator


def guided_overshoot(
  alphas_cumprod, guidance_scale, cond_std, uncond_std, t_range, weighting: str = "sds"
) -> float:
  """ē: how far past the conditional mean guided SDS settles with Gaussian teachers.

  For the Gaussian teacher the mean SDS residual at clean latents z and step t is linear in z:
  with a_b = √(ᾱ(1−ᾱ)) / (ᾱ·std_b² + 1 − ᾱ), E_ε[ε̂ − ε] = s·a_c(z − μ_c) − (s−1)·a_u(z − μ_u),
  which vanishes at z*_t = μ_c + e_t·(μ_c − μ_u) with e_t = (s−1)·a_u / (s·a_c − (s−1)·a_u).
  Averaged over t ~ U(t_range)·T (as `sds.sample_timesteps` draws it) with weights w(t)·k_t,
  k_t = s·a_c − (s−1)·a_u, the fit's fixed point is μ_c + ē·(μ_c − μ_u): past the target by
  ē of the way from the unconditional mean (CFG's over-saturation). Where the latents are
  linear in the weights, w = (1 + ē)·w*, a relative error of ē that no optimiser removes.
  """
  alphas_cumprod = np.asarray(alphas_cumprod, np.float64)
  num = alphas_cumprod.shape[0]
  lo, hi = (int(b) for b in sds.timestep_bounds(t_range[0], t_range[1], num))
  abar = alphas_cumprod[lo : min(hi, num)]
  s = float(guidance_scale)
  a_c, _ = _denoiser_coefficients(abar, cond_std)
  a_u, _ = _denoiser_coefficients(abar, uncond_std)
  k = s * a_c - (s - 1.0) * a_u
  weight = np.asarray(sds.sds_weight(abar, weighting), np.float64) * k
  return float(np.sum(weight * (s - 1.0) * a_u / k) / np.sum(weight))


def residual_coefficients(alphas_cumprod, t, guidance_scale, cond_std, uncond_std):
  """(signal gain g_t, noise coefficient c_t) of one guided draw at integer steps `t`.

  With ε_b = a_b·(z − μ_b) + β_b·ε, β_b = (1−ᾱ)/(ᾱ·std_b² + 1 − ᾱ), the guided residual is
  ε̂ − ε = s·a_c·(z − μ_c) − (s−1)·a_u·(z − μ_u) + c_t·ε with c_t = s·β_c − (s−1)·β_u − 1.
  Only μ_c (the target) is unknown, so a draw observes μ_c with gain g_t = s·a_c through
  Gaussian noise of std |c_t| per latent element.
  """
  abar = np.asarray(alphas_cumprod, np.float64)[np.asarray(t)]
  s = float(guidance_scale)
  a_c, beta_c = _denoiser_coefficients(abar, cond_std)
  _, beta_u = _denoiser_coefficients(abar, uncond_std)
  return s * a_c, s * beta_c - (s - 1.0) * beta_u - 1.0


def draw_information(alphas_cumprod, t, guidance_scale, cond_std, uncond_std):
  """Fisher information about the target's latents that one draw at step t carries, per
  latent element: (g_t / c_t)² (`residual_coefficients`). It grows at both ends of the t range,
  where the guided residual is nearly free of noise."""
  gain, noise = residual_coefficients(alphas_cumprod, t, guidance_scale, cond_std, uncond_std)
  return (gain / np.maximum(np.abs(noise), 1e-12)) ** 2


def information_floor(jacobian_gram, mean_draw_information: float, num_draws: int, groups):
  """The smallest RMS relative error of ANY estimate of w* ~ N(0, I) from a fit's draws.

  For latents linear in the weights (z = z₀ + J·w, the Jacobian at the mean head) the draws
  are Gaussian observations of J·w*, so the Bayes posterior covariance is (I + F)⁻¹ with
  F = num_draws · E[information] · E_views[JᵀJ]; by Jensen, the expected F gives a lower bound
  on the error for random views and t. A fit that follows the SDS gradient uses less than this
  (it also settles `guided_overshoot` past w*).

  Args:
    jacobian_gram: (K, K) E_views[JᵀJ] over the fit's view distribution.
    mean_draw_information: E[`draw_information`] over the fit's t draws.
    num_draws: steps × sds_samples.
    groups: {name: (lo, hi)} column ranges of the parameter groups (identity, expression).

  Returns:
    {name: sqrt(E‖ŵ − w*‖² / K_group)}, the expected relative error over the group, per group.
  """
  gram = np.asarray(jacobian_gram, np.float64)
  fisher = num_draws * float(mean_draw_information) * gram
  posterior = np.linalg.inv(np.eye(gram.shape[0]) + fisher)
  diag = np.diag(posterior)
  return {name: float(np.sqrt(np.mean(diag[lo:hi]))) for name, (lo, hi) in groups.items()}


def latent_spread(cfg: FitConfig, head, encode_fn, key, samples: int = 32) -> float:
  """RMS difference between the latents of random heads (w ~ N(0, 1)) and the mean head's."""
  k_w, k_v = jax.random.split(key)
  weights = jax.random.normal(k_w, (samples, head.num_components))
  views = jax.vmap(lambda k: fit_step.sample_view(k, 0, cfg))(jax.random.split(k_v, samples))
  # Shape only: the spread of heads, not of textures.
  shape_cfg = config_lib.load_config(None, [{**config_lib.to_dict(cfg), "texture": False}])

  def diff(w, view):
    a = render_latents(shape_cfg, head, encode_fn, {"weights": w}, view)
    b = render_latents(shape_cfg, head, encode_fn, {"weights": jnp.zeros_like(w)}, view)
    return jnp.mean((a - b) ** 2)

  return float(jnp.sqrt(jnp.mean(jax.jit(jax.vmap(diff))(weights, views))))


def gaussian_teacher(
  cfg: FitConfig, head: morphable.MorphableModel, encode_fn, cond_std, uncond_std
):
  """The Gaussian teacher's `eps_fn(teacher_params, z_t, t, embeddings, context)`.

  Renders its means from every sampled view. `teacher_params`: {"alphas_cumprod": (T,),
  "targets": {"weights": (n, K), optional "expression": (n, E), "texture": (n, Ht, Wt, 3) and
  "base_texture": (Ht, Wt, 3), the unconditional texture}}.
  """

  def eps_fn(teacher_params, z_t, t, embeddings, context):
    cond, index = _decode_rows(embeddings)
    targets = teacher_params["targets"]

    def mean(c, i, view):
      params = target_params(cfg, head, targets, i, c)
      return render_latents(cfg, head, encode_fn, params, view)

    mu = jax.vmap(mean)(cond, index, context.view)
    std = jnp.where(cond, cond_std, uncond_std)
    return gaussian_eps(z_t, teacher_params["alphas_cumprod"][t], mu, std)

  return eps_fn


@struct.dataclass
class ViewBank:
  """Random views drawn once, and the teacher's mean latents seen from each.

  Attributes:
    views: fit_step.View with leading (B,).
    uncond: (B, h, w, c) latents of the mean head (and base texture).
    cond: (n, B, h, w, c) latents of each target.
  """

  views: fit_step.View
  uncond: jax.Array
  cond: jax.Array


def view_bank(cfg: FitConfig, head, encode_fn, targets: dict, key, size: int) -> ViewBank:
  """`size` views from the fit's own camera/light distribution, with their teacher latents."""
  views = jax.vmap(lambda k: fit_step.sample_view(k, 0, cfg))(jax.random.split(key, size))
  n = targets["weights"].shape[0]
  render = jax.jit(
    jax.vmap(
      lambda i, c, view: render_latents(
        cfg, head, encode_fn, target_params(cfg, head, targets, i, c), view
      ),
      in_axes=(None, None, 0),
    )
  )
  uncond = render(0, False, views)
  cond = jnp.stack([render(i, True, views) for i in range(n)])
  return ViewBank(views=views, uncond=uncond, cond=cond)


def bank_view_sampler(bank: ViewBank):
  """`view_sampler(key, step) -> View`: a uniformly drawn view of the bank."""
  size = bank.uncond.shape[0]

  def sample(key, step):
    del step
    i = jax.random.randint(key, (), 0, size)
    return jax.tree.map(lambda x: x[i], bank.views)

  return sample


def banked_gaussian_teacher(cond_std, uncond_std):
  """The Gaussian teacher over a `ViewBank` (teacher_params["bank"]); views must come from it.

  The view is found in the bank by its camera (exact: the sampler hands out the bank's own
  arrays), so each step's teacher is a lookup instead of two renders.
  """

  def eps_fn(teacher_params, z_t, t, embeddings, context):
    bank: ViewBank = teacher_params["bank"]
    cond, index = _decode_rows(embeddings)
    eyes = bank.views.camera.eye  # (B, 3)
    dist = jnp.sum((context.view.camera.eye[:, None, :] - eyes[None]) ** 2, axis=-1)
    slot = jnp.argmin(dist, axis=-1)
    mu = jnp.where(cond[:, None, None, None], bank.cond[index, slot], bank.uncond[slot])
    std = jnp.where(cond, cond_std, uncond_std)
    return gaussian_eps(z_t, teacher_params["alphas_cumprod"][t], mu, std)

  return eps_fn
