"""ICT-FaceKit ("ICT Face Model Light") reader: a folder of OBJ files -> npz-layout arrays.

The folder (`FaceXModel/` of github.com/ICT-VGL/ICT-FaceKit, MIT) holds full meshes with one
topology: `generic_neutral_mesh.obj`, the identity modes `identity000.obj` … `identity099.obj`
and the expression shapes named in `vertex_indices.json` ("expressions", 53 ARKit-style names;
`EXPRESSION_NAMES` when that file is absent). A component is `shape − neutral`:

* identity modes are PCA modes at one standard deviation (ICT-FaceKit's own sampler draws
  their weights from N(0, 1)), so `IDENTITY_SCALE = 1`;
* expressions are ARKit-style blendshapes, weight 0 neutral and 1 the full expression, so
  `EXPRESSION_SCALE = 1`: weights in [0, 1] are plausible, negative ones extrapolate.

Kept geometry (`DROPPED_MATERIALS` says what is left out, docs/head_model.md why): the face,
the back of the head and neck with the mouth and eye sockets (one surface, open only at the
neck), and the two scleras (the eyeball shells with the corneal bulge). Left out: the
see-through layers (lacrimal fluid, eye blend, eye occlusion, eyelash cards), and the irises,
teeth, gums and tongue, which opaque renders of a closed mouth never show. `read_ict(folder,
drop=SEE_THROUGH_MATERIALS)` keeps those. Unreferenced vertices are dropped. Polygons are
fan-triangulated, keeping the OBJ's counter-clockwise winding. Each kept material becomes one
part (consecutive faces) named from its material (`M_BackHead` -> `back_head`).

UVs: ICT-FaceKit puts each material in its own texture (UDIM-style tiles u ∈ [0, 7), the eyes
reusing tile 0). When any uv lies outside [0, 1], each material's tile is packed into one
square atlas (`atlas_slots`: the first material, the face, gets a 0.75 × 0.75 block, the
others 0.25 × 0.25 cells); uvs already in [0, 1] are kept as they are.

Parsing ~150 OBJs takes a while, so the result is cached as one `.npz`
(`CACHE_FILE` beside the OBJs, or under `$SDSJAX_CACHE` when the folder is not writable), keyed
by the names, sizes and modification times of the files read. The cache is written atomically
and ignored whenever it cannot be read or its key does not match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from sdsjax import bounded_npz
from sdsjax.errors import ModelFileError
from sdsjax.models.tiny_random import cache_root

log = logging.getLogger(__name__)
# ARKit blendshapes are weights in [0, 1] (0 neutral, 1 the full expression), not N(0, 1):
# a fit keeps them in this box (sdsjax.morphable.MorphableModel.expression_range).
EXPRESSION_RANGE = np.array([0.0, 1.0])

NEUTRAL_FILE = "generic_neutral_mesh.obj"
CONFIG_FILE = "vertex_indices.json"
IDENTITY_FILE = re.compile(r"identity(\d+)\.obj")
CACHE_FILE = ".sdsjax_ict_cache.npz"
CACHE_VERSION = 1  # bump when the arrays read_ict returns change meaning
IDENTITY_SCALE = 1.0
EXPRESSION_SCALE = 1.0
# Not kept by default (docs/head_model.md, "ICT-FaceKit"): see-through layers that an opaque
# render would show as grey films over the eyes, and geometry hidden in opaque renders of a
# closed mouth (the irises sit inside the scleras' corneal bulge) whose dense, tiny triangles
# overflow the rasterizer's tiles at the fit's resolutions and punch holes in lips and eyes.
SEE_THROUGH_MATERIALS = frozenset(
  {"M_LacrimalFluid", "M_EyeBlend", "M_EyeOcclusion", "M_EyeLashes"}
)
HIDDEN_MATERIALS = frozenset({"M_IrisLeft", "M_IrisRight", "M_Teeth", "M_GumsTongue"})
DROPPED_MATERIALS = SEE_THROUGH_MATERIALS | HIDDEN_MATERIALS
MAX_OBJ_BYTES = 256 << 20  # ICT-FaceKit's OBJs are about 2.6 MB each
UV_TOLERANCE = 1e-3  # as sdsjax.morphable: uvs this close to [0, 1] count as inside
ATLAS_MARGIN = 1 / 128  # of a slot's side, so bilinear lookups do not bleed between slots

# ICT-FaceKit's "expressions" list (vertex_indices.json), in its order. The folder also holds
# cheekRaiser_L/R and PupilDilate_L/R, which that list leaves out.
EXPRESSION_NAMES = (
  "browDown_L", "browDown_R", "browInnerUp_L", "browInnerUp_R", "browOuterUp_L",
  "browOuterUp_R", "cheekPuff_L", "cheekPuff_R", "cheekSquint_L", "cheekSquint_R",
  "eyeBlink_L", "eyeBlink_R", "eyeLookDown_L", "eyeLookDown_R", "eyeLookIn_L", "eyeLookIn_R",
  "eyeLookOut_L", "eyeLookOut_R", "eyeLookUp_L", "eyeLookUp_R", "eyeSquint_L", "eyeSquint_R",
  "eyeWide_L", "eyeWide_R", "jawForward", "jawLeft", "jawOpen", "jawRight", "mouthClose",
  "mouthDimple_L", "mouthDimple_R", "mouthFrown_L", "mouthFrown_R", "mouthFunnel", "mouthLeft",
  "mouthLowerDown_L", "mouthLowerDown_R", "mouthPress_L", "mouthPress_R", "mouthPucker",
  "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
  "mouthSmile_L", "mouthSmile_R", "mouthStretch_L", "mouthStretch_R", "mouthUpperUp_L",
  "mouthUpperUp_R", "noseSneer_L", "noseSneer_R",
)  # fmt: skip
SHAPE_NAME = re.compile(r"[A-Za-z0-9_]+")
ARRAY_KEYS = (
  "mean", "basis", "faces", "uvs", "uv_faces", "names", "expression_basis",
  "expression_names", "part_names", "part_ranges",
)  # fmt: skip


# ----------------------------------------------------------------------------------------
# OBJ files.


@dataclasses.dataclass(frozen=True)
class ObjMesh:
  """A polygon mesh read from an OBJ file, with 0-based indices.

  Attributes:
    vertices: (V, 3) float64 positions.
    polygon_sizes: (P,) corners per polygon (each ≥ 3).
    corner_vertices: (C,) vertex index per corner, C = Σ polygon_sizes, polygons in order.
    corner_uvs: (C,) index into `uvs` per corner, or None when the faces have no `vt`.
    uvs: (T, 2) float64 texture coordinates.
    polygon_materials: (P,) index into `material_names` (the `usemtl` in effect).
    material_names: material names; '' for polygons before any `usemtl`.
    face_lines: the `f` lines as written (stripped), for a fast same-topology check.
  """

  vertices: np.ndarray
  polygon_sizes: np.ndarray
  corner_vertices: np.ndarray
  corner_uvs: np.ndarray | None
  uvs: np.ndarray
  polygon_materials: np.ndarray
  material_names: tuple[str, ...]
  face_lines: list[bytes]


def read_obj(path: Path, topology_of: ObjMesh | None = None) -> ObjMesh:
  """Reads an OBJ's vertices, polygons, texture coordinates and materials.

  Args:
    path: the .obj file.
    topology_of: a mesh this file must share its vertex count and polygons with (a morph
      target of it). Its `vt` and materials are then not read; the returned mesh reuses
      `topology_of`'s polygons, uvs and materials.

  Raises:
    ModelFileError: a missing or unreadable file, bad numbers, wrong token counts, face
      indices out of range, non-finite coordinates, or a topology other than `topology_of`'s.
  """
  try:
    size = path.stat().st_size
    if size > MAX_OBJ_BYTES:
      raise ModelFileError(f"{path}: {size} bytes, more than {MAX_OBJ_BYTES} for one OBJ file")
    data = path.read_bytes()
  except FileNotFoundError:
    raise ModelFileError(f"{path}: file not found") from None
  except OSError as e:
    raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
  v_rows, v_lines, vt_rows, vt_lines, f_rows, f_lines, f_text = [], [], [], [], [], [], []
  material_starts: list[tuple[str, int]] = []
  with_uvs = topology_of is None
  for number, raw in enumerate(data.splitlines(), 1):
    if b"#" in raw:
      raw = raw.partition(b"#")[0]
    tokens = raw.split()
    if not tokens:
      continue
    head = tokens[0]
    if head == b"v":
      v_rows.append(tokens)
      v_lines.append(number)
    elif head == b"f":
      f_rows.append(tokens)
      f_lines.append(number)
      f_text.append(raw.strip())
    elif head == b"vt" and with_uvs:
      vt_rows.append(tokens)
      vt_lines.append(number)
    elif head == b"usemtl" and with_uvs:
      name = b" ".join(tokens[1:]).decode("utf-8", "replace")
      material_starts.append((name, len(f_rows)))
  vertices = _floats(path, v_rows, v_lines, 3, (3, 6), "x y z (or x y z r g b)")
  if topology_of is not None:
    return _same_topology(path, vertices, f_rows, f_lines, f_text, topology_of)
  if not f_rows:
    raise ModelFileError(f"{path}: no faces ('f' lines)")
  uvs = _floats(path, vt_rows, vt_lines, 2, (2, 3), "u v (or u v w)")
  sizes, corner_vertices, corner_uvs = _faces(path, f_rows, f_lines, len(vertices), len(uvs))
  names = [""] if not material_starts or material_starts[0][1] > 0 else []
  starts = [0] if names else []
  for name, start in material_starts:
    if starts and start == starts[-1]:
      names.pop()
      starts.pop()
    names.append(name)
    starts.append(start)
  unique_names = tuple(dict.fromkeys(names))
  run_material = np.array([unique_names.index(n) for n in names], np.int64)
  run_lengths = np.diff(np.array([*starts, len(f_rows)]))
  return ObjMesh(
    vertices=vertices,
    polygon_sizes=sizes,
    corner_vertices=corner_vertices,
    corner_uvs=corner_uvs,
    uvs=uvs,
    polygon_materials=np.repeat(run_material, run_lengths),
    material_names=unique_names,
    face_lines=f_text,
  )


def _floats(path, rows, lines, width: int, allowed: tuple[int, ...], layout: str) -> np.ndarray:
  """(N, width) float64 from `v`/`vt` token rows (each row starts with its keyword).

  `allowed` are the accepted counts of numbers per row; the first `width` are kept.
  """
  if not rows:
    return np.zeros((0, width))
  counts = np.fromiter(map(len, rows), np.int64, len(rows)) - 1
  bad = np.flatnonzero(~np.isin(counts, allowed))
  if bad.size:
    i = bad[0]
    raise ModelFileError(
      f"{path}:{lines[i]}: '{rows[i][0].decode()}' needs {layout}, got {counts[i]} numbers"
    )
  try:
    values = np.array([r[1 : 1 + width] for r in rows], dtype="S").astype(np.float64)
  except ValueError:
    for r, line in zip(rows, lines):
      for token in r[1 : 1 + width]:
        try:
          float(token)
        except ValueError:
          bad_token = token.decode("utf-8", "replace")
          raise ModelFileError(f"{path}:{line}: bad number {bad_token!r}") from None
    raise  # unreachable: some token failed above
  finite = np.isfinite(values).all(1)
  if not finite.all():
    i = int(np.flatnonzero(~finite)[0])
    raise ModelFileError(f"{path}:{lines[i]}: non-finite coordinate")
  return values


def _faces(path, rows, lines, num_vertices: int, num_uvs: int):
  """Polygon sizes (P,), corner vertex indices (C,) and corner uv indices (C,) or None."""
  sizes = np.fromiter(map(len, rows), np.int64, len(rows)) - 1
  if np.any(sizes < 3):
    i = int(np.flatnonzero(sizes < 3)[0])
    raise ModelFileError(f"{path}:{lines[i]}: a face needs at least 3 corners, got {sizes[i]}")
  corners = [c.split(b"/") for r in rows for c in r[1:]]
  polygon_of_corner = np.repeat(np.arange(len(rows)), sizes)

  def fail(corner: int, what: str):
    raise ModelFileError(f"{path}:{lines[polygon_of_corner[corner]]}: {what}") from None

  widths = np.fromiter(map(len, corners), np.int64, len(corners))
  if np.any(widths > 3):
    c = int(np.flatnonzero(widths > 3)[0])
    fail(c, f"bad face corner {b'/'.join(corners[c]).decode('utf-8', 'replace')!r}")
  vertex_tokens = [c[0] for c in corners]
  uv_tokens = [c[1] if len(c) > 1 else b"" for c in corners]
  has_uv = np.fromiter((bool(t) for t in uv_tokens), bool, len(corners))
  if has_uv.any() and not has_uv.all():
    fail(int(np.flatnonzero(~has_uv)[0]), "a face corner without a texture coordinate")

  def indices(tokens, count: int, kind: str) -> np.ndarray:
    try:
      values = np.array(tokens, dtype="S").astype(np.int64)
    except ValueError:
      for c, token in enumerate(tokens):
        try:
          int(token)
        except ValueError:
          fail(c, f"bad {kind} index {token.decode('utf-8', 'replace')!r}")
      raise  # unreachable: some token failed above
    bad = np.flatnonzero((values < 1) | (values > count))
    if bad.size:
      c = int(bad[0])
      hint = " (relative indices are not supported)" if values[c] < 0 else ""
      fail(c, f"{kind} index {values[c]} is outside 1..{count}{hint}")
    return values - 1

  corner_vertices = indices(vertex_tokens, num_vertices, "vertex")
  corner_uvs = indices(uv_tokens, num_uvs, "texture coordinate") if has_uv.all() else None
  return sizes, corner_vertices, corner_uvs


def _same_topology(path, vertices, f_rows, f_lines, f_text, reference: ObjMesh) -> ObjMesh:
  num_vertices = len(reference.vertices)
  if len(vertices) != num_vertices:
    raise ModelFileError(
      f"{path}: {len(vertices)} vertices but {NEUTRAL_FILE} has {num_vertices}; "
      "every shape must be a full mesh with the neutral mesh's topology"
    )
  if f_text != reference.face_lines:
    # Formatting may differ (e.g. 'f 1/1/1'); compare the vertex indices themselves.
    same = len(f_rows) == len(reference.polygon_sizes)
    if same:
      sizes, corners, _ = _faces(path, f_rows, f_lines, num_vertices, 2**62)
      same = np.array_equal(sizes, reference.polygon_sizes) and np.array_equal(
        corners, reference.corner_vertices
      )
    if not same:
      raise ModelFileError(
        f"{path}: its faces differ from those of {NEUTRAL_FILE}; every shape must have the "
        "neutral mesh's topology"
      )
  return dataclasses.replace(reference, vertices=vertices)


# ----------------------------------------------------------------------------------------
# Mesh processing.


def triangulate(polygon_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Fan triangulation (0, i, i + 1) of every polygon; keeps each polygon's winding.

  Args:
    polygon_sizes: (P,) corners per polygon.

  Returns:
    (F, 3) indices into the flat corner array, and (F,) the polygon of each triangle.
  """
  sizes = np.asarray(polygon_sizes, np.int64)
  first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  polygon = np.repeat(np.arange(len(sizes)), sizes - 2)
  # Triangle j of its polygon uses corners 0, j + 1, j + 2.
  j = np.arange(len(polygon)) - np.repeat(np.cumsum(sizes - 2) - (sizes - 2), sizes - 2)
  base = first[polygon]
  return np.stack([base, base + j + 1, base + j + 2], -1), polygon


def atlas_slots(num_slots: int) -> np.ndarray:
  """(n, 3) square atlas slots (u0, v0, side) in [0, 1]², one per texture tile.

  One tile: the whole atlas. Up to eight: the first (the face) gets the top-left 0.75 × 0.75,
  the others 0.25 × 0.25 cells down the right column, then along the bottom row. More: an
  equal grid, row by row from the top.
  """
  if num_slots == 1:
    return np.array([[0.0, 0.0, 1.0]])
  if num_slots <= 8:
    cells = [(0.75, 0.75), (0.75, 0.5), (0.75, 0.25), (0.0, 0.0), (0.25, 0.0), (0.5, 0.0)]
    cells.append((0.75, 0.0))
    return np.array([[0.0, 0.25, 0.75]] + [[u, v, 0.25] for u, v in cells[: num_slots - 1]])
  side = math.ceil(math.sqrt(num_slots))
  i = np.arange(num_slots)
  return np.stack([(i % side) / side, 1 - (i // side + 1) / side, np.full(num_slots, 1 / side)], -1)


def pack_uvs(uvs: np.ndarray, uv_faces: np.ndarray, face_tiles: np.ndarray):
  """Packs per-material texture tiles into one [0, 1]² atlas.

  Args:
    uvs: (T, 2) texture coordinates; tile t's uvs lie in a unit square (any integer offset).
    uv_faces: (F, 3) indices into `uvs`.
    face_tiles: (F,) tile (material) of each face, 0 … n − 1; tile 0 gets the largest slot.

  Returns:
    (T', 2) uvs in [0, 1] and (F, 3) indices; a uv used by two tiles is duplicated.
  """
  num_tiles = int(face_tiles.max()) + 1
  key = uv_faces.astype(np.int64) * num_tiles + face_tiles[:, None]
  unique, inverse = np.unique(key.ravel(), return_inverse=True)
  source, tile = uvs[unique // num_tiles], unique % num_tiles
  # A tile's offset is the integer corner of the unit square holding its uvs' bbox centre.
  lo = np.full((num_tiles, 2), np.inf)
  hi = np.full((num_tiles, 2), -np.inf)
  np.minimum.at(lo, tile, source)
  np.maximum.at(hi, tile, source)
  origin = np.floor(0.5 * (lo + hi))
  local = np.clip(source - origin[tile], 0.0, 1.0)
  slots = atlas_slots(num_tiles)
  corner, side = slots[tile, :2], slots[tile, 2:]
  packed = corner + side * (ATLAS_MARGIN + (1 - 2 * ATLAS_MARGIN) * local)
  return packed, inverse.reshape(uv_faces.shape).astype(np.int32)


def part_name(material: str) -> str:
  """'M_BackHead' -> 'back_head', 'M_ScleraLeft' -> 'sclera_left'; '' -> 'head'."""
  name = re.sub(r"^M_", "", material)
  name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
  name = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()
  return name or "head"


def model_arrays(
  neutral: ObjMesh,
  identities: list[np.ndarray],
  expressions: list[np.ndarray],
  drop: frozenset[str] = DROPPED_MATERIALS,
) -> dict[str, np.ndarray]:
  """The npz-layout arrays (docs/head_model.md) from the neutral mesh and its morph targets.

  Args:
    neutral: the neutral mesh.
    identities: K (V, 3) identity meshes' vertices (same topology as `neutral`).
    expressions: E (V, 3) expression meshes' vertices.
    drop: names of the materials whose polygons are left out.

  Returns:
    `mean` (V', 3) float64, `basis` (K, V', 3) and `expression_basis` (E, V', 3) float32,
    `faces` (F, 3), `uvs` (T, 2), `uv_faces` (F, 3) and `part_names`/`part_ranges`, over
    the kept materials' vertices only (V' ≤ V).
  """
  dropped = [i for i, n in enumerate(neutral.material_names) if n in drop]
  kept_polygon = ~np.isin(neutral.polygon_materials, dropped)
  if not kept_polygon.any():
    raise ModelFileError(f"{NEUTRAL_FILE}: no polygons left after dropping {sorted(drop)}")
  corners, polygon = triangulate(neutral.polygon_sizes)
  keep = kept_polygon[polygon]
  corners, polygon = corners[keep], polygon[keep]
  # One consecutive face range per material, in order of first appearance (stable).
  material = neutral.polygon_materials[polygon]
  order = np.argsort(material, kind="stable")
  corners, material = corners[order], material[order]
  kept_vertices, faces = np.unique(neutral.corner_vertices[corners], return_inverse=True)
  faces = faces.reshape(-1, 3).astype(np.int32)
  # Material ids number materials in order of first appearance, so sorted ids keep it.
  present, counts = np.unique(material, return_counts=True)
  ends = np.cumsum(counts)
  arrays = {
    "mean": neutral.vertices[kept_vertices],
    "faces": faces,
    "part_names": np.array([part_name(neutral.material_names[m]) for m in present]),
    "part_ranges": np.stack([ends - counts, ends], -1).astype(np.int64),
  }
  if neutral.corner_uvs is not None:
    uv_faces = neutral.corner_uvs[corners]
    uvs = neutral.uvs
    used = uvs[np.unique(uv_faces)]
    if used.min() < -UV_TOLERANCE or used.max() > 1 + UV_TOLERANCE:
      tiles = np.searchsorted(present, material)  # tile index = material's slot order
      uvs, uv_faces = pack_uvs(uvs, uv_faces, tiles)
    else:
      used_uvs, uv_faces = np.unique(uv_faces, return_inverse=True)
      uvs, uv_faces = np.clip(uvs[used_uvs], 0.0, 1.0), uv_faces.reshape(-1, 3)
    arrays["uvs"], arrays["uv_faces"] = uvs.astype(np.float32), uv_faces.astype(np.int32)
  mean = arrays["mean"]

  def deltas(shapes, scale):
    out = np.empty((len(shapes), len(kept_vertices), 3), np.float32)
    for k, verts in enumerate(shapes):
      out[k] = (verts[kept_vertices] - mean) * scale
    return out

  arrays["basis"] = deltas(identities, IDENTITY_SCALE)
  arrays["expression_basis"] = deltas(expressions, EXPRESSION_SCALE)
  return arrays


# ----------------------------------------------------------------------------------------
# The folder and its cache.


@dataclasses.dataclass(frozen=True)
class ModelFiles:
  """The files of an ICT-FaceKit folder that `read_ict` reads."""

  folder: Path
  neutral: Path
  identities: tuple[Path, ...]
  expressions: tuple[tuple[str, Path], ...]
  config: Path | None  # vertex_indices.json, when present

  def all(self) -> list[Path]:
    paths = [self.neutral, *self.identities, *(p for _, p in self.expressions)]
    return paths + ([self.config] if self.config else [])


def find_files(folder: Path) -> ModelFiles:
  """Lists the neutral mesh, identity modes (identity000… with no gaps) and expressions.

  Raises:
    ModelFileError: a missing folder, neutral mesh, identity or expression file, or an
      unreadable `vertex_indices.json`.
  """
  hint = "pass the FaceXModel folder of github.com/ICT-VGL/ICT-FaceKit"
  if folder.is_file() and folder.name == NEUTRAL_FILE:
    folder = folder.parent
  if not folder.is_dir():
    raise ModelFileError(f"ICT-FaceKit folder not found: {folder} ({hint})")
  neutral = folder / NEUTRAL_FILE
  if not neutral.is_file():
    raise ModelFileError(f"{folder}: {NEUTRAL_FILE} is missing ({hint})")
  numbered = {}
  for entry in folder.iterdir():
    match = IDENTITY_FILE.fullmatch(entry.name)
    if match:
      numbered[int(match.group(1))] = entry
  if not numbered:
    raise ModelFileError(f"{folder}: no identity modes (identity000.obj, …) ({hint})")
  count = next(i for i in range(len(numbered) + 1) if i not in numbered)
  if count != len(numbered):
    raise ModelFileError(
      f"{folder}: identity{count:03d}.obj is missing but identity{max(numbered):03d}.obj "
      "exists; the identity modes must be numbered from 000 without gaps"
    )
  config = folder / CONFIG_FILE
  names = EXPRESSION_NAMES
  if config.is_file():
    try:
      names = json.loads(config.read_text(encoding="utf-8"))["expressions"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      reason = " ".join(str(e).split())
      raise ModelFileError(f"{config}: no readable 'expressions' list ({reason})") from None
    if not isinstance(names, list) or not all(
      isinstance(n, str) and SHAPE_NAME.fullmatch(n) for n in names
    ):
      raise ModelFileError(f"{config}: 'expressions' must be a list of shape names")
  expressions = []
  for name in names:
    path = folder / f"{name}.obj"
    if not path.is_file():
      raise ModelFileError(f"{folder}: expression shape {name}.obj is missing")
    expressions.append((name, path))
  return ModelFiles(
    folder=folder,
    neutral=neutral,
    identities=tuple(numbered[i] for i in range(count)),
    expressions=tuple(expressions),
    config=config if config.is_file() else None,
  )


def cache_key(files: ModelFiles, drop: frozenset[str] = DROPPED_MATERIALS) -> str:
  """A digest of the loader version, `drop` and every read file's name, size and mtime."""
  entries = []
  for path in files.all():
    stat = path.stat()
    entries.append([path.name, stat.st_size, stat.st_mtime_ns])
  text = json.dumps([CACHE_VERSION, sorted(drop), entries])
  return hashlib.sha256(text.encode()).hexdigest()


def cache_paths(folder: Path) -> list[Path]:
  """Beside the OBJs first, then `$SDSJAX_CACHE/ict-<digest of the folder path>.npz`."""
  digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
  return [folder / CACHE_FILE, cache_root() / f"ict-{digest}.npz"]


def _load_cache(path: Path, key: str) -> dict | None:
  """The cached arrays, or None when the file is absent, unreadable, stale or incomplete."""
  if not path.is_file():
    return None
  try:
    # Bounded reading: the cache sits in a folder others may write to.
    arrays = bounded_npz.read_npz(path, keys=("cache_key", *ARRAY_KEYS))
  except ModelFileError as e:
    log.warning("ignoring an unreadable ICT-FaceKit cache (%s)", e)
    return None
  stored = arrays.pop("cache_key", None)
  if stored is None or stored.shape != () or str(stored) != key:
    return None
  if not set(ARRAY_KEYS) - {"uvs", "uv_faces"} <= arrays.keys():
    return None
  return arrays


def _write_cache(paths: list[Path], key: str, arrays: dict) -> Path | None:
  for path in paths:
    temporary = None
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
      with os.fdopen(handle, "wb") as f:
        np.savez(f, cache_key=np.array(key), **arrays)
      os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from other users
      os.replace(temporary, path)
      return path
    except OSError as e:
      log.info("cannot write the ICT-FaceKit cache %s (%s)", path, e)
      if temporary is not None:
        Path(temporary).unlink(missing_ok=True)
  return None


def read_ict(folder: Path, drop: frozenset[str] = DROPPED_MATERIALS) -> dict[str, np.ndarray]:
  """Reads an ICT-FaceKit `FaceXModel` folder (or its cache) into the npz layout.

  Args:
    folder: the folder holding `generic_neutral_mesh.obj` and the shape OBJs (the neutral
      mesh's own path is accepted too).
    drop: materials left out (default: see-through layers, irises, teeth, gums and tongue;
      `SEE_THROUGH_MATERIALS` keeps the mouth interior and irises).

  Returns:
    `mean` (V, 3) in the source's centimetres, `basis` (K, V, 3) identity modes at 1σ,
    `expression_basis` (E, V, 3) full expressions, `faces`/`uv_faces` (F, 3), `uvs`
    (T, 2), `names` (K,), `expression_names` (E,), `part_names` (n,), `part_ranges` (n, 2).

  Raises:
    ModelFileError: a missing folder or file, a malformed OBJ, or shapes whose vertex count
      or faces differ from the neutral mesh's.
  """
  files = find_files(Path(folder))
  drop = frozenset(drop)
  key = cache_key(files, drop)
  paths = cache_paths(files.folder)
  for path in paths:
    arrays = _load_cache(path, key)
    if arrays is not None:
      return {**arrays, "expression_range": EXPRESSION_RANGE}
  log.info("reading %d ICT-FaceKit OBJ files from %s", len(files.all()) - 1, files.folder)
  neutral = read_obj(files.neutral)
  identities = [read_obj(p, topology_of=neutral).vertices for p in files.identities]
  expressions = [read_obj(p, topology_of=neutral).vertices for _, p in files.expressions]
  arrays = model_arrays(neutral, identities, expressions, drop)
  arrays["names"] = np.array([p.stem for p in files.identities])
  arrays["expression_names"] = np.array([n for n, _ in files.expressions], dtype=str)
  _write_cache(paths, key, arrays)
  return {**arrays, "expression_range": EXPRESSION_RANGE}
