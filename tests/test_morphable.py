"""Tests for sdsjax.morphable, sdsjax.flame and the builtin head model."""

import importlib
import io
import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse

from sdsjax import flame
from sdsjax import morphable
from sdsjax.errors import ModelFileError


@pytest.fixture(scope="module")
def head():
  return morphable.load_model("builtin")


def _face_normals(verts, faces):
  tri = verts[faces]
  return np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])


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
# The builtin head.


def test_builtin_shapes_and_frame(head):
  v = head.mean.shape[0]
  assert 5000 <= v <= 20000
  assert head.basis.shape == (50, v, 3)
  assert head.mean.dtype == jnp.float32 and head.basis.dtype == jnp.float32
  assert head.faces.dtype == jnp.int32 and head.uv_faces.dtype == jnp.int32
  assert len(head.names) == 50 and len(set(head.names)) == 50 and all(head.names)
  mean = np.asarray(head.mean)
  np.testing.assert_allclose(0.5 * (mean.min(0) + mean.max(0)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(mean, axis=1).max(), 1.0, rtol=1e-5)
  # Taller than wide; the front-most point is the nose (narrow, on +z), the back is broad.
  extent = mean.max(0) - mean.min(0)
  assert extent[1] > extent[0]
  nose = mean[mean[:, 2] > mean[:, 2].max() - 0.03]
  back = mean[mean[:, 2] < mean[:, 2].min() + 0.03]
  assert np.abs(nose[:, 0]).max() < 0.06 < np.abs(back[:, 0]).max()


def test_builtin_faces_and_uvs_are_valid(head):
  faces, uv_faces, uvs = map(np.asarray, (head.faces, head.uv_faces, head.uvs))
  assert faces.min() >= 0 and faces.max() < head.mean.shape[0]
  assert len(np.unique(faces)) == head.mean.shape[0]  # no unused vertices
  assert uv_faces.shape == faces.shape
  assert uv_faces.min() >= 0 and uv_faces.max() < uvs.shape[0]
  assert uvs.shape[0] >= head.mean.shape[0]  # seams are split
  assert uvs.min() >= 0.0 and uvs.max() <= 1.0
  # No uv triangle wraps around the seam.
  span = np.ptp(uvs[uv_faces][..., 0], axis=1)
  assert span.max() < 0.1
  # Degenerate triangles are only allowed nowhere.
  assert np.linalg.norm(_face_normals(np.asarray(head.mean), faces), axis=1).min() > 0


def test_builtin_normals_point_outwards(head):
  mean = np.asarray(head.mean, np.float64)
  faces = np.asarray(head.faces)
  normals = _face_normals(mean, faces)
  # Divergence theorem: the signed volume enclosed (open neck aside) is positive.
  tri = mean[faces]
  volume = np.einsum("fi,fi->f", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
  assert volume > 0.3
  # Almost every face points away from the vertical axis through the head's centre.
  centre = mean.mean(0)
  radial = tri.mean(1) - centre
  radial[:, 1] = np.where(tri.mean(1)[:, 1] < mean[:, 1].min() + 0.6, 0.0, radial[:, 1])
  outward = np.einsum("fi,fi->f", normals, radial) > 0
  assert outward.mean() > 0.99
  # Consistent orientation: every directed edge is used once (its twin runs the other way).
  directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
  assert len(np.unique(directed, axis=0)) == len(directed)


def test_builtin_basis_is_orthogonal_and_scaled(head):
  flat = np.asarray(head.basis, np.float64).reshape(head.num_components, -1)
  gram = flat @ flat.T
  diag = np.diag(gram)
  off = gram / np.sqrt(diag[:, None] * diag[None, :]) - np.eye(len(diag))
  assert np.abs(off).max() < 1e-4
  # Weight 1 moves the most affected vertex by 1-10 % of the head's radius.
  peak = np.linalg.norm(np.asarray(head.basis), axis=-1).max(1)
  assert peak.min() > 0.005 and peak.max() < 0.1


def test_builtin_fewer_components_keeps_the_leading_ones(head):
  small = morphable.load_model("builtin", 6)
  assert small.names == head.names[:6]
  np.testing.assert_array_equal(small.basis, head.basis[:6])


def test_random_heads_stay_sane(head):
  weights = jax.random.normal(jax.random.PRNGKey(1), (8, head.num_components))
  verts = jax.vmap(morphable.vertices, (None, 0))(head, weights)
  offsets = np.linalg.norm(np.asarray(verts - head.mean), axis=-1)
  assert np.isfinite(offsets).all()
  # N(0, 1) weights move vertices by at most a few centimetres on a ~23 cm head.
  assert offsets.max() < 0.25 and np.median(offsets) < 0.08


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


# ---------------------------------------------------------------------------------------
# FLAME, without chumpy.


def _fake_flame(tmp_path, num_vertices=60, num_shape=400, protocol=2):
  """Writes a pickle laid out like FLAME's generic_model.pkl; returns its arrays."""
  rng = np.random.default_rng(3)
  v_template = rng.normal(size=(num_vertices, 3)) * np.array([0.07, 0.1, 0.08])
  v_template[:, 1] += 0.02  # FLAME is not centred
  faces = rng.integers(0, num_vertices, size=(2 * num_vertices, 3)).astype(np.uint32)
  shapedirs = rng.normal(size=(num_vertices, 3, num_shape)) * 1e-3
  j_regressor = scipy.sparse.random(5, num_vertices, density=0.2, format="csc", random_state=4)

  chumpy = types.ModuleType("chumpy")
  chumpy_ch = types.ModuleType("chumpy.ch")

  class Ch:  # what matters is the pickled name and the state dict with 'x'
    pass

  Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
  chumpy_ch.Ch = Ch
  chumpy.ch = chumpy_ch
  shapedirs_ch = Ch()
  shapedirs_ch.__dict__.update(x=shapedirs, _dirty_vars=set(), _itr=None)
  sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, chumpy_ch
  try:
    data = {
      "v_template": v_template,
      "f": faces,
      "shapedirs": shapedirs_ch,
      "posedirs": rng.normal(size=(num_vertices, 3, 36)),
      "J_regressor": j_regressor,
      "weights": rng.random((num_vertices, 5)),
      "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
      "J": rng.normal(size=(5, 3)),
      "bs_style": "lbs",
      "bs_type": "lrotmin",
    }
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
  finally:
    del sys.modules["chumpy"], sys.modules["chumpy.ch"]
  return path, v_template, faces, shapedirs


def _block_chumpy(monkeypatch):
  """Makes `import chumpy` fail even where a real chumpy is installed."""
  assert sys.modules.get("chumpy") is None and "chumpy.ch" not in sys.modules
  monkeypatch.setitem(sys.modules, "chumpy", None)
  with pytest.raises(ImportError):
    importlib.import_module("chumpy")


@pytest.mark.parametrize("protocol", [2, 1])  # 1: objects via copyreg._reconstructor
def test_flame_loads_without_chumpy(tmp_path, monkeypatch, protocol):
  path, v_template, faces, shapedirs = _fake_flame(tmp_path, protocol=protocol)
  _block_chumpy(monkeypatch)
  model = morphable.load_model(f"flame:{path}", 20)
  centre = 0.5 * (v_template.min(0) + v_template.max(0))
  scale = 1.0 / np.linalg.norm(v_template - centre, axis=1).max()
  np.testing.assert_allclose(model.mean, (v_template - centre) * scale, atol=1e-5)
  np.testing.assert_allclose(
    model.basis, shapedirs[:, :, :20].transpose(2, 0, 1) * scale, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(model.faces, faces.astype(np.int32))
  assert model.names[0] == "flame_shape_000" and len(model.names) == 20
  # No UV file beside it: spherical fallback.
  assert model.uv_faces.shape == model.faces.shape
  assert float(model.uvs.min()) >= 0 and float(model.uvs.max()) <= 1
  w = jnp.arange(20, dtype=jnp.float32) / 20
  expected = (v_template + shapedirs[:, :, :20] @ np.asarray(w) - centre) * scale
  np.testing.assert_allclose(morphable.vertices(model, w), expected, atol=1e-5)
  assert sys.modules["chumpy"] is None  # nothing imported chumpy behind our back


def test_flame_uv_file_and_component_limits(tmp_path):
  path, v_template, faces, _ = _fake_flame(tmp_path, num_shape=120)
  vt = np.random.default_rng(5).random((len(v_template) + 7, 2))
  np.savez(
    tmp_path / "FLAME_texture.npz",
    vt=vt,
    ft=faces.astype(np.int64),
    mean=np.zeros(3),
    tex_dir=np.zeros(3),
  )
  model = morphable.load_model(f"flame:{path}", 5)
  np.testing.assert_allclose(model.uvs, vt, atol=1e-6)
  np.testing.assert_array_equal(model.uv_faces, faces.astype(np.int32))
  with pytest.raises(ModelFileError, match="asked for 200 components but the file has 120"):
    morphable.load_model(f"flame:{path}", 200)
  with pytest.raises(ModelFileError, match="300 identity components"):
    morphable.load_model(f"flame:{path}", 301)
  with pytest.raises(ModelFileError, match="UV file not found"):
    morphable.load_model(f"flame:{path}::{tmp_path / 'nope.npz'}", 5)
  with pytest.raises(ModelFileError, match="FLAME model file not found"):
    morphable.load_model(f"flame:{tmp_path / 'missing.pkl'}")


def test_unpickler_accepts_old_scipy_module_names():
  unpickler = flame.RestrictedUnpickler(io.BytesIO(b""))
  assert unpickler.find_class("scipy.sparse.csc", "csc_matrix") is scipy.sparse.csc_matrix
  assert unpickler.find_class("chumpy.ch", "Ch") is flame.ChumpyStandIn
  with pytest.raises(ModelFileError, match="refusing"):
    unpickler.find_class("builtins", "eval")


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"v_template": _Evil()}, protocol=2))
  with pytest.raises(ModelFileError, match="refusing to unpickle"):
    morphable.load_model(f"flame:{path}")
  path.write_bytes(b"garbage")
  with pytest.raises(ModelFileError, match="not a readable FLAME pickle"):
    morphable.load_model(f"flame:{path}")
