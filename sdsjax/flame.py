"""Reads FLAME `generic_model.pkl` files without chumpy and without trusting them.

The official FLAME 2020/2023 files are Python-2 pickles whose `shapedirs` is a
`chumpy.ch.Ch` object (its pickled state dict holds the array under `x`) and whose
`J_regressor` is a scipy sparse matrix. chumpy does not import on numpy ≥ 1.24 or
Python 3.11, and a pickle is a program: unpickling an arbitrary file can run code, and
numpy's and scipy's own reconstruction code trusts what it is given (a sparse matrix with
out-of-range indices makes `.toarray()` write outside its buffer; an array state that
declares a petabyte shape is allocated as asked). So `RestrictedUnpickler` builds **only
inert stand-ins** and no numpy or scipy code runs on unchecked input:

* chumpy classes -> `ChumpyStandIn` (keeps the pickled state; `.x` is a `Ch`'s array);
* scipy.sparse csc/csr/coo matrices and arrays, under old (`scipy.sparse.csc`) and new
  module names -> stand-ins that only record their state; `as_array` validates every
  component (shape, dtype, index ranges, a monotone `indptr` from 0 to nnz) and densifies
  them in numpy itself;
* numpy's `_reconstruct`, `ndarray`, `dtype`, `scalar` and `_frombuffer` -> checked
  equivalents: only plain dtypes (no object, structured or subarray dtypes), every declared
  shape bounded (`bounded_npz.check_declared_array`) and matched against the bytes that the
  file actually holds before an array exists;
* `copyreg._reconstructor` only for the stand-ins above, `_codecs.encode` only to latin-1
  (how protocol 2 stores bytes), `bytes()` without arguments (protocol 2's b"") and the
  side-effect-free builtins `object`, `set`, `frozenset`, `slice`, `complex`.

Anything else (`os.system`, `eval`, `subprocess`, `importlib`, ...) is refused by
`find_class` before it is called. Everything a hostile file can make the loader allocate is
bounded: the file size, each array, and the total (`_codecs.encode`, sets and arrays are
charged to a per-load budget, so a large object referenced many times cannot multiply).
Every failure is a one-line `ModelFileError`.

`read_flame` then validates the FLAME arrays (shapes against `v_template`, finite values,
skinning weights and joint regressor rows summing to 1, `kintree_table` a tree with parents
before children) and returns them in the npz layout of docs/head_model.md, skeleton included.
"""

from __future__ import annotations

import codecs
import math
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from sdsjax import bounded_npz
from sdsjax.errors import ModelFileError

IDENTITY_COMPONENTS = 300  # shapedirs[..., :300] is identity, [..., 300:] expression
# FLAME's 5 joints in kintree order. The eyes follow FLAME's own naming (smplx's FLAME, from
# the FLAME authors, concatenates the pose as global, neck, jaw, leye, reye): "left" is
# the subject's left, +x in FLAME's frame (+y up, facing +z).
FLAME_JOINT_NAMES = ("global", "neck", "jaw", "eye_left", "eye_right")
POSE_KEYS = ("J_regressor", "weights", "kintree_table", "posedirs")
MAX_PICKLE_BYTES = 256 << 20  # FLAME 2020's generic_model.pkl is ~50 MB
MAX_JOINTS = 64
ROW_SUM_TOLERANCE = 1e-3  # skin weights and joint regressor rows must sum to 1 within this
# Per-load budget for everything unpickling allocates (arrays, decoded bytes, sets).
UNPICKLE_BUDGET_BYTES = bounded_npz.MAX_TOTAL_BYTES
_SET_ENTRY_BYTES = 64  # what a set entry costs, roughly, in memory

_NUMPY_MODULES = (
  "numpy",
  "numpy.core.multiarray",
  "numpy._core.multiarray",
  "numpy.core.numeric",
  "numpy._core.numeric",
)
_SPARSE_NAMES = {
  f"{fmt}_{kind}": fmt for fmt in ("csc", "csr", "coo") for kind in ("matrix", "array")
}
# Plain numpy dtype codes a pickled array may use ("b1" is bool); strings need a length.
_DTYPE_CODES = {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"}
_STRING_DTYPE = re.compile(r"[SU][1-9][0-9]{0,3}")


def _refuse(what: str) -> ModelFileError:
  return ModelFileError(
    f"refusing to unpickle {what}: a FLAME file holds only numpy, scipy.sparse and "
    "chumpy objects; is this really a FLAME generic_model.pkl?"
  )


def _is_int(n: Any) -> bool:
  return isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))


# ----------------------------------------------------------------------------------------
# Inert stand-ins: they record pickled state and never run numpy, scipy or chumpy code.


class ChumpyStandIn:
  """Holds the pickled state of any chumpy object; `.x` is the array of a `Ch`."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs  # chumpy's constructor arguments are irrelevant: the state follows.
    instance = super().__new__(cls)
    instance.fields = {}
    return instance

  def __setstate__(self, state: Any) -> None:
    self.fields = _state_dict(state, "a chumpy object")

  @property
  def x(self) -> Any:
    return self.fields.get("x")


class SparseStandIn:
  """Holds the pickled state of a scipy sparse matrix; `as_array` validates and densifies."""

  format = ""

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    instance = super().__new__(cls)
    instance.fields = {}
    return instance

  def __setstate__(self, state: Any) -> None:
    self.fields = _state_dict(state, f"a {self.format} sparse matrix")


_SPARSE_STAND_INS = {
  fmt: type(f"{fmt.capitalize()}StandIn", (SparseStandIn,), {"format": fmt, "__module__": __name__})
  for fmt in ("csc", "csr", "coo")
}


def _state_dict(state: Any, what: str) -> dict:
  if isinstance(state, tuple) and len(state) == 2:  # (dict, slot state)
    parts = [p for p in state if p is not None]
    if not all(isinstance(p, dict) for p in parts):
      raise ModelFileError(f"{what} has a malformed pickled state")
    state = {k: v for p in parts for k, v in p.items()}
  if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
    raise ModelFileError(f"{what} has a malformed pickled state ({type(state).__name__})")
  return dict(state)


class _NdarrayName:
  """What `numpy.ndarray` resolves to: a marker `_reconstruct` accepts; never constructed."""

  def __new__(cls, *args, **kwargs):
    raise ModelFileError("refusing to construct numpy.ndarray from pickled arguments")


class DtypeStandIn:
  """A pickled `numpy.dtype(code, align, copy)` plus its state; only plain dtypes."""

  def __new__(cls, code: Any = None, align: Any = False, copy: Any = True):
    del align, copy
    if isinstance(code, bytes):
      code = code.decode("latin1")
    if not isinstance(code, str) or not (code in _DTYPE_CODES or _STRING_DTYPE.fullmatch(code)):
      raise ModelFileError(
        f"refusing pickled numpy dtype {code!r}: only plain numeric arrays are accepted"
      )
    instance = super().__new__(cls)
    instance.code, instance.byteorder = code, "="
    return instance

  def __setstate__(self, state: Any) -> None:
    # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
    if not (
      isinstance(state, tuple)
      and 8 <= len(state) <= 9
      and state[0] in (3, 4)
      and state[1] in ("<", ">", "|", "=")
      and state[2] is None
      and state[3] is None
      and state[4] is None
    ):
      raise ModelFileError(
        f"refusing pickled numpy dtype state {str(state)[:80]}: only plain dtypes are accepted"
      )
    self.byteorder = state[1]

  def resolve(self) -> np.dtype:
    dtype = np.dtype(self.code)
    return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


class ArrayStandIn:
  """What numpy's `_reconstruct` returns; the BUILD that follows gives it its state."""

  def __init__(self, unpickler: RestrictedUnpickler):
    self._unpickler = unpickler
    self.array: np.ndarray | None = None

  def __setstate__(self, state: Any) -> None:
    # (version, shape, dtype, is_fortran, rawdata); old numpy wrote it without the version.
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise ModelFileError("a pickled numpy array has a malformed state")
    shape, dtype, fortran, raw = state[-4:]
    self.array = self._unpickler.make_array(raw, dtype, shape, "F" if fortran else "C")


def _resolve_dtype(dtype: Any) -> np.dtype:
  if not isinstance(dtype, DtypeStandIn):
    raise ModelFileError(f"a pickled numpy array has dtype {type(dtype).__name__}, not a dtype")
  return dtype.resolve()


def _raw_bytes(raw: Any) -> bytes | bytearray:
  if isinstance(raw, str):  # Python-2 str, decoded as latin-1 by the unpickler
    try:
      return raw.encode("latin1")
    except UnicodeEncodeError:
      raise ModelFileError("a pickled numpy array has non-latin-1 raw data") from None
  if isinstance(raw, (bytes, bytearray)):
    return raw
  # A list here is an object array's elements.
  raise ModelFileError(
    f"a pickled numpy array holds {type(raw).__name__}, not raw data; object arrays are refused"
  )


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that only builds checked numpy arrays and inert stand-ins.

  Every allocation it makes on the file's behalf is charged to `budget` bytes.
  """

  def __init__(self, file, *, budget: int = UNPICKLE_BUDGET_BYTES, **kwargs):
    super().__init__(file, **kwargs)
    self.budget = budget

  def charge(self, nbytes: int, what: str) -> None:
    self.budget -= nbytes
    if self.budget < 0:
      raise ModelFileError(f"{what} exceeds the unpickling memory budget; is the file hostile?")

  def find_class(self, module: str, name: str) -> Any:
    if module == "chumpy" or module.startswith("chumpy."):
      return ChumpyStandIn
    if module in _NUMPY_MODULES:
      numpy_names = {
        "_reconstruct": self._reconstruct,
        "ndarray": _NdarrayName,
        "dtype": DtypeStandIn,
        "scalar": self._scalar,
        "_frombuffer": self._frombuffer,
      }
      if name in numpy_names:
        return numpy_names[name]
    if (module == "scipy.sparse" or module.startswith("scipy.sparse.")) and name in _SPARSE_NAMES:
      return _SPARSE_STAND_INS[_SPARSE_NAMES[name]]
    if module in ("copyreg", "copy_reg") and name == "_reconstructor":
      return _reconstructor
    if module in ("builtins", "__builtin__"):
      builtins = {
        "object": object,
        "set": self._set,
        "frozenset": self._frozenset,
        "slice": slice,
        "complex": complex,
        "bytes": _empty_bytes,
      }
      if name in builtins:
        return builtins[name]
    if module == "_codecs" and name == "encode":  # how protocol 2 writes Python 3 bytes
      return self._encode_latin1
    raise _refuse(f"{module}.{name}")

  # The checked replacements for numpy's reconstruction helpers.

  def make_array(self, raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """An array from raw bytes, after checking the declared shape and dtype against them."""
    dtype = _resolve_dtype(dtype)
    if isinstance(shape, list):
      shape = tuple(shape)
    nbytes = bounded_npz.check_declared_array(shape, dtype, "a pickled numpy array")
    raw = _raw_bytes(raw)
    if len(raw) != nbytes:
      raise ModelFileError(
        f"a pickled numpy array declares shape {shape} of {dtype} ({nbytes} bytes) "
        f"but holds {len(raw)} bytes"
      )
    self.charge(nbytes, "a pickled numpy array")
    flat = np.frombuffer(raw, dtype, count=math.prod(shape)) if nbytes else np.empty(0, dtype)
    if order == "F":
      return flat.reshape(shape[::-1]).transpose().copy(order="F")
    return flat.reshape(shape).copy()

  def _reconstruct(self, subtype: Any, shape: Any = None, typecode: Any = None) -> ArrayStandIn:
    del shape, typecode  # numpy passes a placeholder (0,) shape; the BUILD state has the array
    if subtype is not _NdarrayName:
      raise _refuse(f"numpy _reconstruct of {getattr(subtype, '__name__', subtype)!r}")
    return ArrayStandIn(self)

  def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    if order not in ("C", "F"):
      raise ModelFileError(f"a pickled numpy array has order {order!r}")
    return self.make_array(buf, dtype, shape, order)

  def _scalar(self, dtype: Any, raw: Any = b"") -> np.generic:
    return self.make_array(raw, dtype, (), "C")[()]

  def _encode_latin1(self, text: Any, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` limited to latin-1, the only encoding pickle uses for bytes."""
    if not isinstance(text, str) or not isinstance(encoding, str):
      raise _refuse("_codecs.encode of a non-string")
    try:
      latin1 = codecs.lookup(encoding).name == "iso8859-1"
    except LookupError:
      latin1 = False
    if not latin1:
      raise ModelFileError(f"refusing to decode pickled bytes as {encoding!r}")
    self.charge(len(text), "pickled bytes")
    try:
      return text.encode("latin1")
    except UnicodeEncodeError:
      raise ModelFileError("pickled bytes are not latin-1") from None

  def _set(self, items: Any = ()) -> set:
    if not isinstance(items, (list, tuple)):
      raise _refuse(f"a set built from {type(items).__name__}")
    self.charge(_SET_ENTRY_BYTES * len(items), "a pickled set")
    return set(items)

  def _frozenset(self, items: Any = ()) -> frozenset:
    return frozenset(self._set(items))


def _empty_bytes(*args: Any) -> bytes:
  """`bytes()`: protocol 2 writes b"" as a call without arguments (`bytes(n)` would allocate)."""
  if args:
    raise _refuse("bytes() with arguments")
  return b""


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
  """`copyreg._reconstructor` (Python-2 object pickles) limited to the inert stand-ins."""
  allowed = (ChumpyStandIn, *_SPARSE_STAND_INS.values())
  if base is not object or cls not in allowed or state is not None:
    name = getattr(cls, "__name__", type(cls).__name__)
    raise _refuse(f"copyreg._reconstructor({name}, {getattr(base, '__name__', base)})")
  return cls.__new__(cls)


# ----------------------------------------------------------------------------------------
# Unwrapping and validation.


def _shape_text(shape) -> str:
  return "(" + ", ".join("?" if n is None else str(n) for n in shape) + ")"


def _check_shape(shape: tuple, expected: tuple | None, key: str, path: Path) -> None:
  if expected is None:
    return
  if len(shape) != len(expected) or any(e is not None and n != e for n, e in zip(shape, expected)):
    raise ModelFileError(
      f"{path}: '{key}' has shape {tuple(shape)}, expected {_shape_text(expected)}"
    )


def _plain_array(value: Any) -> np.ndarray | None:
  if isinstance(value, ArrayStandIn):
    return value.array
  return value if isinstance(value, np.ndarray) else None


def _sparse_part(fields: dict, name: str, what: str, kinds: str) -> np.ndarray:
  part = _plain_array(fields.get(name))
  if part is None or part.ndim != 1 or part.dtype.kind not in kinds:
    raise ModelFileError(
      f"{what}: '{name}' must be a 1-D {'integer' if kinds == 'iu' else 'numeric'} array"
    )
  return part


def _densify(sparse: SparseStandIn, key: str, path: Path, expected: tuple | None) -> np.ndarray:
  """Validates every component of a pickled sparse matrix and densifies it in numpy."""
  what = f"{path}: '{key}' ({sparse.format} sparse matrix)"
  fields = sparse.fields
  shape = fields.get("_shape", fields.get("shape"))
  if not (
    isinstance(shape, tuple) and len(shape) == 2 and all(_is_int(n) and n >= 0 for n in shape)
  ):
    raise ModelFileError(f"{what}: malformed shape {str(shape)[:80]}")
  rows, cols = int(shape[0]), int(shape[1])
  _check_shape((rows, cols), expected, key, path)  # before anything the size of it exists
  bounded_npz.check_declared_array((rows, cols), np.dtype(np.float64), what)
  data = _sparse_part(fields, "data", what, "biuf").astype(np.float64)
  nnz = data.shape[0]
  if not np.all(np.isfinite(data)):
    raise ModelFileError(f"{what}: contains NaN or infinite values")
  if sparse.format in ("csc", "csr"):
    indices = _sparse_part(fields, "indices", what, "iu").astype(np.int64)
    indptr = _sparse_part(fields, "indptr", what, "iu").astype(np.int64)
    major = cols if sparse.format == "csc" else rows
    if indices.shape[0] != nnz:
      raise ModelFileError(f"{what}: {indices.shape[0]} indices for {nnz} values")
    if indptr.shape[0] != major + 1:
      raise ModelFileError(f"{what}: 'indptr' has {indptr.shape[0]} entries, expected {major + 1}")
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
      raise ModelFileError(f"{what}: 'indptr' must rise monotonically from 0 to nnz = {nnz}")
    major_index = np.repeat(np.arange(major), np.diff(indptr))
    row, col = (indices, major_index) if sparse.format == "csc" else (major_index, indices)
  else:  # coo: `coords` (scipy ≥ 1.13) or `row`/`col`
    coords = fields.get("coords", (fields.get("row"), fields.get("col")))
    if not isinstance(coords, tuple) or len(coords) != 2:
      raise ModelFileError(f"{what}: malformed coordinates")
    parts = {"row": coords[0], "col": coords[1]}
    row, col = (_sparse_part(parts, n, what, "iu").astype(np.int64) for n in ("row", "col"))
    if row.shape[0] != nnz or col.shape[0] != nnz:
      raise ModelFileError(f"{what}: {row.shape[0]} rows and {col.shape[0]} cols for {nnz} values")
  for index, count, name in ((row, rows, "row"), (col, cols, "column")):
    if nnz and (index.min() < 0 or index.max() >= count):
      raise ModelFileError(
        f"{what}: {name} indices span [{index.min()}, {index.max()}] but there are {count} {name}s"
      )
  dense = np.zeros((rows, cols))
  np.add.at(dense, (row, col), data)  # duplicates add up, as in scipy
  return dense


def as_array(value: Any, key: str, path: Path, shape: tuple | None = None) -> np.ndarray:
  """Unwraps chumpy and sparse stand-ins; returns a checked ndarray.

  Args:
    value: what the pickle holds under `key`.
    key: its name, for messages.
    path: the file, for messages.
    shape: the expected shape, None entries free; a sparse matrix is checked against it
      before it is densified.
  """
  if isinstance(value, ChumpyStandIn):
    value = value.x
    if isinstance(value, (ChumpyStandIn, SparseStandIn)):
      raise ModelFileError(f"{path}: '{key}' is a chumpy object that does not hold an array")
  if isinstance(value, SparseStandIn):
    return _densify(value, key, path, shape)
  array = _plain_array(value)
  if array is None:
    found = "an incomplete array" if isinstance(value, ArrayStandIn) else type(value).__name__
    raise ModelFileError(
      f"{path}: '{key}' is {found}, not an array; is this a FLAME generic_model.pkl?"
    )
  _check_shape(array.shape, shape, key, path)
  return array


def _required(data: dict, key: str, path: Path) -> Any:
  if key not in data:
    raise ModelFileError(f"{path}: missing '{key}'; is this a FLAME generic_model.pkl?")
  return data[key]


def _float_array(data: dict, key: str, path: Path, shape: tuple | None) -> np.ndarray:
  array = as_array(_required(data, key, path), key, path, shape)
  if array.dtype.kind not in "biuf":
    raise ModelFileError(f"{path}: '{key}' has dtype {array.dtype}, expected floats")
  array = array.astype(np.float64)
  if not np.all(np.isfinite(array)):
    raise ModelFileError(f"{path}: '{key}' contains NaN or infinite values")
  return array


def _int_array(data: dict, key: str, path: Path, shape: tuple | None) -> np.ndarray:
  array = as_array(_required(data, key, path), key, path, shape)
  if array.dtype.kind not in "iu":
    raise ModelFileError(f"{path}: '{key}' has dtype {array.dtype}, expected integers")
  return array


def read_pickle(path: Path) -> dict:
  """Returns the top-level dict of a FLAME pickle (values are stand-ins or checked arrays)."""
  try:
    size = Path(path).stat().st_size
    if size > MAX_PICKLE_BYTES:
      raise ModelFileError(
        f"{path}: {size} bytes, more than a FLAME pickle's limit of {MAX_PICKLE_BYTES}"
      )
    with open(path, "rb") as f:
      data = RestrictedUnpickler(f, encoding="latin1").load()
  except ModelFileError as e:
    message = str(e)
    raise ModelFileError(
      message if message.startswith(str(path)) else f"{path}: {message}"
    ) from None
  except Exception as e:  # anything a malformed pickle raises (MemoryError included)
    reason = " ".join(str(e).split())[:200]
    if isinstance(e, OSError):
      raise ModelFileError(f"{path}: cannot read the FLAME file ({reason})") from None
    raise ModelFileError(
      f"{path}: not a readable FLAME pickle ({type(e).__name__}: {reason})"
    ) from None
  if not isinstance(data, dict):
    raise ModelFileError(f"{path}: a FLAME pickle holds a dict, found {type(data).__name__}")
  return data


def read_flame(path: Path, num_components: int, num_expressions: int = 0) -> dict[str, np.ndarray]:
  """Reads the template, faces, identity and expression components and the pose model.

  Args:
    path: generic_model.pkl.
    num_components: N identity components to keep (≤ 300 and ≤ what the file has).
    num_expressions: E expression components to keep (`shapedirs[..., 300:300 + E]`;
      FLAME 2020/2023 have 100).

  Returns:
    dict in the npz layout of docs/head_model.md, in FLAME's units (metres) and frame:
    `mean` (V, 3), `faces` (F, 3), `basis` (N, V, 3), `expression_basis` (E, V, 3),
    `expression_names` (E,), and, when the file has its pose model (FLAME always does):
    `joint_regressor` (J, V), `skin_weights` (V, J), `pose_basis` (9·(J − 1), V, 3) in the
    lrotmin feature order (joint 1..J−1, each (R − I) row-major), `parents` (J,) with −1
    for the root and `joint_names` (J,) (`FLAME_JOINT_NAMES` for FLAME's 5 joints).
  """
  data = read_pickle(path)
  mean = _float_array(data, "v_template", path, (None, 3))
  num_vertices = mean.shape[0]
  faces = _int_array(data, "f", path, (None, 3))
  shapedirs = _float_array(data, "shapedirs", path, (num_vertices, 3, None))
  available = min(shapedirs.shape[2], IDENTITY_COMPONENTS)
  if num_components > available:
    raise ModelFileError(
      f"{path}: asked for {num_components} components but the file has "
      f"{available} identity components; lower num_components"
    )
  expressions = max(shapedirs.shape[2] - IDENTITY_COMPONENTS, 0)
  if num_expressions > expressions:
    raise ModelFileError(
      f"{path}: asked for {num_expressions} expression components but the file has "
      f"{expressions}; lower num_expressions"
    )
  basis = np.transpose(shapedirs[:, :, :num_components], (2, 0, 1))
  first = IDENTITY_COMPONENTS
  expression = np.transpose(shapedirs[:, :, first : first + num_expressions], (2, 0, 1))
  arrays = {
    "mean": mean,
    "basis": basis,
    "faces": faces,
    "expression_basis": expression,
    "expression_names": np.array([f"flame_expression_{k:03d}" for k in range(num_expressions)]),
  }
  arrays.update(_read_pose(data, path, num_vertices))
  return arrays


def _read_pose(data: dict, path: Path, num_vertices: int) -> dict[str, np.ndarray]:
  """FLAME's pose model as `make_model` skeleton arrays; {} if the file has none of it."""
  present = [k for k in POSE_KEYS if k in data]
  if not present:
    return {}
  if len(present) != len(POSE_KEYS):
    missing = [k for k in POSE_KEYS if k not in data]
    raise ModelFileError(f"{path}: has {present} but not {missing}; the pose model is incomplete")
  kintree = _int_array(data, "kintree_table", path, (2, None))
  num_joints = kintree.shape[1]
  if not 1 <= num_joints <= MAX_JOINTS:
    raise ModelFileError(
      f"{path}: 'kintree_table' has {num_joints} joints, expected 1-{MAX_JOINTS}"
    )
  parents = _parents(kintree, path)
  regressor = _float_array(data, "J_regressor", path, (num_joints, num_vertices))
  weights = _float_array(data, "weights", path, (num_vertices, num_joints))
  posedirs = _float_array(data, "posedirs", path, (num_vertices, 3, 9 * (num_joints - 1)))
  for key, array in (("J_regressor", regressor), ("weights", weights)):
    worst = np.abs(array.sum(1) - 1.0).max()
    if worst > ROW_SUM_TOLERANCE:
      raise ModelFileError(
        f"{path}: '{key}' rows must sum to 1 (weighted averages); one is off by {worst:.3g}"
      )
  names = (
    FLAME_JOINT_NAMES
    if num_joints == len(FLAME_JOINT_NAMES)
    else [f"joint_{j}" for j in range(num_joints)]
  )
  return {
    "joint_regressor": regressor,
    "skin_weights": weights,
    # posedirs[v, c, p] -> pose_basis[p, v, c]; p = 9·(joint − 1) + 3·row + col of (R − I).
    "pose_basis": np.transpose(posedirs, (2, 0, 1)),
    "parents": parents,
    "joint_names": np.array(names),
  }


def _parents(kintree: np.ndarray, path: Path) -> np.ndarray:
  """`kintree_table` (2, J): row 0 the parents (root 2³²−1 or −1), row 1 the joint ids 0..J−1."""
  num_joints = kintree.shape[1]
  table = kintree.astype(np.int64)  # uint64 roots wrap to −1, like the int64 2³²−1 below
  if not np.array_equal(table[1], np.arange(num_joints)):
    raise ModelFileError(
      f"{path}: 'kintree_table' row 1 must list joints 0..{num_joints - 1} in order"
    )
  parents = table[0].copy()
  if parents[0] not in (-1, 2**32 - 1):
    raise ModelFileError(f"{path}: 'kintree_table' must start with the root joint (parent -1)")
  parents[0] = -1
  later = parents[1:]
  if np.any(later < 0) or np.any(later >= np.arange(1, num_joints)):
    raise ModelFileError(
      f"{path}: 'kintree_table' is not a tree with every parent before its children"
    )
  return parents


def read_uv(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads `vt` (T, 2) and `ft` (F, 3) from a FLAME_texture.npz-style file (bounded)."""
  arrays = bounded_npz.read_npz(path, keys=("vt", "ft"))
  if "vt" not in arrays or "ft" not in arrays:
    raise ModelFileError(f"{path}: a FLAME UV file needs arrays 'vt' and 'ft'")
  return arrays["vt"], arrays["ft"]
