"""Tests for sdsjax.morphable and the builtin head model (FLAME: tests/test_flame.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdsjax import morphable
from sdsjax.errors import ModelFileError


@pytest.fixture(scope="module")
def head():
  return morphable.load_model("builtin")


# ---------------------------------------------------------------------------------------
# vertices()


def test_vertices_vmap_matches_loop_and_is_linear(head):
  weights = jax.random.normal(jax.random.PRNGKey(0), (4, head.num_components))
  batched = jax.jit(jax.vmap(morphable.vertices, (None, 0)))(head, weights)
  for i in range(weights.shape[0]):
    np.testing.assert_allclose(batched[i], morphable.vertices(head, weights[i]), atol=1e-5)
  a, b = weights[0], weights[1]
  mean = morphable.vertices(head, jnp.zeros(head.num_components))
  np.testing.assert_allclose(mean, head.mean, atol=0)
  lhs = morphable.vertices(head, 2.0 * a - b) - mean
  rhs = 2.0 * (morphable.vertices(head, a) - mean) - (morphable.vertices(head, b) - mean)
  np.testing.assert_allclose(lhs, rhs, atol=1e-5)


def test_vertices_gradient_is_the_basis(head):
  w = jnp.zeros(head.num_components)
  grad = jax.grad(lambda w: jnp.sum(morphable.vertices(head, w)[:, 1]))(w)
  np.testing.assert_allclose(grad, head.basis[:, :, 1].sum(1), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# The builtin head itself is tested in tests/test_builtin_head.py.


# ---------------------------------------------------------------------------------------
# npz files and errors.


def _small_arrays(k=3):
  mean = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 0, 2]], np.float32)
  faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
  basis = np.random.default_rng(0).normal(size=(k, 4, 3)).astype(np.float32)
  uvs = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
  return dict(
    mean=mean,
    basis=basis,
    faces=faces,
    uvs=uvs,
    uv_faces=faces,
    names=np.array(["a", "b", "c"][:k]),
  )


def test_npz_round_trip(tmp_path, head):
  path = tmp_path / "head.npz"
  np.savez_compressed(
    path,
    mean=head.mean,
    basis=head.basis,
    faces=head.faces,
    uvs=head.uvs,
    uv_faces=head.uv_faces,
    names=np.array(head.names),
  )
  again = morphable.load_model(str(path), 10)
  np.testing.assert_allclose(again.mean, head.mean, atol=1e-6)
  np.testing.assert_allclose(again.basis, head.basis[:10], atol=1e-6)
  np.testing.assert_array_equal(again.faces, head.faces)
  np.testing.assert_array_equal(again.uv_faces, head.uv_faces)
  assert again.names == head.names[:10]


def test_npz_is_normalised(tmp_path):
  arrays = _small_arrays()
  path = tmp_path / "m.npz"
  np.savez(path, **arrays)
  model = morphable.load_model(str(path), 3)
  centred = arrays["mean"] - np.array([1.0, 1.0, 1.0])
  scale = 1.0 / np.linalg.norm(centred, axis=1).max()
  np.testing.assert_allclose(model.mean, centred * scale, atol=1e-6)
  np.testing.assert_allclose(model.basis, arrays["basis"] * scale, atol=1e-6)


def test_npz_without_uvs_gets_spherical_uvs(tmp_path):
  arrays = _small_arrays()
  del arrays["uvs"], arrays["uv_faces"], arrays["names"]
  path = tmp_path / "m.npz"
  np.savez(path, **arrays)
  model = morphable.load_model(str(path), 2)
  assert model.names == ("", "")
  assert model.uv_faces.shape == model.faces.shape
  assert float(model.uvs.min()) >= 0 and float(model.uvs.max()) <= 1


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(mean=np.full((4, 3), np.nan, np.float32)), "NaN"),
    (dict(basis=np.zeros((3, 5, 3), np.float32)), "expected (K, 4, 3)"),
    (dict(mean=np.zeros((4, 2), np.float32)), "'mean' has shape"),
    (dict(faces=np.array([[0, 1, 7]] * 4, np.int32)), "indices span"),
    (dict(faces=np.zeros((4, 3), np.float32)), "expected integers"),
    (dict(uvs=np.full((4, 2), 3.0, np.float32)), "[0, 1]"),
    (dict(names=np.array(["a"])), "'names' has 1 entries"),
  ],
)
def test_bad_npz_is_a_model_file_error(tmp_path, change, message):
  arrays = {**_small_arrays(), **change}
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(
    ModelFileError,
    match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
  ):
    morphable.load_model(str(path), 3)


def test_missing_key_and_missing_file_and_unknown_spec(tmp_path):
  arrays = _small_arrays()
  del arrays["faces"]
  np.savez(tmp_path / "nofaces.npz", **arrays)
  with pytest.raises(ModelFileError, match="missing array 'faces'"):
    morphable.load_model(str(tmp_path / "nofaces.npz"), 3)
  with pytest.raises(ModelFileError, match="not found"):
    morphable.load_model(str(tmp_path / "nowhere.npz"))
  with pytest.raises(ModelFileError, match="unknown head model"):
    morphable.load_model("bfm2019")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ModelFileError, match="not a readable"):
    morphable.load_model(str(tmp_path / "junk.npz"))


def test_too_many_components():
  with pytest.raises(ModelFileError, match="asked for 51 components but the file has 50"):
    morphable.load_model("builtin", 51)
  with pytest.raises(ModelFileError, match="at least 1"):
    morphable.load_model("builtin", 0)


def test_errors_are_one_line(tmp_path):
  with pytest.raises(ModelFileError) as info:
    morphable.load_model(str(tmp_path / "nowhere.npz"))
  assert "\n" not in str(info.value)
