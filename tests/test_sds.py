"""SDS math: weighting, guidance, noising, the surrogate loss, and the gradient formula."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdsjax import sds


def scaled_linear_alphas_cumprod(n=1000, beta_start=0.00085, beta_end=0.012):
  betas = np.linspace(beta_start**0.5, beta_end**0.5, n) ** 2
  return np.cumprod(1.0 - betas)


def test_weighting_uses_alphas_cumprod():
  abar = scaled_linear_alphas_cumprod()
  t = np.array([20, 500, 980])
  w = np.asarray(sds.sds_weight(jnp.asarray(abar[t]), "sds"))
  np.testing.assert_allclose(w, 1.0 - abar[t], rtol=1e-6)
  # The per-step alphas (1 - beta) would give a weight near 0 everywhere: a known bug.
  per_step_alphas = 1.0 - (np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
  assert np.all(w > 10 * (1.0 - per_step_alphas[t]))
  np.testing.assert_allclose(sds.sds_weight(jnp.asarray(abar[t]), "uniform"), 1.0)
  np.testing.assert_allclose(
    sds.sds_weight(jnp.asarray(abar[t]), "fantasia3d"), np.sqrt(abar[t]) * (1 - abar[t]), rtol=1e-6
  )
  with pytest.raises(ValueError):
    sds.sds_weight(jnp.asarray(abar[t]), "alphas")


def test_guidance_matches_dreamfusion_form():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  u, c = jax.random.normal(k1, (3, 4)), jax.random.normal(k2, (3, 4))
  s = 100.0
  ours = sds.classifier_free_guidance(u, c, s)
  omega = s - 1.0  # DreamFusion: (1 + ω)·ε_text − ω·ε_uncond
  np.testing.assert_allclose(ours, (1 + omega) * c - omega * u, rtol=1e-5, atol=1e-4)


def test_timesteps_in_range_and_annealed():
  t = sds.sample_timesteps(jax.random.PRNGKey(1), (10000,), 0.02, 0.98, 1000)
  assert t.dtype == jnp.int32
  assert int(t.min()) >= 20 and int(t.max()) <= 980
  assert 400 < float(t.mean()) < 600
  assert float(sds.annealed_t_max(0, 100, 0.98, 0.5)) == pytest.approx(0.98)
  assert float(sds.annealed_t_max(99, 100, 0.98, 0.5)) == pytest.approx(0.5)


@pytest.mark.parametrize("schedule", ["anneal", "dreamtime"])
def test_schedules_fall_over_the_anneal_steps_then_hold(schedule):
  steps = 1000
  num_anneal = sds.anneal_steps(steps, 0.5)
  assert num_anneal == 500 and sds.anneal_steps(steps, 0.0) == 1
  draws = lambda step: np.asarray(
    sds.schedule_timesteps(
      jax.random.PRNGKey(step), (4000,), step, num_anneal, (0.02, 0.98), 0.2, schedule, 1000
    )
  )
  halfway, end, last = draws(250), draws(499), draws(999)
  assert halfway.max() > 400  # still falling half-way through the anneal
  assert end.max() <= 200 + 30 and last.max() <= 200 + 30  # reached the end, and held
  lo, hi = sds.timestep_bounds(*sds.final_t_range((0.02, 0.98), 0.2, schedule), 1000)
  assert lo <= last.min() and last.max() <= hi


def test_surrogate_loss_gradient_is_the_sds_gradient():
  z = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 4))
  g = jax.random.normal(jax.random.PRNGKey(3), z.shape)
  got = jax.grad(sds.sds_surrogate_loss)(z, g)
  np.testing.assert_allclose(got, g / z.shape[0], rtol=1e-6)


def test_sds_gradient_formula_and_no_denoiser_jacobian():
  abar = jnp.asarray(scaled_linear_alphas_cumprod(), jnp.float32)
  key = jax.random.PRNGKey(4)
  kz, kn, ke = jax.random.split(key, 3)
  z = jax.random.normal(kz, (2, 4, 4, 4))
  noise = jax.random.normal(kn, z.shape)
  t = jnp.array([100, 700], jnp.int32)
  emb_c = jax.random.normal(ke, (2, 3, 8))
  emb_u = jnp.zeros_like(emb_c)

  def eps_fn(scale, x, tt, emb, context):
    # ε depends on the text through the embedding mean, so CFG is visible.
    return scale * x + jnp.mean(emb, axis=(1, 2))[:, None, None, None]

  grad, residual = sds.sds_gradient(eps_fn, 0.3, z, t, noise, emb_c, emb_u, abar, 7.5, "sds")
  a = abar[t][:, None, None, None]
  x_t = jnp.sqrt(a) * z + jnp.sqrt(1 - a) * noise
  e_u = 0.3 * x_t + 0.0
  e_c = 0.3 * x_t + jnp.mean(emb_c, axis=(1, 2))[:, None, None, None]
  expected = (1 - a) * (e_u + 7.5 * (e_c - e_u) - noise)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(residual, expected / (1 - a), rtol=1e-5, atol=1e-5)
  # The UNet Jacobian is cut: differentiating through sds_gradient w.r.t. z gives zero.
  dz = jax.grad(
    lambda zz: jnp.sum(sds.sds_gradient(eps_fn, 0.3, zz, t, noise, emb_c, emb_u, abar, 7.5)[0])
  )(z)
  assert float(jnp.max(jnp.abs(dz))) == 0.0


@pytest.mark.parametrize("schedule", ["random", "anneal", "dreamtime"])
def test_timestep_schedules(schedule):
  key = jax.random.PRNGKey(0)
  draws = lambda step: np.asarray(
    sds.schedule_timesteps(key, (4000,), step, 1000, (0.02, 0.98), 0.5, schedule, 1000)
  )
  start, end = draws(0), draws(999)
  assert start.min() >= 20 and start.max() <= 980 and end.min() >= 20
  if schedule == "random":
    assert end.max() > 900  # no annealing
  else:
    assert end.max() <= 500 + 30  # the max falls to t_max_end
  if schedule == "dreamtime":
    # Monotone: a narrow band that only moves down.
    mids = [np.median(draws(s)) for s in (0, 250, 500, 750, 999)]
    assert all(a >= b for a, b in itertools.pairwise(mids)) and np.ptp(start) < 60


def test_context_reaches_the_denoiser():
  """The context (leading N) is passed on for both halves of the [uncond; cond] batch."""
  z = jnp.zeros((2, 2, 2, 4))
  context = {"bias": jnp.array([1.0, 2.0])}
  eps_fn = lambda p, x, t, e, c: jnp.broadcast_to(c["bias"][:, None, None, None], x.shape)
  t = jnp.array([500, 500])
  emb = jnp.zeros((2, 1, 1))
  _grad, residual = sds.sds_gradient(
    eps_fn, None, z, t, z, emb, emb, jnp.full((1000,), 0.5), 3.0, "uniform", context=context
  )
  np.testing.assert_allclose(np.asarray(residual)[:, 0, 0, 0], [1.0, 2.0])


@pytest.mark.parametrize("schedule", ["anneal", "dreamtime", "random"])
def test_final_t_range_bounds_the_last_steps_draws(schedule):
  t_range, t_max_end, steps = (0.02, 0.98), 0.4, 100
  t = sds.schedule_timesteps(
    jax.random.PRNGKey(0), (4096,), steps - 1, steps, t_range, t_max_end, schedule, 1000
  )
  lo, hi = sds.timestep_bounds(*sds.final_t_range(t_range, t_max_end, schedule), 1000)
  t = np.asarray(t)
  # `<= hi`, not `< hi`: the annealed bound is computed in float32 (0.98 + (0.4 − 0.98)·1 =
  # 0.40000004), whose ceil reaches one integer further.
  assert lo <= t.min() and t.max() <= hi
  # The range is tight: the draws reach within 1% of both ends.
  assert t.min() <= lo + 10 and t.max() >= hi - 10
