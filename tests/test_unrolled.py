import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdsjax import unrolled


@pytest.mark.parametrize("n", [2, 3])
def test_written_out_reductions_match_numpy(n):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((5, 4, n)).astype(np.float32)
  b = rng.standard_normal((5, 4, n)).astype(np.float32)
  np.testing.assert_allclose(unrolled.min_last(a), a.min(-1))
  np.testing.assert_allclose(unrolled.max_last(a), a.max(-1))
  np.testing.assert_array_equal(unrolled.all_last(a > -0.5), (a > -0.5).all(-1))
  np.testing.assert_allclose(unrolled.dot_last(a, b), (a * b).sum(-1), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    unrolled.dot_last(a, b[0, 0], keepdims=True), (a * b[0, 0]).sum(-1, keepdims=True), atol=1e-6
  )


def test_cross_and_normalize_match_numpy_and_their_gradients():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((7, 3)).astype(np.float32)
  b = rng.standard_normal((7, 3)).astype(np.float32)
  np.testing.assert_allclose(unrolled.cross3(a, b), np.cross(a, b), rtol=1e-6, atol=1e-6)
  unit = np.asarray(unrolled.normalize_last(jnp.asarray(a), 1e-20))
  np.testing.assert_allclose(unit, a / np.linalg.norm(a, axis=-1, keepdims=True), rtol=1e-6)
  # The zero vector stays finite (the eps floor).
  assert np.all(np.isfinite(unrolled.normalize_last(jnp.zeros((2, 3)), 1e-20)))
  loss = lambda f: lambda x, y: jnp.sum(f(x, y) ** 2 * jnp.arange(3.0))
  got = jax.grad(loss(unrolled.cross3), argnums=(0, 1))(a, b)
  want = jax.grad(loss(jnp.cross), argnums=(0, 1))(a, b)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
