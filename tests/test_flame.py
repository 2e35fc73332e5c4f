"""Tests for sdsjax.flame (FLAME without chumpy, hostile pickles, expression and pose) and
sdsjax.bounded_npz (bounded reading of untrusted .npz files)."""

import contextlib
import copyreg
import importlib
import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import types
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse

from sdsjax import bounded_npz
from sdsjax import flame
from sdsjax import morphable
from sdsjax.errors import ModelFileError

NUM_VERTICES = 60
KINTREE = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64)  # FLAME's tree
# numpy's reconstruction function under its current module name (numpy 2: numpy._core).
RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


# ---------------------------------------------------------------------------------------
# A small pickle in FLAME's layout.


def _flame_arrays(num_vertices=NUM_VERTICES, num_shape=400, seed=3):
  """FLAME-like arrays: skinning rows and regressor rows sum to 1, like the real model."""
  rng = np.random.default_rng(seed)
  v_template = rng.normal(size=(num_vertices, 3)) * np.array([0.07, 0.1, 0.08])
  v_template[:, 1] += 0.02  # FLAME is not centred
  regressor = rng.random((5, num_vertices)) * (rng.random((5, num_vertices)) < 0.2)
  regressor[:, 0] += 0.1  # every row has an entry
  weights = rng.random((num_vertices, 5)) ** 4
  weights[np.arange(num_vertices), rng.integers(0, 5, num_vertices)] += 1.0
  return {
    "v_template": v_template,
    "f": rng.integers(0, num_vertices, size=(2 * num_vertices, 3)).astype(np.uint32),
    "shapedirs": rng.normal(size=(num_vertices, 3, num_shape)) * 1e-3,
    "posedirs": rng.normal(size=(num_vertices, 3, 36)) * 1e-3,
    "J_regressor": regressor / regressor.sum(1, keepdims=True),
    "weights": weights / weights.sum(1, keepdims=True),
    "kintree_table": KINTREE,
    "J": rng.normal(size=(5, 3)),
  }


@contextlib.contextmanager
def _fake_chumpy():
  """Importable `chumpy.ch.Ch` for pickling: what matters is its name and its state dict."""
  chumpy, chumpy_ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

  class Ch:
    pass

  Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
  chumpy_ch.Ch, chumpy.ch = Ch, chumpy_ch
  sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, chumpy_ch
  try:
    yield Ch
  finally:
    del sys.modules["chumpy"], sys.modules["chumpy.ch"]


def _chumpy(Ch, array):
  ch = Ch()
  ch.__dict__.update(x=array, _dirty_vars=set(), _itr=None)
  return ch


def _sparse(dense, fmt):
  return {"csc": scipy.sparse.csc_matrix, "csr": scipy.sparse.csr_matrix}.get(
    fmt, scipy.sparse.coo_matrix
  )(dense)


def _write_flame(path, arrays, protocol=2, j_format="csc", **replace):
  """Pickles `arrays` as FLAME does: shapedirs and posedirs chumpy, J_regressor sparse."""
  with _fake_chumpy() as Ch:
    data = dict(arrays)
    data["shapedirs"] = _chumpy(Ch, arrays["shapedirs"])
    data["posedirs"] = _chumpy(Ch, arrays["posedirs"])
    data["J_regressor"] = _sparse(arrays["J_regressor"], j_format)
    data.update(bs_style="lbs", bs_type="lrotmin", **replace)
    path.write_bytes(pickle.dumps(data, protocol=protocol))
  return path


def _block_chumpy(monkeypatch):
  """Makes `import chumpy` fail even where a real chumpy is installed."""
  assert sys.modules.get("chumpy") is None and "chumpy.ch" not in sys.modules
  monkeypatch.setitem(sys.modules, "chumpy", None)
  with pytest.raises(ImportError):
    importlib.import_module("chumpy")


def _normalisation(v_template):
  centre = 0.5 * (v_template.min(0) + v_template.max(0))
  return centre, 1.0 / np.linalg.norm(v_template - centre, axis=1).max()


# ---------------------------------------------------------------------------------------
# Loading.


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])  # 0/1: copyreg._reconstructor; 5: _frombuffer
def test_flame_loads_without_chumpy(tmp_path, monkeypatch, protocol):
  arrays = _flame_arrays()
  path = _write_flame(tmp_path / "generic_model.pkl", arrays, protocol)
  _block_chumpy(monkeypatch)
  model = morphable.load_model(f"flame:{path}", 20)
  centre, scale = _normalisation(arrays["v_template"])
  np.testing.assert_allclose(model.mean, (arrays["v_template"] - centre) * scale, atol=1e-5)
  np.testing.assert_allclose(
    model.basis, arrays["shapedirs"][:, :, :20].transpose(2, 0, 1) * scale, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(model.faces, arrays["f"].astype(np.int32))
  assert model.names[0] == "flame_shape_000" and len(model.names) == 20
  assert model.source == "flame" and model.num_expressions == 0
  # No UV file beside it: spherical fallback.
  assert model.uv_faces.shape == model.faces.shape
  assert float(model.uvs.min()) >= 0 and float(model.uvs.max()) <= 1
  w = jnp.arange(20, dtype=jnp.float32) / 20
  expected = arrays["v_template"] + arrays["shapedirs"][:, :, :20] @ np.asarray(w)
  np.testing.assert_allclose(
    model.to_source_units(morphable.vertices(model, w)), expected, rtol=1e-5, atol=1e-7
  )
  assert sys.modules["chumpy"] is None  # nothing imported chumpy behind our back


def test_flame_python2_layout(tmp_path):
  """Python-2 pickles: array bytes as latin-1 str, numpy.core and scipy.sparse.csc names."""

  class Py2Pickler(pickle.Pickler):
    def reducer_override(self, obj):
      if type(obj) is np.ndarray:
        raw = np.ascontiguousarray(obj).tobytes().decode("latin1")  # a Python-2 str
        return RECONSTRUCT, (np.ndarray, (0,), "b"), (1, obj.shape, obj.dtype, False, raw)
      return NotImplemented

  arrays = _flame_arrays()
  with _fake_chumpy() as Ch:
    data = dict(arrays)
    data["shapedirs"] = _chumpy(Ch, arrays["shapedirs"])
    data["J_regressor"] = _sparse(arrays["J_regressor"], "csc")
    stream = io.BytesIO()
    Py2Pickler(stream, protocol=2).dump(data)
  raw = stream.getvalue()
  path = tmp_path / "generic_model.pkl"
  for new, old in (
    (b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"),
    (b"scipy.sparse._csc\n", b"scipy.sparse.csc\n"),
  ):
    assert new in raw
    raw = raw.replace(new, old)
  assert b"_codecs" not in raw  # array bytes really are (latin-1) str, as in Python 2
  path.write_bytes(raw)
  read = flame.read_flame(path, 4, 2)
  np.testing.assert_array_equal(read["mean"], arrays["v_template"])
  np.testing.assert_array_equal(read["joint_regressor"], arrays["J_regressor"])
  np.testing.assert_array_equal(read["expression_basis"][1], arrays["shapedirs"][:, :, 301])


@pytest.mark.parametrize("j_format", ["csc", "csr", "coo", "coo_row_col", "dense"])
def test_flame_skeleton_arrays(tmp_path, j_format):
  arrays = _flame_arrays()
  j_regressor = arrays["J_regressor"]
  if j_format == "coo_row_col":  # scipy < 1.13 pickled coo as row/col, not coords
    j_regressor = scipy.sparse.coo_matrix(arrays["J_regressor"])
    row, col = j_regressor.coords
    j_regressor.__dict__ = {
      "_shape": (5, NUM_VERTICES),
      "row": row,
      "col": col,
      "data": j_regressor.data,
      "maxprint": 50,
    }
  elif j_format == "dense":
    j_regressor = arrays["J_regressor"]
  else:
    j_regressor = _sparse(arrays["J_regressor"], j_format)
  path = _write_flame(tmp_path / "generic_model.pkl", arrays, J_regressor=j_regressor)
  read = flame.read_flame(path, 10, 100)
  np.testing.assert_allclose(read["joint_regressor"], arrays["J_regressor"], rtol=1e-15)
  np.testing.assert_array_equal(read["skin_weights"], arrays["weights"])
  np.testing.assert_array_equal(read["pose_basis"], arrays["posedirs"].transpose(2, 0, 1))
  np.testing.assert_array_equal(read["parents"], [-1, 0, 1, 1, 1])
  assert tuple(read["joint_names"]) == flame.FLAME_JOINT_NAMES
  assert tuple(read["joint_names"]) == ("global", "neck", "jaw", "eye_left", "eye_right")
  assert read["expression_basis"].shape == (100, NUM_VERTICES, 3)
  assert read["expression_names"][99] == "flame_expression_099"
  model = morphable.make_model(read, str(path), 10, 100, "flame")
  assert model.skeleton.joint_names == flame.FLAME_JOINT_NAMES
  assert model.skeleton.parents == (-1, 0, 1, 1, 1)
  assert model.skeleton.pose_basis.shape == (36, NUM_VERTICES, 3)


def test_flame_uv_file_and_component_limits(tmp_path):
  arrays = _flame_arrays(num_shape=120)
  path = _write_flame(tmp_path / "generic_model.pkl", arrays)
  vt = np.random.default_rng(5).random((NUM_VERTICES + 7, 2))
  np.savez(
    tmp_path / "FLAME_texture.npz",
    vt=vt,
    ft=arrays["f"].astype(np.int64),
    mean=np.zeros(3),
    tex_dir=np.zeros(3),
  )
  model = morphable.load_model(f"flame:{path}", 5)
  np.testing.assert_allclose(model.uvs, vt, atol=1e-6)
  np.testing.assert_array_equal(model.uv_faces, arrays["f"].astype(np.int32))
  with pytest.raises(ModelFileError, match="asked for 200 components but the file has 120"):
    morphable.load_model(f"flame:{path}", 200)
  with pytest.raises(ModelFileError, match="300 identity components"):
    morphable.load_model(f"flame:{path}", 301)
  with pytest.raises(ModelFileError, match="asked for 1 expression components but the file has 0"):
    morphable.load_model(f"flame:{path}", 5, 1)
  with pytest.raises(ModelFileError, match="UV file not found"):
    morphable.load_model(f"flame:{path}::{tmp_path / 'nope.npz'}", 5)
  with pytest.raises(ModelFileError, match="FLAME model file not found"):
    morphable.load_model(f"flame:{tmp_path / 'missing.pkl'}")


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(weights=np.full((NUM_VERTICES, 5), 0.3)), "'weights' rows must sum to 1"),
    (dict(weights=np.full((NUM_VERTICES, 4), 0.25)), r"'weights' has shape \(60, 4\)"),
    (dict(posedirs=np.zeros((NUM_VERTICES, 3, 27))), r"expected \(60, 3, 36\)"),
    (dict(kintree_table=np.array([[4294967295, 0, 1, 4, 1], [0, 1, 2, 3, 4]])), "not a tree"),
    (dict(kintree_table=np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 4, 3]])), "in order"),
    (dict(kintree_table=np.array([[0, 0, 1, 1, 1], [0, 1, 2, 3, 4]])), "root joint"),
    (dict(kintree_table=np.zeros((2, 5))), "expected integers"),
    (dict(J_regressor=np.full((5, NUM_VERTICES), 2.0 / NUM_VERTICES)), "'J_regressor' rows"),
    (dict(v_template=np.full((NUM_VERTICES, 3), np.nan)), "NaN"),
  ],
)
def test_flame_bad_pose_model_is_a_model_file_error(tmp_path, change, message):
  arrays = {**_flame_arrays(), **change}
  j_regressor = change.get("J_regressor", _sparse(arrays["J_regressor"], "csc"))
  path = _write_flame(tmp_path / "generic_model.pkl", arrays, J_regressor=j_regressor)
  with pytest.raises(ModelFileError, match=message) as info:
    flame.read_flame(path, 5)
  assert "\n" not in str(info.value)


def test_flame_incomplete_pose_model(tmp_path):
  arrays = _flame_arrays()
  with _fake_chumpy() as Ch:
    data = {k: v for k, v in arrays.items() if k != "weights"}
    data["shapedirs"] = _chumpy(Ch, arrays["shapedirs"])
    incomplete = pickle.dumps(data, protocol=2)
    del data["posedirs"], data["J_regressor"], data["kintree_table"]  # no pose model at all
    without_pose = pickle.dumps(data, protocol=2)
  path = tmp_path / "generic_model.pkl"
  path.write_bytes(incomplete)
  with pytest.raises(ModelFileError, match="pose model is incomplete"):
    flame.read_flame(path, 5)
  path.write_bytes(without_pose)
  assert "joint_regressor" not in flame.read_flame(path, 5)


# ---------------------------------------------------------------------------------------
# Expression and pose against an independent LBS.


def _rodrigues(axis_angle):
  theta = np.linalg.norm(axis_angle)
  if theta < 1e-12:
    return np.eye(3)
  k = axis_angle / theta
  cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
  return np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * cross @ cross


def _flame_forward(arrays, betas, expression, pose):
  """FLAME's forward pass from its definition, float64, with 4×4 homogeneous transforms.

  Shape and expression blendshapes, joints regressed from the shaped mesh, lrotmin pose
  correctives, the kinematic chain from `kintree_table`, then linear blend skinning.
  """
  shapedirs = arrays["shapedirs"]
  shaped = (
    arrays["v_template"]
    + shapedirs[:, :, : len(betas)] @ betas
    + shapedirs[:, :, 300 : 300 + len(expression)] @ expression
  )
  joints = arrays["J_regressor"] @ shaped
  rotations = [_rodrigues(p) for p in pose]
  lrotmin = np.concatenate([(r - np.eye(3)).ravel() for r in rotations[1:]])
  posed = shaped + arrays["posedirs"] @ lrotmin
  parents = arrays["kintree_table"][0]
  world = []
  for j, rotation in enumerate(rotations):
    local = np.eye(4)
    local[:3, :3] = rotation
    local[:3, 3] = joints[j] - (joints[parents[j]] if j else 0.0)
    world.append(local if j == 0 else world[parents[j]] @ local)
  skinning = []
  for j, transform in enumerate(world):
    rest_to_posed = transform.copy()
    rest_to_posed[:3, 3] -= transform[:3, :3] @ joints[j]  # undo the rest joint position
    skinning.append(rest_to_posed)
  blended = np.einsum("vj,jab->vab", arrays["weights"], np.stack(skinning))
  homogeneous = np.concatenate([posed, np.ones((len(posed), 1))], 1)
  return np.einsum("vab,vb->va", blended, homogeneous)[:, :3]


def _relative_error(got, want):
  return np.abs(got - want).max() / np.abs(want).max()


def test_flame_expression_and_pose_match_an_independent_lbs(tmp_path):
  arrays = _flame_arrays()
  path = _write_flame(tmp_path / "generic_model.pkl", arrays)
  model = morphable.load_model(f"flame:{path}", 12, 100)
  assert model.num_joints == 5 and model.num_expressions == 100
  rng = np.random.default_rng(7)
  betas, expression = rng.normal(size=12), rng.normal(size=100)
  zero_pose = np.zeros((5, 3))
  jaw = zero_pose.copy()
  jaw[2] = [0.35, 0.02, -0.03]  # mouth open
  full = rng.normal(size=(5, 3)) * 0.3
  zero_expression = np.zeros(100)

  def ours(e, p):
    verts = morphable.vertices(
      model,
      jnp.asarray(betas, jnp.float32),
      jnp.asarray(e, jnp.float32),
      None if p is None else jnp.asarray(p, jnp.float32),
    )
    return model.to_source_units(verts)

  cases = {
    "identity": (zero_expression, None),
    "expression": (expression, None),
    "zero pose": (expression, zero_pose),
    "jaw": (expression, jaw),
    "all joints": (expression, full),
  }
  for name, (e, p) in cases.items():
    want = _flame_forward(arrays, betas, e, zero_pose if p is None else p)
    error = _relative_error(ours(e, p), want)
    assert error < 1e-5, f"{name}: relative error {error:.3g}"
  # The cases differ by far more than the tolerance, so the comparison can fail.
  rest = _flame_forward(arrays, betas, expression, zero_pose)
  assert _relative_error(_flame_forward(arrays, betas, expression, jaw), rest) > 1e-2
  assert _relative_error(_flame_forward(arrays, betas, zero_expression, zero_pose), rest) > 1e-2


# ---------------------------------------------------------------------------------------
# Refusals: pickles that would run code.


class _Reduce:
  """Pickles as `func(*args)`, then a BUILD with `state` if one is given."""

  def __init__(self, func, *args):
    self.func, self.args, self.state = func, args, None

  def with_state(self, state):
    self.state = state
    return self

  def __reduce__(self):
    return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _chumpy_with_state(state):
  with _fake_chumpy() as Ch:
    ch = Ch()
    ch.__dict__.update(state)
    return pickle.dumps({"v_template": ch}, protocol=2)


class _SubarrayDtype:
  """Pickles as a dtype whose state declares a (3,) subarray of float64."""

  def __reduce__(self):
    return np.dtype, ("f8", False, True), (3, "<", (np.dtype("f8"), (3,)), None, None, 24, 8, 0)


def _array_of(dtype, shape=(2,), raw=b"\0" * 48):
  return _Reduce(RECONSTRUCT, np.ndarray, (0,), b"b").with_state((1, shape, dtype, False, raw))


def _hostile_payload(name, marker):
  """The pickle `name` (built on demand: np.asmatrix warns when it is called)."""
  shell = f"touch {marker}"
  dump = lambda obj: pickle.dumps(obj, protocol=2)
  payloads = {
    "os.system": lambda: dump({"v_template": _Reduce(os.system, shell)}),
    "eval": lambda: dump({"v_template": _Reduce(eval, f"__import__('os').system({shell!r})")}),
    "subprocess": lambda: dump(_Reduce(subprocess.check_call, ["touch", str(marker)])),
    "importlib": lambda: dump(_Reduce(importlib.import_module, "os")),
    "reconstructor": lambda: pickle.dumps(
      _Reduce(copyreg._reconstructor, subprocess.Popen, object, None), protocol=1
    ),
    "reconstructor base": lambda: dump(_Reduce(copyreg._reconstructor, complex, complex, "1e9")),
    "chumpy-smuggled": lambda: _chumpy_with_state({"x": _Reduce(os.system, shell)}),
    "bytearray bomb": lambda: dump(_Reduce(bytearray, 10**13)),
    "bytes bomb": lambda: dump(_Reduce(bytes, 10**13)),
    "codecs": lambda: dump(_Reduce(__import__("_codecs").encode, "x", "rot13")),
    "ndarray call": lambda: dump(_Reduce(np.ndarray, (10**12,))),
    "object array": lambda: dump({"v_template": np.array([None, 1], dtype=object)}),
    "subarray dtype": lambda: dump({"v_template": _array_of(_SubarrayDtype())}),
    "matrix subclass": lambda: dump({"v_template": np.asmatrix(np.zeros((2, 3)))}),
  }
  return payloads[name]()


HOSTILE_PICKLES = (
  "os.system",
  "eval",
  "subprocess",
  "importlib",
  "reconstructor",
  "reconstructor base",
  "chumpy-smuggled",
  "bytearray bomb",
  "bytes bomb",
  "codecs",
  "ndarray call",
  "object array",
  "subarray dtype",
  "matrix subclass",
)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("name", HOSTILE_PICKLES)
def test_hostile_pickle_is_refused(tmp_path, name):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pkl"
  path.write_bytes(_hostile_payload(name, marker))
  with pytest.raises(ModelFileError) as info:
    morphable.load_model(f"flame:{path}")
  message = str(info.value)
  assert "\n" not in message and str(path) in message
  assert "refusing" in message or "not an array" in message or "plain" in message, message
  assert not marker.exists()


def test_chumpy_holding_a_sparse_matrix_is_not_an_array(tmp_path):
  path = tmp_path / "evil.pkl"
  path.write_bytes(_chumpy_with_state({"x": scipy.sparse.csc_matrix(np.eye(3))}))
  with pytest.raises(ModelFileError, match="does not hold an array"):
    flame.read_flame(path, 1)


def test_unpickler_names():
  unpickler = flame.RestrictedUnpickler(io.BytesIO(b""))
  for module in ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse"):
    stand_in = unpickler.find_class(module, "csc_matrix")
    assert issubclass(stand_in, flame.SparseStandIn) and stand_in.format == "csc"
  assert unpickler.find_class("chumpy.ch", "Ch") is flame.ChumpyStandIn
  assert unpickler.find_class("numpy.core.multiarray", "dtype") is flame.DtypeStandIn
  for module, name in (("builtins", "eval"), ("scipy.sparse", "load_npz"), ("numpy", "load")):
    with pytest.raises(ModelFileError, match="refusing"):
      unpickler.find_class(module, name)


def test_garbage_and_oversized_pickles(tmp_path, monkeypatch):
  path = tmp_path / "junk.pkl"
  path.write_bytes(b"garbage")
  with pytest.raises(ModelFileError, match="not a readable FLAME pickle"):
    morphable.load_model(f"flame:{path}")
  path.write_bytes(pickle.dumps([1, 2], protocol=2))
  with pytest.raises(ModelFileError, match="holds a dict"):
    flame.read_flame(path, 1)
  monkeypatch.setattr(flame, "MAX_PICKLE_BYTES", 4)
  with pytest.raises(ModelFileError, match="limit"):
    flame.read_flame(path, 1)


def test_referenced_bytes_cannot_multiply(tmp_path):
  """One large string decoded many times through the memo is charged each time."""
  big = "a" * 1_000_000
  # 64 decodings of one memoised string: fine under a 100 MB budget, not under 10 MB.
  items = [_Reduce(__import__("_codecs").encode, big, "latin1") for _ in range(64)]
  data = pickle.dumps({"v": items}, protocol=2)
  assert len(data) < 2_000_000  # the string is stored once and referenced
  unpickler = flame.RestrictedUnpickler(io.BytesIO(data), encoding="latin1", budget=100 << 20)
  assert len(unpickler.load()["v"]) == 64
  unpickler = flame.RestrictedUnpickler(io.BytesIO(data), encoding="latin1", budget=10 << 20)
  with pytest.raises(ModelFileError, match="budget"):
    unpickler.load()


# ---------------------------------------------------------------------------------------
# Hostile arrays and sparse matrices: one-line errors, never a crash (run in a subprocess,
# so that a segfault or an out-of-memory kill shows as a failure instead of ending pytest).


def _mutated_csc(**fields):
  matrix = scipy.sparse.csc_matrix(_flame_arrays()["J_regressor"])
  matrix.__dict__.update(fields)
  return matrix


def _sparse_template(v_template, bad_index):
  matrix = scipy.sparse.csc_matrix(v_template)
  matrix.indices[-1] = bad_index
  return matrix


def _npz_with_header(path, name, header, data=b"\0" * 16, version=(1, 0)):
  stream = io.BytesIO()
  if version == (1, 0):
    np.lib.format.write_array_header_1_0(stream, header)
  else:
    np.lib.format.write_array_header_2_0(stream, header)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(name + ".npy", stream.getvalue() + data)
  return path


def _hostile_files(tmp_path):
  """{file: expected message fragment}."""
  arrays = _flame_arrays()
  csc = scipy.sparse.csc_matrix(arrays["J_regressor"])
  nnz = csc.nnz
  big_indices = np.full(nnz, 10**7, csc.indices.dtype)
  negative = csc.indices.copy()
  negative[3] = -5
  falling = csc.indptr.copy()
  falling[2], falling[3] = falling[3], falling[2] - 1

  class HugeArray:
    def __reduce__(self):
      return RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (10**15,), np.dtype("f8"), False, b"")

  class LyingArray:
    def __reduce__(self):
      return RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (1000, 3), np.dtype("f8"), False, b"x" * 8)

  cases = {
    "indices out of range": (
      dict(J_regressor=_mutated_csc(indices=big_indices)),
      "row indices span",
    ),
    "negative index": (dict(J_regressor=_mutated_csc(indices=negative)), "row indices span"),
    "indptr falls": (dict(J_regressor=_mutated_csc(indptr=falling)), "'indptr' must rise"),
    "indptr not from 0": (dict(J_regressor=_mutated_csc(indptr=csc.indptr + 1)), "'indptr' must"),
    "indptr short": (dict(J_regressor=_mutated_csc(indptr=csc.indptr[:-1])), "'indptr' has"),
    "nnz mismatch": (dict(J_regressor=_mutated_csc(data=csc.data[:-1])), "indices for"),
    "huge sparse shape": (
      dict(J_regressor=_mutated_csc(_shape=(10**9, 10**9))),
      "expected (5, 60)",
    ),
    "huge sparse template": (dict(v_template=_mutated_csc(_shape=(10**12, 3))), "over the"),
    "sparse template out of range": (
      dict(v_template=_mutated_csc(_shape=(60, 3), indices=big_indices)),
      "'indptr' has",
    ),
    "sparse template index": (
      dict(v_template=_sparse_template(arrays["v_template"], 10**7)),
      "row indices span",
    ),
    "object sparse data": (
      dict(J_regressor=_mutated_csc(data=np.array([None] * nnz, dtype=object))),
      "refusing",
    ),
    "huge array state": (dict(v_template=HugeArray()), "over the"),
    "lying array state": (dict(v_template=LyingArray()), "holds 8 bytes"),
  }
  files = {}
  for name, (replace, fragment) in cases.items():
    path = tmp_path / (name.replace(" ", "_") + ".pkl")
    _write_flame(path, arrays, **replace)
    files[path] = fragment
  petabyte = {"descr": "<f8", "fortran_order": False, "shape": (10**14, 10)}
  files[_npz_with_header(tmp_path / "huge_header.npz", "vt", petabyte)] = "over the"
  lie = {"descr": "<f8", "fortran_order": False, "shape": (3, 2)}
  files[_npz_with_header(tmp_path / "short_member.npz", "vt", lie)] = "zip member holds"
  obj = {"descr": "|O", "fortran_order": False, "shape": (2,)}
  files[_npz_with_header(tmp_path / "object.npz", "vt", obj)] = "plain numeric"
  return files


def test_hostile_arrays_give_one_line_errors_without_crashing(tmp_path):
  files = _hostile_files(tmp_path)
  script = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from sdsjax import bounded_npz, flame
    from sdsjax.errors import ModelFileError
    for name in sys.argv[1:]:
      try:
        if name.endswith(".npz"):
          flame.read_uv(Path(name))
        else:
          flame.read_flame(Path(name), 5, 0)
      except ModelFileError as e:
        print("ModelFileError:", e, flush=True)
      else:
        print("accepted", name, flush=True)
    """
  )
  done = subprocess.run(
    [sys.executable, "-c", script, *map(str, files)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, f"rc {done.returncode}: {done.stderr[-2000:]}"
  lines = done.stdout.splitlines()
  assert len(lines) == len(files), done.stdout  # one line each: no multi-line messages
  for line, (path, fragment) in zip(lines, files.items()):
    assert line.startswith("ModelFileError:") and str(path) in line, line
    assert fragment in line, line
  assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------
# bounded_npz.


def test_read_npz_matches_np_load(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
    "floats": rng.normal(size=(4, 3)).astype(np.float32),
    "fortran": np.asfortranarray(rng.normal(size=(3, 5))),
    "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
    "flags": np.array([True, False]),
    "names": np.array(["head", "left_eye"]),
    "scalar": np.array(2.5),
    "empty": np.zeros((0, 3)),
  }
  for save in (np.savez, np.savez_compressed):
    path = tmp_path / f"{save.__name__}.npz"
    save(path, **arrays)
    read = bounded_npz.read_npz(path)
    assert read.keys() == arrays.keys()
    for key, array in arrays.items():
      np.testing.assert_array_equal(read[key], array)
      assert read[key].dtype == array.dtype and read[key].shape == array.shape
    assert read["fortran"].flags.f_contiguous and read["floats"].flags.writeable
    assert bounded_npz.read_npz(path, keys=("names", "nope")).keys() == {"names"}


def test_read_npz_limits_and_malformed_files(tmp_path):
  path = tmp_path / "m.npz"
  np.savez_compressed(path, a=np.zeros(1000), b=np.zeros(1000))
  with pytest.raises(ModelFileError, match="over the"):
    bounded_npz.read_npz(path, max_array_bytes=7999)
  with pytest.raises(ModelFileError, match="over the"):
    bounded_npz.read_npz(path, max_total_bytes=12000)
  assert bounded_npz.read_npz(path, max_total_bytes=16000)["b"].shape == (1000,)
  np.savez(path, a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(ModelFileError, match="plain numeric"):
    bounded_npz.read_npz(path)
  header = {"descr": "<f8", "fortran_order": False, "shape": (10**15,)}
  _npz_with_header(path, "vt", header, version=(2, 0))
  with pytest.raises(ModelFileError, match="over the") as info:
    bounded_npz.read_npz(path)
  assert "\n" not in str(info.value)
  # A version-2 header whose length field claims 4 GiB is refused before it is read.
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("vt.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1) + b"{")
  with pytest.raises(ModelFileError, match="header of 4294967295 bytes"):
    bounded_npz.read_npz(path)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("notes.txt", b"hello")
  with pytest.raises(ModelFileError, match=r"not a \.npy array"):
    bounded_npz.read_npz(path)
  path.write_bytes(b"not a zip")
  with pytest.raises(ModelFileError, match=r"not a readable \.npz file"):
    bounded_npz.read_npz(path)
  with pytest.raises(ModelFileError, match="not found"):
    bounded_npz.read_npz(tmp_path / "nowhere.npz")


def test_read_npz_detects_corrupt_data(tmp_path):
  path = tmp_path / "m.npz"
  np.savez(path, a=np.arange(100.0))
  raw = bytearray(path.read_bytes())
  at = raw.index(np.arange(100.0).tobytes()[8:16])
  raw[at] ^= 0xFF  # flip a byte of the data: the CRC no longer matches
  path.write_bytes(bytes(raw))
  with pytest.raises(ModelFileError, match=r"not a readable \.npz file"):
    bounded_npz.read_npz(path)


def test_huge_header_npz_head_model_is_one_line_error(tmp_path):
  header = {"descr": "<f4", "fortran_order": False, "shape": (10**15, 3)}
  path = _npz_with_header(tmp_path / "head.npz", "mean", header)
  with pytest.raises(ModelFileError, match="over the") as info:
    morphable.load_model(str(path))
  assert "\n" not in str(info.value)
