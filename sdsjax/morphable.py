"""Linear 3D morphable head models: `vertices = mean + Σ_k weights[k] · basis[k]`.

`load_model` reads three kinds of source (docs/head_model.md documents them):

* `"builtin"`: the analytic head shipped in `sdsjax/data/head_model.npz`
  (built by `scripts/build_head_model.py`), 50 named components;
* `"flame:/path/generic_model.pkl"` (or any path ending in `.pkl`): a FLAME 2020/2023
  model, read without chumpy (see `sdsjax.flame`). UVs come from `FLAME_texture.npz`
  beside the pickle, or from an explicit second path,
  `"flame:/path/generic_model.pkl::/path/uv.npz"`; without either, a spherical projection;
* `"/path/model.npz"`: arrays `mean`, `basis`, `faces`, `uvs`, `uv_faces`, `names`.

Every model is normalised to the world frame of docs/design.md: the bounding-box centre of
`mean` moves to the origin and `mean` and `basis` are scaled by the same factor so the
largest vertex norm is 1. Axes are kept as they are (FLAME and the builtin head are
already +y up, facing +z).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import zipfile
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sdsjax import flame
from sdsjax.errors import ModelFileError

Array = jax.Array

BUILTIN = "builtin"
FLAME_PREFIX = "flame:"
FLAME_UV_SEPARATOR = "::"
FLAME_UV_FILE = "FLAME_texture.npz"
UV_TOLERANCE = 1e-3    # uvs this far outside [0, 1] are clipped, further is an error


@struct.dataclass
class MorphableModel:
  """A linear morphable mesh in the world frame (+y up, facing +z, bounding radius 1).

  Attributes:
    mean: (V, 3) float32 mean vertices.
    basis: (K, V, 3) float32 components, scaled so weights ~ N(0, 1) are plausible heads.
    faces: (F, 3) int32 triangles, counter-clockwise seen from outside.
    uvs: (T, 2) float32 texture coordinates in [0, 1], v up (OBJ convention).
    uv_faces: (F, 3) int32 indices into `uvs` (separate from `faces` so seams can split).
    names: K component names ('' where unknown).
  """
  mean: Array
  basis: Array
  faces: Array
  uvs: Array
  uv_faces: Array
  names: tuple[str, ...] = struct.field(pytree_node=False)

  @property
  def num_components(self) -> int:
    return self.basis.shape[0]


def vertices(model: MorphableModel, weights: Array) -> Array:
  """Vertices of the model for one weight vector.

  Pure and differentiable; vmap it over weights (`jax.vmap(vertices, (None, 0))`).

  Args:
    model: the morphable model.
    weights: (K,) component weights.

  Returns:
    (V, 3) vertices, `mean + Σ_k weights[k] · basis[k]`.
  """
  chex.assert_rank(weights, 1)
  chex.assert_axis_dimension(weights, 0, model.basis.shape[0])
  # HIGHEST: accelerators may otherwise use bf16/TF32 passes, which blur small offsets.
  offsets = jnp.einsum("k,kvc->vc", weights.astype(model.basis.dtype), model.basis,
                       precision=jax.lax.Precision.HIGHEST)
  return model.mean + offsets


def load_model(spec: str, num_components: int = 50) -> MorphableModel:
  """Loads a morphable model and normalises it to the world frame.

  Args:
    spec: `"builtin"`, `"flame:/path/generic_model.pkl"` (optionally
      `"flame:/path/generic_model.pkl::/path/uv.npz"`) or `"/path/model.npz"`.
    num_components: K, the number of leading components to keep.

  Returns:
    The model, with `basis` of shape (num_components, V, 3).

  Raises:
    ModelFileError: the spec is unknown, a file is missing or malformed, or it has fewer
      than `num_components` components.
  """
  if isinstance(num_components, bool) or not isinstance(num_components, (int, np.integer)):
    raise ModelFileError(f"num_components must be an integer, got {num_components!r}")
  if num_components < 1:
    raise ModelFileError(f"num_components must be at least 1, got {num_components}")
  spec = str(spec).strip()
  if spec == BUILTIN:
    source = "builtin head model"
    arrays = dict(_read_builtin())
  elif spec.startswith(FLAME_PREFIX) or spec.endswith(".pkl"):
    return _load_flame(spec.removeprefix(FLAME_PREFIX), num_components)
  elif spec.endswith(".npz"):
    source = spec
    arrays = _read_npz(Path(spec).expanduser())
  else:
    raise ModelFileError(
        f"unknown head model {spec!r}: use 'builtin', 'flame:/path/generic_model.pkl' or a "
        ".npz file path")
  return _make_model(arrays, source, num_components)


# ----------------------------------------------------------------------------------------
# Sources.

@functools.lru_cache(maxsize=1)
def _read_builtin() -> tuple[tuple[str, np.ndarray], ...]:
  try:
    resource = importlib.resources.files("sdsjax") / "data" / "head_model.npz"
  except (NotADirectoryError, TypeError):
    # A stale editable install can make `sdsjax` a namespace package without a resource
    # reader; the file sits beside this module either way.
    resource = Path(__file__).resolve().parent / "data" / "head_model.npz"
  with importlib.resources.as_file(resource) as path:
    if not path.is_file():
      raise ModelFileError(f"the builtin head model is missing ({path}); run "
                           "'python scripts/build_head_model.py' or reinstall sdsjax")
    return tuple(_read_npz(path).items())


def _read_npz(path: Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise ModelFileError(f"head model file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: np.asarray(data[key]) for key in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    reason = " ".join(str(e).split())
    raise ModelFileError(f"{path}: not a readable .npz head model ({reason})") from None


def _load_flame(spec: str, num_components: int) -> MorphableModel:
  pkl, _, uv_spec = spec.partition(FLAME_UV_SEPARATOR)
  path = Path(pkl).expanduser()
  if not path.is_file():
    raise ModelFileError(f"FLAME model file not found: {path} (download generic_model.pkl "
                         "from flame.is.tue.mpg.de)")
  if num_components > flame.IDENTITY_COMPONENTS:
    raise ModelFileError(f"FLAME has {flame.IDENTITY_COMPONENTS} identity components, "
                         f"asked for {num_components}; lower num_components")
  arrays = flame.read_flame(path, num_components)
  uv_path = Path(uv_spec).expanduser() if uv_spec else path.with_name(FLAME_UV_FILE)
  if uv_spec and not uv_path.is_file():
    raise ModelFileError(f"FLAME UV file not found: {uv_path}")
  if uv_path.is_file():
    arrays["uvs"], arrays["uv_faces"] = flame.read_uv(uv_path)
  arrays["names"] = np.array([f"flame_shape_{k:03d}" for k in range(num_components)])
  return _make_model(arrays, str(path), num_components)


# ----------------------------------------------------------------------------------------
# Validation and normalisation (host-side numpy, so errors are one clear line).

def _check_array(arrays, key, source, rank, last, kind):
  if key not in arrays:
    raise ModelFileError(f"{source}: missing array '{key}'")
  a = np.asarray(arrays[key])
  if a.ndim != rank or (last is not None and a.shape[-1] != last):
    want = f"rank {rank}" + (f" with last dimension {last}" if last is not None else "")
    raise ModelFileError(f"{source}: '{key}' has shape {a.shape}, expected {want}")
  if kind == "float":
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
      raise ModelFileError(f"{source}: '{key}' has dtype {a.dtype}, expected floats")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
      raise ModelFileError(f"{source}: '{key}' contains NaN or infinite values")
  else:
    if not np.issubdtype(a.dtype, np.integer):
      raise ModelFileError(f"{source}: '{key}' has dtype {a.dtype}, expected integers")
    a = a.astype(np.int64)
  return a


def _check_indices(index, count, key, target, source):
  if index.size and (index.min() < 0 or index.max() >= count):
    raise ModelFileError(f"{source}: '{key}' indices span [{index.min()}, {index.max()}] but "
                         f"there are {count} {target}")


def spherical_uvs(mean: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Fallback UVs: longitude/latitude around the vertical axis, seam at the back.

  u = 0.5 + atan2(x, z) / 2π (the face, +z, at u = 0.5), v = 0.5 + asin(y / |p|) / π.
  Corners of faces that straddle the seam get extra uvs snapped to u = 1, so T ≥ V.

  Args:
    mean: (V, 3) centred vertices.
    faces: (F, 3) triangles.

  Returns:
    uvs (T, 2) and uv_faces (F, 3).
  """
  radius = np.maximum(np.linalg.norm(mean, axis=-1), 1e-12)
  u = 0.5 + np.arctan2(mean[:, 0], mean[:, 2]) / (2 * math.pi)
  v = 0.5 + np.arcsin(np.clip(mean[:, 1] / radius, -1, 1)) / math.pi
  uvs = np.stack([u, v], -1)
  uv_faces = faces.copy()
  corner_u = u[faces]
  seam = (corner_u.max(1) - corner_u.min(1)) > 0.5
  fix = seam[:, None] & (corner_u < 0.5)
  extra = np.stack([np.ones(fix.sum()), v[faces[fix]]], -1)
  uv_faces[fix] = len(uvs) + np.arange(fix.sum())
  return np.concatenate([uvs, extra], 0), uv_faces


def _make_model(arrays: dict, source: str, num_components: int) -> MorphableModel:
  mean = _check_array(arrays, "mean", source, 2, 3, "float")
  basis = _check_array(arrays, "basis", source, 3, 3, "float")
  faces = _check_array(arrays, "faces", source, 2, 3, "int")
  num_vertices = mean.shape[0]
  if num_vertices < 3 or faces.shape[0] < 1:
    raise ModelFileError(f"{source}: needs at least 3 vertices and 1 face, found "
                         f"{num_vertices} and {faces.shape[0]}")
  if basis.shape[1] != num_vertices:
    raise ModelFileError(f"{source}: 'basis' has shape {basis.shape} but 'mean' has "
                         f"{num_vertices} vertices; expected (K, {num_vertices}, 3)")
  if basis.shape[0] < num_components:
    raise ModelFileError(f"{source}: asked for {num_components} components but the file has "
                         f"{basis.shape[0]}; lower num_components")
  _check_indices(faces, num_vertices, "faces", "vertices", source)
  names = _names(arrays.get("names"), basis.shape[0], num_components, source)
  basis = basis[:num_components]

  centre = 0.5 * (mean.min(0) + mean.max(0))
  mean = mean - centre
  extent = np.linalg.norm(mean, axis=-1).max()
  if not extent > 0:
    raise ModelFileError(f"{source}: all vertices of 'mean' coincide")
  mean, basis = mean / extent, basis / extent

  if "uvs" in arrays or "uv_faces" in arrays:
    uvs = _check_array(arrays, "uvs", source, 2, 2, "float")
    uv_faces = _check_array(arrays, "uv_faces", source, 2, 3, "int")
    if uv_faces.shape != faces.shape:
      raise ModelFileError(f"{source}: 'uv_faces' has shape {uv_faces.shape} but 'faces' has "
                           f"{faces.shape}; there must be one uv triangle per face")
    _check_indices(uv_faces, uvs.shape[0], "uv_faces", "uvs", source)
    if uvs.size and (uvs.min() < -UV_TOLERANCE or uvs.max() > 1 + UV_TOLERANCE):
      raise ModelFileError(f"{source}: 'uvs' span [{uvs.min():.3g}, {uvs.max():.3g}], expected "
                           "texture coordinates in [0, 1]")
    uvs = np.clip(uvs, 0.0, 1.0)
  else:
    uvs, uv_faces = spherical_uvs(mean, faces)

  model = MorphableModel(
      mean=jnp.asarray(mean, jnp.float32), basis=jnp.asarray(basis, jnp.float32),
      faces=jnp.asarray(faces, jnp.int32), uvs=jnp.asarray(uvs, jnp.float32),
      uv_faces=jnp.asarray(uv_faces, jnp.int32), names=names)
  chex.assert_shape(model.basis, (num_components, num_vertices, 3))
  return model


def _names(names, available: int, num_components: int, source: str) -> tuple[str, ...]:
  if names is None:
    return ("",) * num_components
  names = np.asarray(names)
  if names.ndim != 1 or names.dtype.kind not in "US":
    raise ModelFileError(f"{source}: 'names' must be a 1-D array of strings, got "
                         f"{names.dtype} with shape {names.shape}")
  if names.shape[0] != available:
    raise ModelFileError(f"{source}: 'names' has {names.shape[0]} entries for {available} "
                         "components")
  names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
  return tuple(names[:num_components])
