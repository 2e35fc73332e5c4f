"""The texture's pyramid coordinates: P and Pᵀ, and Adam run on the levels."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdsjax import config as config_lib
from sdsjax import fit_step
from sdsjax import morphable
from sdsjax import texture_pyramid

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


@pytest.mark.parametrize(
  "resolution, coarsest, sizes",
  [
    (64, 8, (64, 32, 16, 8)),
    (64, 64, (64,)),
    (64, 1, (64, 32, 16, 8, 4, 2, 1)),
    (12, 2, (12, 6, 3)),
  ],
)
def test_levels_halve_while_they_can(resolution, coarsest, sizes):
  assert texture_pyramid.level_sizes(resolution, coarsest) == sizes


def test_reduce_is_the_adjoint_of_expand():
  rng = np.random.default_rng(0)
  sizes = (16, 8, 4)
  pyramid = tuple(jnp.asarray(rng.standard_normal((s, s, 3)), jnp.float32) for s in sizes)
  g = jnp.asarray(rng.standard_normal((16, 16, 3)), jnp.float32)
  lhs = float(jnp.vdot(texture_pyramid.expand(pyramid), g))
  rhs = sum(float(jnp.vdot(u, v)) for u, v in zip(pyramid, texture_pyramid.reduce(g, sizes)))
  assert abs(lhs - rhs) < 1e-4 * abs(lhs)
  # A constant coarse level expands to the same constant (bilinear keeps constants).
  coarse = (jnp.zeros((16, 16, 3)), jnp.zeros((8, 8, 3)), jnp.full((4, 4, 3), 0.7))
  np.testing.assert_allclose(texture_pyramid.expand(coarse), 0.7, rtol=1e-6)


def test_update_is_p_inner_of_p_transpose_gradient():
  rng = np.random.default_rng(1)
  g = {"texture_logits": jnp.asarray(rng.standard_normal((8, 8, 3)), jnp.float32)}
  params = {"texture_logits": jnp.zeros((8, 8, 3))}
  opt = texture_pyramid.in_pyramid(optax.sgd(0.5), 2)
  updates, _ = opt.update(g, opt.init(params))
  sizes = (8, 4, 2)
  want = texture_pyramid.expand(
    tuple(-0.5 * u for u in texture_pyramid.reduce(g["texture_logits"], sizes))
  )
  np.testing.assert_allclose(updates["texture_logits"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coarsest", [32, 4])
def test_texels_without_gradient_follow_their_neighbours_only_in_the_pyramid(coarsest):
  """A push on the left half only (no smoothness prior): per texel, the right half never
  moves; on the pyramid the coarse levels carry the push across, fading with the distance."""
  cfg = config_lib.load_config(
    TINY,
    [dict(texture=True, texture_resolution=32, texture_coarsest=coarsest, texture_smoothness=0.0)],
  )
  head = morphable.load_model("builtin", 3)
  opt = fit_step.make_optimizer(cfg, head)
  params = {"weights": jnp.zeros((2, 3)), "texture_logits": jnp.zeros((2, 32, 32, 3))}  # 2 prompts
  push = jnp.zeros((32, 32, 3)).at[:, :16].set(-1.0)
  grads = {"weights": jnp.zeros((2, 3)), "texture_logits": jnp.stack([push, 0.5 * push])}
  state = jax.vmap(opt.init)(params)
  update = jax.jit(jax.vmap(opt.update))
  for _ in range(30):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  texture = np.asarray(params["texture_logits"])
  assert texture[:, :, :16].min() > 0.1  # the pushed half moved in both
  near, far = texture[:, :, 16:20].mean(), texture[:, :, 28:].mean()
  if coarsest == 32:  # the plain texture
    assert np.abs(texture[:, :, 16:]).max() == 0.0
  else:
    assert near > 0.1 and near > 2.0 * far
