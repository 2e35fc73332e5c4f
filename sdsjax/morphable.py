"""Linear 3D morphable head models: `vertices = mean + Σ_k weights[k] · basis[k]`.

`load_model` reads three kinds of source (docs/head_model.md documents them):

* `"builtin"`: the analytic head shipped in `sdsjax/data/head_model.npz`
  (built by `scripts/build_head_model.py`), 50 named components;
* `"flame:/path/generic_model.pkl"` (or any path ending in `.pkl`): a FLAME 2020/2023
  model, read without chumpy (see `sdsjax.flame`). UVs come from `FLAME_texture.npz`
  beside the pickle, or from an explicit second path,
  `"flame:/path/generic_model.pkl::/path/uv.npz"`; without either, a spherical projection;
* `"ict:/path/FaceXModel"`: an ICT-FaceKit folder of OBJ files (see `sdsjax.ict`);
* `"/path/model.npz"`: arrays `mean`, `basis`, `faces`, `uvs`, `uv_faces`, `names`, and
  optionally `expression_basis`/`expression_names`, a skeleton and named parts.

Every model is normalised to the world frame of docs/design.md: the bounding-box centre of
`mean` moves to the origin and `mean` and `basis` are scaled by the same factor so the
largest vertex norm is 1. Axes are kept as they are (FLAME and the builtin head are
already +y up, facing +z).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sdsjax import bounded_npz
from sdsjax import flame
from sdsjax.errors import ModelFileError

Array = jax.Array

BUILTIN = "builtin"
FLAME_PREFIX = "flame:"
ICT_PREFIX = "ict:"
FLAME_UV_SEPARATOR = "::"
FLAME_UV_FILE = "FLAME_texture.npz"
UV_TOLERANCE = 1e-3  # uvs this far outside [0, 1] are clipped, further is an error


@struct.dataclass
class Skeleton:
  """Linear blend skinning with pose correctives (FLAME's pose model), in the world frame.

  Rest joints are regressed from the shaped (identity + expression) vertices. A pose is one
  axis-angle rotation per joint, relative to its parent. The pose correctives use the
  "lrotmin" features: (R_j − I) flattened for the non-root joints, 9·(J − 1) values.

  Attributes:
    joint_regressor: (J, V) rest joints = joint_regressor @ shaped vertices.
    skin_weights: (V, J) linear blend skinning weights (rows sum to 1).
    pose_basis: (9·(J − 1), V, 3) vertex offsets per pose feature.
    parents: J parent indices, −1 for the root (static).
    joint_names: J names, e.g. ("global", "neck", "jaw", "eye_left", "eye_right") (static).
  """

  joint_regressor: Array
  skin_weights: Array
  pose_basis: Array
  parents: tuple[int, ...] = struct.field(pytree_node=False)
  joint_names: tuple[str, ...] = struct.field(pytree_node=False)

  @property
  def num_joints(self) -> int:
    return len(self.parents)


@struct.dataclass
class MorphableModel:
  """A linear morphable mesh in the world frame (+y up, facing +z, bounding radius 1).

  `vertices = mean + Σ_k w_k · basis[k] + Σ_e x_e · expression_basis[e]`, then, for models
  with a `skeleton`, posed by linear blend skinning.

  Attributes:
    mean: (V, 3) float32 mean vertices.
    basis: (K, V, 3) float32 identity components, scaled so weights ~ N(0, 1) are plausible.
    faces: (F, 3) int32 triangles, counter-clockwise seen from outside.
    uvs: (T, 2) float32 texture coordinates in [0, 1], v up (OBJ convention).
    uv_faces: (F, 3) int32 indices into `uvs` (separate from `faces` so seams can split).
    expression_basis: (E, V, 3) float32 expression components (E = 0: none), scaled like
      `basis` so that expression weights ~ N(0, 1) are plausible.
    names: K identity component names ('' where unknown).
    expression_names: E expression component names.
    skeleton: the pose model, or None (no joints to pose).
    parts: named face ranges (name, first face, end face), e.g. the head and two eyeballs;
      they cover `faces` in order.
    expression_range: (lo, hi) bounds of the expression weights where the source defines
      them (ICT-FaceKit's ARKit blendshapes: [0, 1]); None for N(0, 1) weights.
    source: where the model came from: "builtin", "flame", "ict" or "npz".
    source_scale: source units per world unit (the normalisation's inverse scale).
    source_offset: (3,) source-frame position of the world origin.
  """

  mean: Array
  basis: Array
  faces: Array
  uvs: Array
  uv_faces: Array
  expression_basis: Array
  names: tuple[str, ...] = struct.field(pytree_node=False)
  expression_names: tuple[str, ...] = struct.field(pytree_node=False, default=())
  skeleton: Skeleton | None = None
  parts: tuple[tuple[str, int, int], ...] = struct.field(pytree_node=False, default=())
  expression_range: tuple[float, float] | None = struct.field(pytree_node=False, default=None)
  source: str = struct.field(pytree_node=False, default="npz")
  source_scale: float = struct.field(pytree_node=False, default=1.0)
  source_offset: tuple[float, float, float] = struct.field(
    pytree_node=False, default=(0.0, 0.0, 0.0)
  )

  @property
  def num_components(self) -> int:
    return self.basis.shape[0]

  @property
  def num_expressions(self) -> int:
    return self.expression_basis.shape[0]

  @property
  def num_joints(self) -> int:
    return 0 if self.skeleton is None else self.skeleton.num_joints

  def to_source_units(self, verts) -> np.ndarray:
    """(V, 3) world-frame vertices -> the source's own units and frame (numpy)."""
    return np.asarray(verts, np.float64) * self.source_scale + np.asarray(self.source_offset)


def _offsets(weights: Array, basis: Array) -> Array:
  # HIGHEST: accelerators may otherwise use bf16/TF32 passes, which blur small offsets.
  return jnp.einsum(
    "k,kvc->vc", weights.astype(basis.dtype), basis, precision=jax.lax.Precision.HIGHEST
  )


def face_target(mean_vertices: np.ndarray) -> tuple[float, float, float]:
  """What face close-ups look at: 0.3 (of the bounding radius) behind the nose tip, the
  frontmost of the (V, 3) mean vertices near the mirror plane (every source faces +z and is
  symmetric in x)."""
  mean = np.asarray(mean_vertices, np.float64)
  width = float(np.ptp(mean[:, 0])) or 1.0
  midline = mean[np.abs(mean[:, 0]) <= 0.05 * width]
  if len(midline) == 0:
    midline = mean
  tip = midline[np.argmax(midline[:, 2])]
  return (0.0, float(tip[1]), float(tip[2] - 0.3))


def vertices(
  model: MorphableModel, weights: Array, expression: Array | None = None, pose: Array | None = None
) -> Array:
  """Vertices of the model for one set of parameters.

  Pure and differentiable; vmap it over weights (`jax.vmap(vertices, (None, 0))`).

  Args:
    model: the morphable model.
    weights: (K,) identity weights.
    expression: (E,) expression weights, or None for the neutral expression.
    pose: (J, 3) axis-angle joint rotations (models with a skeleton), or None for the rest
      pose.

  Returns:
    (V, 3) vertices.
  """
  chex.assert_rank(weights, 1)
  chex.assert_axis_dimension(weights, 0, model.basis.shape[0])
  shaped = model.mean + _offsets(weights, model.basis)
  if expression is not None and model.num_expressions:
    chex.assert_shape(expression, (model.num_expressions,))
    shaped = shaped + _offsets(expression, model.expression_basis)
  if pose is None or model.skeleton is None:
    return shaped
  chex.assert_shape(pose, (model.num_joints, 3))
  return pose_vertices(model.skeleton, shaped, pose)


def vertices_from_params(model: MorphableModel, params: dict) -> Array:
  """`vertices` from a parameter dict with "weights" and optional "expression" and "pose"."""
  return vertices(model, params["weights"], params.get("expression"), params.get("pose"))


def axis_angle_to_matrix(axis_angle: Array) -> Array:
  """Rodrigues' formula, (..., 3) -> (..., 3, 3); smooth (and exact to first order) at 0."""
  r = axis_angle
  angle2 = jnp.sum(r * r, axis=-1)[..., None, None]
  angle = jnp.sqrt(angle2 + 1e-16)
  zero = jnp.zeros_like(r[..., 0])
  skew = jnp.stack(
    [zero, -r[..., 2], r[..., 1], r[..., 2], zero, -r[..., 0], -r[..., 1], r[..., 0], zero], -1
  ).reshape((*r.shape[:-1], 3, 3))
  # sin(θ)/θ and (1 − cos θ)/θ² multiply the unnormalised skew matrix, so θ → 0 is smooth.
  a = jnp.sin(angle) / angle
  b = (1.0 - jnp.cos(angle)) / (angle2 + 1e-16)
  b = jnp.where(angle2 < 1e-12, 0.5, b)
  eye = jnp.eye(3, dtype=r.dtype)
  return eye + a * skew + b * (skew @ skew)


def pose_vertices(skeleton: Skeleton, shaped: Array, pose: Array) -> Array:
  """Poses shaped vertices: pose correctives, then linear blend skinning.

  Args:
    skeleton: the pose model.
    shaped: (V, 3) vertices with identity and expression applied (rest pose).
    pose: (J, 3) axis-angle rotations, each relative to the joint's parent.

  Returns:
    (V, 3) posed vertices. A zero pose returns `shaped` (up to rounding).
  """
  hi = jax.lax.Precision.HIGHEST
  joints = jnp.einsum("jv,vc->jc", skeleton.joint_regressor, shaped, precision=hi)
  rotations = axis_angle_to_matrix(pose)  # (J, 3, 3)
  features = (rotations[1:] - jnp.eye(3, dtype=pose.dtype)).reshape(-1)
  posed = shaped + jnp.einsum("p,pvc->vc", features, skeleton.pose_basis, precision=hi)
  # Forward kinematics over the (static, tiny) joint tree.
  world_rot, world_pos = [], []
  for j, parent in enumerate(skeleton.parents):
    if parent < 0:
      world_rot.append(rotations[j])
      world_pos.append(joints[j])
    else:
      world_rot.append(world_rot[parent] @ rotations[j])
      world_pos.append(world_pos[parent] + world_rot[parent] @ (joints[j] - joints[parent]))
  rot = jnp.stack(world_rot)  # (J, 3, 3)
  # Each joint's transform maps rest positions to posed ones: x -> R (x − j_rest) + j_posed.
  trans = jnp.stack(world_pos) - jnp.einsum("jab,jb->ja", rot, joints, precision=hi)
  blend_rot = jnp.einsum("vj,jab->vab", skeleton.skin_weights, rot, precision=hi)
  blend_trans = jnp.einsum("vj,ja->va", skeleton.skin_weights, trans, precision=hi)
  return jnp.einsum("vab,vb->va", blend_rot, posed, precision=hi) + blend_trans


def load_model(spec: str, num_components: int = 50, num_expressions: int = 0) -> MorphableModel:
  """Loads a morphable model and normalises it to the world frame.

  Args:
    spec: `"builtin"`, `"flame:/path/generic_model.pkl"` (optionally
      `"flame:/path/generic_model.pkl::/path/uv.npz"`), `"ict:/path/FaceXModel"` or
      `"/path/model.npz"`.
    num_components: K, the number of leading identity components to keep.
    num_expressions: E, the number of leading expression components to keep (0: none).

  Returns:
    The model, with `basis` (K, V, 3) and `expression_basis` (E, V, 3).

  Raises:
    ModelFileError: the spec is unknown, a file is missing or malformed, or it has fewer
      than `num_components` identity or `num_expressions` expression components.
  """
  for name, value, least in (
    ("num_components", num_components, 1),
    ("num_expressions", num_expressions, 0),
  ):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ModelFileError(f"{name} must be an integer, got {value!r}")
    if value < least:
      raise ModelFileError(f"{name} must be at least {least}, got {value}")
  spec = str(spec).strip()
  if spec == BUILTIN:
    source, kind = "builtin head model", "builtin"
    arrays = dict(_read_builtin())
  elif spec.startswith(FLAME_PREFIX) or spec.endswith(".pkl"):
    source, kind = spec.removeprefix(FLAME_PREFIX).partition(FLAME_UV_SEPARATOR)[0], "flame"
    arrays = _read_flame(spec.removeprefix(FLAME_PREFIX), num_components, num_expressions)
  elif spec.startswith(ICT_PREFIX):
    from sdsjax import ict

    source, kind = spec.removeprefix(ICT_PREFIX), "ict"
    arrays = ict.read_ict(Path(source).expanduser())
  elif spec.endswith(".npz"):
    source, kind = spec, "npz"
    arrays = _read_npz(Path(spec).expanduser())
  else:
    raise ModelFileError(
      f"unknown head model {spec!r}: use 'builtin', 'flame:/path/generic_model.pkl', "
      "'ict:/path/FaceXModel' or a .npz file path"
    )
  return make_model(arrays, source, num_components, num_expressions, kind)


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
      raise ModelFileError(
        f"the builtin head model is missing ({path}); run "
        "'python scripts/build_head_model.py' or reinstall sdsjax"
      )
    return tuple(_read_npz(path).items())


def _read_npz(path: Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise ModelFileError(f"head model file not found: {path}")
  # Bounded: every member's declared shape is checked before anything is allocated.
  return bounded_npz.read_npz(path)


def _read_flame(spec: str, num_components: int, num_expressions: int) -> dict:
  pkl, _, uv_spec = spec.partition(FLAME_UV_SEPARATOR)
  path = Path(pkl).expanduser()
  if not path.is_file():
    raise ModelFileError(
      f"FLAME model file not found: {path} (download generic_model.pkl from flame.is.tue.mpg.de)"
    )
  if num_components > flame.IDENTITY_COMPONENTS:
    raise ModelFileError(
      f"FLAME has {flame.IDENTITY_COMPONENTS} identity components, "
      f"asked for {num_components}; lower num_components"
    )
  arrays = flame.read_flame(path, num_components, num_expressions)
  uv_path = Path(uv_spec).expanduser() if uv_spec else path.with_name(FLAME_UV_FILE)
  if uv_spec and not uv_path.is_file():
    raise ModelFileError(f"FLAME UV file not found: {uv_path}")
  if uv_path.is_file():
    arrays["uvs"], arrays["uv_faces"] = flame.read_uv(uv_path)
  arrays["names"] = np.array([f"flame_shape_{k:03d}" for k in range(num_components)])
  return arrays


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
    raise ModelFileError(
      f"{source}: '{key}' indices span [{index.min()}, {index.max()}] but "
      f"there are {count} {target}"
    )


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


def make_model(
  arrays: dict,
  source: str,
  num_components: int,
  num_expressions: int = 0,
  kind: str = "npz",
) -> MorphableModel:
  """Checks arrays in the npz layout (docs/head_model.md) and builds the normalised model.

  Every loader (builtin, FLAME, ICT-FaceKit, npz) ends here, so every source gets the same
  checks and the same normalisation. Errors are one-line `ModelFileError`s naming `source`.
  """
  mean = _check_array(arrays, "mean", source, 2, 3, "float")
  basis = _check_array(arrays, "basis", source, 3, 3, "float")
  faces = _check_array(arrays, "faces", source, 2, 3, "int")
  num_vertices = mean.shape[0]
  if num_vertices < 3 or faces.shape[0] < 1:
    raise ModelFileError(
      f"{source}: needs at least 3 vertices and 1 face, found {num_vertices} and {faces.shape[0]}"
    )
  if basis.shape[1] != num_vertices:
    raise ModelFileError(
      f"{source}: 'basis' has shape {basis.shape} but 'mean' has "
      f"{num_vertices} vertices; expected (K, {num_vertices}, 3)"
    )
  if basis.shape[0] < num_components:
    raise ModelFileError(
      f"{source}: asked for {num_components} components but the file has "
      f"{basis.shape[0]}; lower num_components"
    )
  _check_indices(faces, num_vertices, "faces", "vertices", source)
  names = _names(arrays.get("names"), basis.shape[0], num_components, source, "names")
  basis = basis[:num_components]

  if "expression_basis" in arrays:
    expression = _check_array(arrays, "expression_basis", source, 3, 3, "float")
    if expression.shape[1] != num_vertices:
      raise ModelFileError(
        f"{source}: 'expression_basis' has shape {expression.shape} but 'mean' has "
        f"{num_vertices} vertices; expected (E, {num_vertices}, 3)"
      )
  else:
    expression = np.zeros((0, num_vertices, 3))
  if expression.shape[0] < num_expressions:
    raise ModelFileError(
      f"{source}: asked for {num_expressions} expression components but the model has "
      f"{expression.shape[0]}; lower num_expressions"
    )
  expression_names = _names(
    arrays.get("expression_names"),
    expression.shape[0],
    num_expressions,
    source,
    "expression_names",
  )
  expression = expression[:num_expressions]

  centre = 0.5 * (mean.min(0) + mean.max(0))
  mean = mean - centre
  extent = np.linalg.norm(mean, axis=-1).max()
  if not extent > 0:
    raise ModelFileError(f"{source}: all vertices of 'mean' coincide")
  mean, basis, expression = mean / extent, basis / extent, expression / extent

  if "uvs" in arrays or "uv_faces" in arrays:
    uvs = _check_array(arrays, "uvs", source, 2, 2, "float")
    uv_faces = _check_array(arrays, "uv_faces", source, 2, 3, "int")
    if uv_faces.shape != faces.shape:
      raise ModelFileError(
        f"{source}: 'uv_faces' has shape {uv_faces.shape} but 'faces' has "
        f"{faces.shape}; there must be one uv triangle per face"
      )
    _check_indices(uv_faces, uvs.shape[0], "uv_faces", "uvs", source)
    if uvs.size and (uvs.min() < -UV_TOLERANCE or uvs.max() > 1 + UV_TOLERANCE):
      raise ModelFileError(
        f"{source}: 'uvs' span [{uvs.min():.3g}, {uvs.max():.3g}], expected "
        "texture coordinates in [0, 1]"
      )
    uvs = np.clip(uvs, 0.0, 1.0)
  else:
    uvs, uv_faces = spherical_uvs(mean, faces)

  model = MorphableModel(
    mean=jnp.asarray(mean, jnp.float32),
    basis=jnp.asarray(basis, jnp.float32),
    faces=jnp.asarray(faces, jnp.int32),
    uvs=jnp.asarray(uvs, jnp.float32),
    uv_faces=jnp.asarray(uv_faces, jnp.int32),
    expression_basis=jnp.asarray(expression, jnp.float32),
    names=names,
    expression_names=expression_names,
    skeleton=_skeleton(arrays, source, num_vertices, extent),
    parts=_parts(arrays, source, faces.shape[0]),
    expression_range=_expression_range(arrays, source),
    source=kind,
    source_scale=float(extent),
    source_offset=tuple(float(c) for c in centre),
  )
  chex.assert_shape(model.basis, (num_components, num_vertices, 3))
  return model


SKELETON_KEYS = ("joint_regressor", "skin_weights", "pose_basis", "parents", "joint_names")


def _skeleton(arrays: dict, source: str, num_vertices: int, extent: float) -> Skeleton | None:
  present = [k for k in SKELETON_KEYS if k in arrays]
  if not present:
    return None
  if len(present) != len(SKELETON_KEYS):
    missing = sorted(set(SKELETON_KEYS) - set(present))
    raise ModelFileError(
      f"{source}: a skeleton needs {', '.join(SKELETON_KEYS)}; missing {missing}"
    )
  regressor = _check_array(arrays, "joint_regressor", source, 2, num_vertices, "float")
  num_joints = regressor.shape[0]
  weights = _check_array(arrays, "skin_weights", source, 2, num_joints, "float")
  pose_basis = _check_array(arrays, "pose_basis", source, 3, 3, "float")
  parents = _check_array(arrays, "parents", source, 1, None, "int")
  if not 1 <= num_joints <= 64:
    raise ModelFileError(f"{source}: 'joint_regressor' has {num_joints} joints, expected 1-64")
  if weights.shape[0] != num_vertices:
    raise ModelFileError(
      f"{source}: 'skin_weights' has shape {weights.shape}, expected ({num_vertices}, {num_joints})"
    )
  if pose_basis.shape[:2] != (9 * (num_joints - 1), num_vertices):
    raise ModelFileError(
      f"{source}: 'pose_basis' has shape {pose_basis.shape}, expected "
      f"({9 * (num_joints - 1)}, {num_vertices}, 3)"
    )
  if parents.shape != (num_joints,) or parents[0] != -1:
    raise ModelFileError(
      f"{source}: 'parents' must list {num_joints} parent indices with -1 for the root first"
    )
  if np.any(parents[1:] < 0) or np.any(parents[1:] >= np.arange(1, num_joints)):
    raise ModelFileError(f"{source}: 'parents' must point to earlier joints (a tree in order)")
  joint_names = _names(arrays["joint_names"], num_joints, num_joints, source, "joint_names")
  return Skeleton(
    joint_regressor=jnp.asarray(regressor, jnp.float32),
    skin_weights=jnp.asarray(weights, jnp.float32),
    pose_basis=jnp.asarray(pose_basis / extent, jnp.float32),
    parents=tuple(int(p) for p in parents),
    joint_names=joint_names,
  )


def _expression_range(arrays: dict, source: str) -> tuple[float, float] | None:
  if "expression_range" not in arrays:
    return None
  bounds = _check_array(arrays, "expression_range", source, 1, 2, "float")
  if not bounds[0] < bounds[1]:
    raise ModelFileError(f"{source}: 'expression_range' must be [low, high] with low < high")
  return (float(bounds[0]), float(bounds[1]))


def _parts(arrays: dict, source: str, num_faces: int) -> tuple[tuple[str, int, int], ...]:
  if "part_names" not in arrays and "part_ranges" not in arrays:
    return (("head", 0, num_faces),)
  ranges = _check_array(arrays, "part_ranges", source, 2, 2, "int")
  names = _names(arrays.get("part_names"), ranges.shape[0], ranges.shape[0], source, "part_names")
  ends = np.concatenate([[0], ranges[:, 1]])
  if ranges.shape[0] < 1 or np.any(ranges[:, 0] != ends[:-1]) or ends[-1] != num_faces:
    raise ModelFileError(
      f"{source}: 'part_ranges' must split the {num_faces} faces into consecutive ranges"
    )
  if np.any(ranges[:, 1] <= ranges[:, 0]):
    raise ModelFileError(f"{source}: 'part_ranges' has an empty part")
  return tuple((n, int(a), int(b)) for n, (a, b) in zip(names, ranges))


def _names(names, available: int, keep: int, source: str, key: str) -> tuple[str, ...]:
  if names is None:
    return ("",) * keep
  names = np.asarray(names)
  if names.size == 0 and available == 0:
    return ()
  if names.ndim != 1 or names.dtype.kind not in "US":
    raise ModelFileError(
      f"{source}: '{key}' must be a 1-D array of strings, got "
      f"{names.dtype} with shape {names.shape}"
    )
  if names.shape[0] != available:
    raise ModelFileError(
      f"{source}: '{key}' has {names.shape[0]} entries for {available} components"
    )
  names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
  return tuple(names[:keep])
