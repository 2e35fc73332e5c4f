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


def _guided_residual(alphas, t, guidance, z, eps, cond, uncond):
  """ε̂ − ε of the Gaussian teacher at clean latents z (N, 1, 1, 1), as the fit computes it."""
  t = jnp.full((z.shape[0],), t, jnp.int32)
  abar = jnp.asarray(alphas, jnp.float32)[t]
  z_t = sds.add_noise(z, eps, abar)
  branch = lambda mu, std: teachers.gaussian_eps(
    z_t, abar, jnp.full(z.shape, mu, jnp.float32), jnp.full(t.shape, std, jnp.float32)
  )
  eps_hat = sds.classifier_free_guidance(branch(*uncond), branch(*cond), guidance)
  return np.asarray(eps_hat - eps, np.float64).ravel()


@pytest.mark.parametrize("t", [20, 300, 900])
def test_residual_coefficients_are_the_teachers_gain_and_noise(t):
  alphas = stable_diffusion.alphas_cumprod_from_config(SCHEDULER)
  guidance, cond_std, uncond_std, mu_u, z = 100.0, 0.005, 1.0, 0.1, 0.4
  gain, noise = teachers.residual_coefficients(alphas, t, guidance, cond_std, uncond_std)
  eps = np.linspace(-2.0, 2.0, 5).reshape(-1, 1, 1, 1).astype(np.float32)
  zs = np.full_like(eps, z)
  base = _guided_residual(alphas, t, guidance, zs, eps, (0.3, cond_std), (mu_u, uncond_std))
  moved = _guided_residual(alphas, t, guidance, zs, eps, (0.3 + 0.01, cond_std), (mu_u, uncond_std))
  # The residual is affine in ε with slope c_t, and moves by −g_t per unit of the target μ_c.
  np.testing.assert_allclose(np.diff(base) / np.diff(eps.ravel()), noise, rtol=1e-3)
  np.testing.assert_allclose((moved - base) / 0.01, -gain, rtol=2e-3)
  info = teachers.draw_information(alphas, t, guidance, cond_std, uncond_std)
  assert info == pytest.approx((gain / noise) ** 2)


def test_information_floor_is_the_bayes_error_of_linear_gaussian_draws():
  # Draws y = g·J_v·w* + |c|·ε with w* ~ N(0, I): the posterior mean's error is the floor.
  rng = np.random.default_rng(0)
  k, latent, views, draws, trials = 3, 4, 2, 40, 4000
  jac = rng.standard_normal((views, latent, k)) * np.array([1.0, 0.3, 0.05])
  info = 0.8  # (g / c)²; the views cycle so the realised Fisher equals the expected one
  design = [jac[d % views] for d in range(draws)]
  fisher = info * sum(j.T @ j for j in design)
  w_star = rng.standard_normal((trials, k))
  noise = rng.standard_normal((trials, draws, latent))
  # Observations scaled by 1/|c|: y_d = √info·J_d·w* + ε_d.
  y = np.sqrt(info) * np.einsum("dlk,tk->tdl", np.stack(design), w_star) + noise
  score = np.sqrt(info) * np.einsum("dlk,tdl->tk", np.stack(design), y)
  w_hat = np.linalg.solve(np.eye(k) + fisher, score.T).T
  err = np.sqrt(np.mean((w_hat - w_star) ** 2, axis=0))
  gram = np.mean([j.T @ j for j in jac], axis=0)
  groups = {"all": (0, k), "strong": (0, 1), "weak": (2, 3)}
  floor = teachers.information_floor(gram, info, draws, groups)
  assert floor["all"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=0.03)
  assert floor["weak"] == pytest.approx(err[2], rel=0.05)
  # The strong direction is pinned down; the weak one stays near the prior's error of 1.
  assert floor["strong"] < 0.2 and floor["weak"] > 0.9
  # No information leaves the prior's error; more draws lower the floor.
  assert teachers.information_floor(gram, 0.0, draws, {"all": (0, k)})["all"] == 1.0
  assert teachers.information_floor(gram, info, 4 * draws, {"all": (0, k)})["all"] < floor["all"]
