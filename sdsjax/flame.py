"""Reads FLAME `generic_model.pkl` files without chumpy, through a restricted unpickler.

The official FLAME 2020/2023 files are Python-2 pickles whose `shapedirs` is a
`chumpy.ch.Ch` object (its pickled state dict holds the array under `x`) and whose
`J_regressor` is a scipy sparse matrix. chumpy does not import on numpy ≥ 1.24 or
Python 3.11, and unpickling arbitrary files can execute code, so `RestrictedUnpickler`
resolves only:

* chumpy classes, mapped to `ChumpyStandIn` (keeps the state, never runs chumpy code);
* the numpy reconstruction helpers, `ndarray` and `dtype`;
* scipy.sparse matrix classes, under both the old (`scipy.sparse.csc`) and new module names;
* `copyreg._reconstructor` (Python-2 object pickles), `_codecs.encode` limited to latin-1
  (how protocol 2 stores bytes)
  and a few side-effect-free builtins (`object`, `set`, `frozenset`, `bytearray`, `slice`,
  `complex`).

Anything else raises `ModelFileError`.
"""

from __future__ import annotations

import codecs
import copyreg
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from sdsjax.errors import ModelFileError

IDENTITY_COMPONENTS = 300  # shapedirs[..., :300] is identity, [..., 300:] expression

_NUMPY_MODULES = (
  "numpy",
  "numpy.core.multiarray",
  "numpy._core.multiarray",
  "numpy.core.numeric",
  "numpy._core.numeric",
)
_NUMPY_NAMES = ("_reconstruct", "scalar", "ndarray", "dtype", "_frombuffer")
_SPARSE_NAMES = ("csc_matrix", "csr_matrix", "coo_matrix")
# Constructors without side effects that pickled object states may use.
_SAFE_BUILTINS = {
  "object": object,
  "set": set,
  "frozenset": frozenset,
  "bytearray": bytearray,
  "slice": slice,
  "complex": complex,
}


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
  """`_codecs.encode` limited to latin-1, the only encoding pickle uses for bytes."""
  if codecs.lookup(encoding).name != "iso8859-1":
    raise ModelFileError(f"refusing to decode pickled bytes as {encoding!r}")
  return codecs.encode(text, "latin1")


class ChumpyStandIn:
  """Holds the pickled state of any chumpy object; `.x` is the array of a `Ch`."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs  # chumpy's constructor arguments are irrelevant: the state follows.
    return super().__new__(cls)

  def __setstate__(self, state: Any) -> None:
    if isinstance(state, tuple) and len(state) == 2:  # (dict, slot state)
      state = {**(state[0] or {}), **(state[1] or {})}
    self.__dict__.update(state if isinstance(state, dict) else {"x": state})


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that only builds numpy arrays, scipy sparse matrices and chumpy stand-ins."""

  def find_class(self, module: str, name: str) -> Any:
    if module == "chumpy" or module.startswith("chumpy."):
      return ChumpyStandIn
    if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
      # numpy 2 renamed numpy.core to numpy._core; the old name only warns.
      if module.startswith("numpy.core") and hasattr(np, "_core"):
        module = "numpy._core" + module[len("numpy.core") :]
      return super().find_class(module, name)
    if (module == "scipy.sparse" or module.startswith("scipy.sparse.")) and name in _SPARSE_NAMES:
      import scipy.sparse

      return getattr(scipy.sparse, name)
    if module in ("copyreg", "copy_reg") and name == "_reconstructor":
      return copyreg._reconstructor
    if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
      return _SAFE_BUILTINS[name]
    if module == "_codecs" and name == "encode":  # how protocol 2 writes Python 3 bytes
      return _encode_latin1
    raise ModelFileError(
      f"refusing to unpickle {module}.{name}: a FLAME file holds only numpy, scipy.sparse and "
      "chumpy objects; is this really a FLAME generic_model.pkl?"
    )


def as_array(value: Any, key: str, path: Path) -> np.ndarray:
  """Unwraps chumpy stand-ins and returns a float64 or integer ndarray."""
  if isinstance(value, ChumpyStandIn):
    value = value.__dict__.get("x")
  if hasattr(value, "toarray"):  # scipy sparse
    value = value.toarray()
  if not isinstance(value, np.ndarray):
    raise ModelFileError(
      f"{path}: '{key}' is {type(value).__name__}, not an array; is this a FLAME generic_model.pkl?"
    )
  return value


def read_pickle(path: Path) -> dict:
  """Returns the top-level dict of a FLAME pickle (values may be stand-ins or sparse)."""
  try:
    with open(path, "rb") as f:
      data = RestrictedUnpickler(f, encoding="latin1").load()
  except ModelFileError:
    raise
  except Exception as e:
    reason = " ".join(str(e).split())
    if isinstance(e, OSError):
      raise ModelFileError(f"{path}: cannot read the FLAME file ({reason})") from None
    raise ModelFileError(
      f"{path}: not a readable FLAME pickle ({type(e).__name__}: {reason})"
    ) from None
  if not isinstance(data, dict):
    raise ModelFileError(f"{path}: a FLAME pickle holds a dict, found {type(data).__name__}")
  return data


def read_flame(path: Path, num_components: int, num_expressions: int = 0) -> dict[str, np.ndarray]:
  """Reads the template, faces, identity and expression components of a FLAME pickle.

  Args:
    path: generic_model.pkl.
    num_components: N identity components to keep (≤ 300 and ≤ what the file has).
    num_expressions: E expression components to keep (`shapedirs[..., 300:300 + E]`).

  Returns:
    dict in the npz layout of docs/head_model.md: `mean` (V, 3), `basis` (N, V, 3) and
    `expression_basis` (E, V, 3) in metres per unit weight, `faces` (F, 3).
  """
  data = read_pickle(path)
  for key in ("v_template", "f", "shapedirs"):
    if key not in data:
      raise ModelFileError(f"{path}: missing '{key}'; is this a FLAME generic_model.pkl?")
  mean = as_array(data["v_template"], "v_template", path)
  faces = as_array(data["f"], "f", path)
  shapedirs = as_array(data["shapedirs"], "shapedirs", path)
  if shapedirs.ndim != 3 or shapedirs.shape[:2] != mean.shape:
    raise ModelFileError(
      f"{path}: shapedirs has shape {shapedirs.shape}, expected ({mean.shape[0]}, 3, components)"
    )
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
  return {
    "mean": mean,
    "basis": basis,
    "faces": faces,
    "expression_basis": expression,
    "expression_names": np.array([f"flame_expression_{k:03d}" for k in range(num_expressions)]),
  }


def read_uv(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads `vt` (T, 2) and `ft` (F, 3) from a FLAME_texture.npz-style file."""
  try:
    with np.load(path, allow_pickle=False) as data:
      if "vt" not in data or "ft" not in data:
        raise ModelFileError(f"{path}: a FLAME UV file needs arrays 'vt' and 'ft'")
      return np.asarray(data["vt"]), np.asarray(data["ft"])
  except (OSError, ValueError) as e:
    raise ModelFileError(f"{path}: cannot read the UV file ({e})") from None
