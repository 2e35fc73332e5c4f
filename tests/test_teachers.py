"""The Gaussian teachers' algebra: the posterior mean they return and where guided SDS settles."""

import jax.numpy as jnp
import numpy as np
import pytest

from sdsjax import sds
from sdsjax import teachers
from sdsjax.models import stable_diffusion

SCHEDULER = {
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "num_train_timesteps": 1000,
}


def test_gaussian_eps_is_the_posterior_mean_of_the_noise():
  # For jointly Gaussian (ε, z_t) the least-squares line of ε on z_t is E[ε | z_t].
  rng = np.random.default_rng(0)
  mu, std, abar = 0.7, 0.4, 0.3
  x0 = mu + std * rng.standard_normal(400_000)
  eps = rng.standard_normal(x0.shape)
  z_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
  slope, intercept = np.polyfit(z_t, eps, 1)
  probe = np.array([-1.0, 0.5, 2.0], np.float32)
  got = teachers.gaussian_eps(
    jnp.asarray(probe).reshape(3, 1, 1, 1),
    jnp.full((3,), abar),
    jnp.full((3, 1, 1, 1), mu),
    jnp.full((3,), std),
  )
  np.testing.assert_allclose(np.asarray(got).ravel(), slope * probe + intercept, atol=5e-3)


def _mean_sds_gradient(z, alphas, guidance, cond, uncond, t_range, weighting):
  """Σ_t w(t)·E_ε[ε̂ − ε] at clean latent z, every integer t of the range once (exact: ε̂ is
  affine in ε, so the expectation over ε is the value at ε = 0)."""
  lo, hi = (int(b) for b in sds.timestep_bounds(t_range[0], t_range[1], 1000))
  t = jnp.arange(lo, hi, dtype=jnp.int32)
  n = t.shape[0]

  def eps_fn(params, z_t, t, emb, context):
    is_cond = emb[:, 0, 0] > 0.5  # the embeddings are 1 (conditional) or 0 (unconditional)
    mu = jnp.where(is_cond, cond[0], uncond[0]).reshape(-1, 1, 1, 1)
    std = jnp.where(is_cond, cond[1], uncond[1])
    return teachers.gaussian_eps(z_t, params[t], mu, std)

  grad, _ = sds.sds_gradient(
    eps_fn,
    alphas,
    jnp.full((n, 1, 1, 1), z, jnp.float32),
    t,
    jnp.zeros((n, 1, 1, 1), jnp.float32),
    jnp.ones((n, 1, 1)),
    jnp.zeros((n, 1, 1)),
    alphas,
    guidance,
    weighting,
  )
  return float(jnp.sum(grad))


@pytest.mark.parametrize(
  ("guidance", "uncond_std", "t_range", "weighting"),
  [
    (100.0, 0.05, (0.02, 0.98), "sds"),  # the spread of random heads: far past the target
    (100.0, 1.0, (0.02, 0.5), "sds"),  # SD's unit-variance latents, annealed t
    (7.5, 1.0, (0.02, 0.98), "fantasia3d"),
  ],
)
def test_guided_sds_settles_past_the_target_by_the_predicted_overshoot(
  guidance, uncond_std, t_range, weighting
):
  alphas = jnp.asarray(stable_diffusion.alphas_cumprod_from_config(SCHEDULER), jnp.float32)
  mu_c, mu_u, cond_std = 1.0, 0.0, 0.005
  overshoot = teachers.guided_overshoot(
    np.asarray(alphas), guidance, cond_std, uncond_std, t_range, weighting
  )
  assert overshoot > 0.1
  args = (alphas, guidance, (mu_c, cond_std), (mu_u, uncond_std), t_range, weighting)
  at_target = _mean_sds_gradient(mu_c, *args)
  at_fixed_point = _mean_sds_gradient(mu_c + overshoot * (mu_c - mu_u), *args)
  assert at_target < 0  # the guided gradient still pushes the latent on, away from μ_u
  assert abs(at_fixed_point) < 1e-3 * abs(at_target)


def test_no_guidance_settles_on_the_conditional_mean():
  alphas = stable_diffusion.alphas_cumprod_from_config(SCHEDULER)
  assert teachers.guided_overshoot(alphas, 1.0, 0.005, 0.05, (0.02, 0.98)) == pytest.approx(0.0)
