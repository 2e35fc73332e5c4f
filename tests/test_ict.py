"""Tests for sdsjax.ict: ICT-FaceKit OBJ folders through `morphable.load_model("ict:...")`."""

import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sdsjax import ict
from sdsjax import morphable
from sdsjax.errors import ModelFileError

# A cube (front, back, right, left and bottom quads, "M_Face") with a pyramid roof of four
# triangles ("M_BackHead", uvs in the second UDIM tile) and a stray eyelash triangle
# ("M_EyeLashes", dropped by the loader). 1-based vertex indices, counter-clockwise outside.
CUBE = np.array(
  [
    [-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1],
    [-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1],
    [0, 1.6, 0],
    [0, 0, 1.2], [0.2, 0, 1.2], [0, 0.2, 1.2],
  ],
  np.float64,
)  # fmt: skip
QUADS = [[1, 2, 3, 4], [6, 5, 8, 7], [2, 6, 7, 3], [5, 1, 4, 8], [5, 6, 2, 1]]
ROOF = [[4, 3, 9], [3, 7, 9], [7, 8, 9], [8, 4, 9]]
LASHES = [[10, 11, 12]]
KEPT_VERTICES = 9
EXPRESSIONS = ["jawOpen", "eyeBlink_L"]
NUM_IDENTITIES = 3


def _uv_layout():
  """Per-corner uvs: quad q in u ∈ [q/5, (q+1)/5] of tile 0, the roof in tile 1, lashes in 6."""
  uvs, polygons = [], []
  square = [(0.1, 0.1), (0.9, 0.1), (0.9, 0.9), (0.1, 0.9)]
  for q, quad in enumerate(QUADS):
    corners = []
    for (u, v), vertex in zip(square, quad):
      uvs.append(((q + u) / 5, v))
      corners.append((vertex, len(uvs)))
    polygons.append(("M_Face", corners))
  for t, tri in enumerate(ROOF):
    corners = []
    for (u, v), vertex in zip([(0.1, 0.1), (0.9, 0.1), (0.5, 0.9)], tri):
      uvs.append((1 + (t + u) / 4, v))
      corners.append((vertex, len(uvs)))
    polygons.append(("M_BackHead", corners))
  for tri in LASHES:
    corners = []
    for vertex in tri:
      uvs.append((6.5, 0.5))
      corners.append((vertex, len(uvs)))
    polygons.append(("M_EyeLashes", corners))
  return np.array(uvs), polygons


UVS, POLYGONS = _uv_layout()


def obj_text(verts, polygons=POLYGONS, uvs=UVS, separator=" ") -> str:
  lines = ["# fake ICT-FaceKit mesh", "mtllib ICTFaceModelMaterial.mtl"]
  lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
  lines += [f"vt {u:.6f} {v:.6f}" for u, v in uvs]
  material = None
  for name, corners in polygons:
    if name != material:
      lines.append(f"usemtl {name}")
      material = name
    lines.append("f " + separator.join(f"{v}/{t}" for v, t in corners))
  return "\n".join(lines) + "\n"


def make_folder(root: Path, seed: int = 0) -> tuple[Path, dict]:
  """Writes a fake FaceXModel folder; returns it and the vertex arrays as written."""
  rng = np.random.default_rng(seed)
  folder = root / "FaceXModel"
  folder.mkdir()
  shapes = {"neutral": CUBE}
  for k in range(NUM_IDENTITIES):
    shapes[f"identity{k:03d}"] = CUBE + 0.1 * rng.normal(size=CUBE.shape)
  for name in EXPRESSIONS:
    shapes[name] = CUBE + 0.05 * rng.normal(size=CUBE.shape)
  shapes = {name: np.round(v, 6) for name, v in shapes.items()}  # as the files hold them
  (folder / ict.NEUTRAL_FILE).write_text(obj_text(shapes["neutral"]))
  for name, verts in shapes.items():
    if name != "neutral":
      # One shape spaces its face corners differently: same topology, other formatting.
      separator = "  " if name == "eyeBlink_L" else " "
      (folder / f"{name}.obj").write_text(obj_text(verts, separator=separator))
  (folder / ict.CONFIG_FILE).write_text(json.dumps({"expressions": EXPRESSIONS}))
  return folder, shapes


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
  root = tmp_path / "sdsjax_cache"
  monkeypatch.setenv("SDSJAX_CACHE", str(root))
  return root


@pytest.fixture
def folder(tmp_path):
  return make_folder(tmp_path)


def _load(folder: Path, k: int = NUM_IDENTITIES, e: int = len(EXPRESSIONS)):
  return morphable.load_model(f"ict:{folder}", k, e)


# ---------------------------------------------------------------------------------------
# Geometry, components, uvs and parts.


def test_vertices_are_neutral_plus_weighted_differences(folder):
  path, shapes = folder
  model = _load(path)
  assert model.source == "ict"
  assert model.names == ("identity000", "identity001", "identity002")
  assert model.expression_names == tuple(EXPRESSIONS)
  assert model.mean.shape == (KEPT_VERTICES, 3)  # the eyelash vertices are gone
  weights = np.array([0.7, -1.3, 2.0])
  expression = np.array([1.0, 0.4])
  # Unit scale (docs/head_model.md): identity OBJs are modes at 1σ, expressions are full
  # blendshapes, so weight 1 adds exactly one (shape − neutral).
  scale = 1.0
  expected = shapes["neutral"][:KEPT_VERTICES].copy()
  for w, k in zip(weights, range(NUM_IDENTITIES)):
    delta = shapes[f"identity{k:03d}"] - shapes["neutral"]
    expected += w * scale * delta[:KEPT_VERTICES]
  for x, name in zip(expression, EXPRESSIONS):
    delta = shapes[name] - shapes["neutral"]
    expected += x * scale * delta[:KEPT_VERTICES]
  verts = morphable.vertices(model, jnp.asarray(weights), jnp.asarray(expression))
  np.testing.assert_allclose(model.to_source_units(verts), expected, atol=2e-5)
  np.testing.assert_allclose(
    model.to_source_units(model.mean), shapes["neutral"][:KEPT_VERTICES], atol=1e-5
  )


def test_fewer_components_keep_the_leading_ones(folder):
  path, _ = folder
  full, two = _load(path), _load(path, 2, 1)
  np.testing.assert_allclose(two.basis, full.basis[:2])
  np.testing.assert_allclose(two.expression_basis, full.expression_basis[:1])
  with pytest.raises(ModelFileError, match="asked for 4 components"):
    _load(path, 4, 0)


def test_quads_are_fan_triangulated_counter_clockwise(folder):
  model = _load(folder[0])
  faces = np.asarray(model.faces)
  mean = np.asarray(model.to_source_units(model.mean))
  assert faces.shape == (2 * len(QUADS) + len(ROOF), 3)
  # The first quad (1, 2, 3, 4) becomes (1, 2, 3) and (1, 3, 4), 0-based.
  np.testing.assert_array_equal(faces[:2], [[0, 1, 2], [0, 2, 3]])
  tri = mean[faces]
  normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  outward = tri.mean(1) - mean.mean(0)
  assert np.all(np.einsum("fi,fi->f", normals, outward) > 0)
  # A closed surface: every directed edge once, so the winding is consistent.
  directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
  assert len(np.unique(directed, axis=0)) == len(directed) == 3 * len(faces)


def test_parts_follow_the_materials(folder):
  model = _load(folder[0])
  assert model.parts == (("face", 0, 10), ("back_head", 10, 14))


def test_uv_tiles_are_packed_into_one_atlas(folder):
  model = _load(folder[0])
  uvs, uv_faces = np.asarray(model.uvs, np.float64), np.asarray(model.uv_faces)
  assert uvs.min() >= 0 and uvs.max() <= 1
  # Each corner's uv is its OBJ uv, moved to its tile's origin and into the tile's slot.
  m = ict.ATLAS_MARGIN
  corner_vt = []
  for _, corners in POLYGONS[: len(QUADS)]:
    vt = [t - 1 for _, t in corners]
    corner_vt += [[vt[0], vt[1], vt[2]], [vt[0], vt[2], vt[3]]]
  for _, corners in POLYGONS[len(QUADS) : len(QUADS) + len(ROOF)]:
    corner_vt.append([t - 1 for _, t in corners])
  source = UVS[np.array(corner_vt)]  # (F, 3, 2)
  face_slot = np.array([[0.0, 0.25, 0.75]] * 10 + [[0.75, 0.75, 0.25]] * 4)
  origin = np.array([[0.0, 0.0]] * 10 + [[1.0, 0.0]] * 4)
  expected = face_slot[:, None, :2] + face_slot[:, None, 2:] * (
    m + (1 - 2 * m) * (source - origin[:, None])
  )
  np.testing.assert_allclose(uvs[uv_faces], expected, atol=1e-6)


def test_uvs_inside_the_unit_square_are_kept(tmp_path):
  folder, _ = make_folder(tmp_path)
  uvs = np.clip(UVS - np.floor(UVS), 0, 1) * 0.5  # one texture, no tiles
  (folder / ict.NEUTRAL_FILE).write_text(obj_text(CUBE, uvs=uvs))
  arrays = ict.read_ict(folder)
  np.testing.assert_allclose(arrays["uvs"][arrays["uv_faces"][0]], uvs[[0, 1, 2]], atol=1e-6)


def test_an_obj_without_uvs_gets_spherical_uvs(folder):
  path, _ = folder
  polygons = [(name, [(v, 0) for v, _ in corners]) for name, corners in POLYGONS]
  text = obj_text(CUBE, polygons=polygons, uvs=np.zeros((0, 2)))
  (path / ict.NEUTRAL_FILE).write_text(text.replace("/0", ""))
  arrays = ict.read_ict(path)
  assert "uvs" not in arrays and "uv_faces" not in arrays
  model = _load(path)
  assert model.uv_faces.shape == model.faces.shape
  assert float(model.uvs.min()) >= 0 and float(model.uvs.max()) <= 1


def test_an_oversized_obj_is_refused(folder, monkeypatch):
  monkeypatch.setattr(ict, "MAX_OBJ_BYTES", 100)
  assert "more than 100 for one OBJ file" in _error(folder[0])


def test_pack_uvs_duplicates_a_uv_shared_by_two_tiles():
  uvs = np.array([[0.2, 0.2], [0.8, 0.2], [0.5, 0.8]])
  packed, faces = ict.pack_uvs(uvs, np.array([[0, 1, 2], [0, 1, 2]]), np.array([0, 1]))
  assert len(packed) == 6
  slots = ict.atlas_slots(2)
  for f in range(2):
    lo, side = slots[f, :2], slots[f, 2]
    assert np.all(packed[faces[f]] >= lo) and np.all(packed[faces[f]] <= lo + side)


def test_triangulate_fans_polygons_in_order():
  corners, polygon = ict.triangulate(np.array([3, 5, 4]))
  np.testing.assert_array_equal(
    corners, [[0, 1, 2], [3, 4, 5], [3, 5, 6], [3, 6, 7], [8, 9, 10], [8, 10, 11]]
  )
  np.testing.assert_array_equal(polygon, [0, 1, 1, 1, 2, 2])


def test_part_names():
  assert ict.part_name("M_BackHead") == "back_head"
  assert ict.part_name("M_ScleraLeft") == "sclera_left"
  assert ict.part_name("") == "head"


def test_keeping_every_material_but_the_see_through_ones(folder):
  arrays = ict.read_ict(folder[0], drop=frozenset())
  assert arrays["mean"].shape == (len(CUBE), 3)
  assert list(arrays["part_names"]) == ["face", "back_head", "eye_lashes"]


# ---------------------------------------------------------------------------------------
# Errors: one line each.


def _error(folder: Path) -> str:
  with pytest.raises(ModelFileError) as info:
    _load(folder)
  message = str(info.value)
  assert "\n" not in message
  return message


def _replace_first_line(path: Path, prefix: str, new: str):
  lines = path.read_text().splitlines()
  i = next(i for i, line in enumerate(lines) if line.startswith(prefix))
  lines[i] = new
  path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
  "file, prefix, new, message",
  [
    ("identity001.obj", "v ", "v 1 2", r"identity001\.obj:3: 'v' needs x y z .*got 2 numbers"),
    ("identity001.obj", "v ", "v 1 x1.5 2", r"identity001\.obj:3: bad number 'x1\.5'"),
    ("jawOpen.obj", "v ", "v nan 0 0", r"jawOpen\.obj:3: non-finite coordinate"),
    ("jawOpen.obj", "v ", "v 0 1e999 0", r"jawOpen\.obj:3: non-finite coordinate"),
    (ict.NEUTRAL_FILE, "f ", "f 99/1 2/2 3/3", r"obj:\d+: vertex index 99 is outside 1\.\.12"),
    (ict.NEUTRAL_FILE, "f ", "f -1/1 2/2 3/3", r"relative indices are not supported"),
    (ict.NEUTRAL_FILE, "f ", "f 1/1 2/x 3/3", r"bad texture coordinate index 'x'"),
    (ict.NEUTRAL_FILE, "f ", "f 1/1 2/2 3/99", r"texture coordinate index 99 is outside"),
    (ict.NEUTRAL_FILE, "f ", "f 1/1 2/2", r"at least 3 corners, got 2"),
    (ict.NEUTRAL_FILE, "f ", "f 1 2/2 3/3", r"without a texture coordinate"),
    (ict.NEUTRAL_FILE, "f ", "f 1/1/1/1 2/2 3/3", r"bad face corner '1/1/1/1'"),
    (ict.NEUTRAL_FILE, "vt ", "vt 0.1", r"'vt' needs u v .*got 1 numbers"),
  ],
)
def test_malformed_obj_is_a_one_line_error(folder, file, prefix, new, message):
  path = folder[0]
  _replace_first_line(path / file, prefix, new)
  text = _error(path)
  assert re.search(message, text), text


def test_different_vertex_count_is_an_error(folder):
  path = folder[0]
  text = (path / "identity002.obj").read_text()
  lines = text.splitlines()
  first_v = next(i for i, line in enumerate(lines) if line.startswith("v "))
  del lines[first_v]
  (path / "identity002.obj").write_text("\n".join(lines) + "\n")
  message = _error(path)
  assert "identity002.obj: 11 vertices but generic_neutral_mesh.obj has 12" in message


def test_different_faces_are_an_error(folder):
  path = folder[0]
  _replace_first_line(path / "eyeBlink_L.obj", "f ", "f 1/1  3/3  2/2  4/4")
  assert "faces differ from those of generic_neutral_mesh.obj" in _error(path)


@pytest.mark.parametrize(
  "remove, message",
  [
    (ict.NEUTRAL_FILE, "generic_neutral_mesh.obj is missing"),
    ("jawOpen.obj", "expression shape jawOpen.obj is missing"),
    ("identity001.obj", "identity001.obj is missing but identity002.obj exists"),
    (ict.CONFIG_FILE, "expression shape browDown_L.obj is missing"),  # the 53 default names
  ],
)
def test_missing_file_is_a_one_line_error(folder, remove, message):
  path = folder[0]
  (path / remove).unlink()
  assert message in _error(path)


def test_missing_folder_and_bad_config(tmp_path, folder):
  assert "ICT-FaceKit folder not found" in _error(tmp_path / "nowhere")
  path = folder[0]
  (path / ict.CONFIG_FILE).write_text("{not json")
  assert "no readable 'expressions' list" in _error(path)
  (path / ict.CONFIG_FILE).write_text(json.dumps({"expressions": ["../x"]}))
  assert "must be a list of shape names" in _error(path)
  for k in range(NUM_IDENTITIES):
    (path / f"identity{k:03d}.obj").unlink()
  (path / ict.CONFIG_FILE).unlink()
  assert "no identity modes" in _error(path)


def test_the_neutral_mesh_path_names_its_folder(folder):
  path, _ = folder
  model = morphable.load_model(f"ict:{path / ict.NEUTRAL_FILE}", 1, 0)
  assert model.num_components == 1


# ---------------------------------------------------------------------------------------
# The cache.


def _forbid_parsing(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("an OBJ was parsed although the cache is valid")

  monkeypatch.setattr(ict, "read_obj", fail)


def test_cache_is_used_and_invalidated_by_a_touched_file(folder, monkeypatch):
  path, _ = folder
  first = ict.read_ict(path)
  assert (path / ict.CACHE_FILE).is_file()
  with monkeypatch.context() as patch:
    _forbid_parsing(patch)
    cached = ict.read_ict(path)
    assert cached.keys() == first.keys()
    for key, value in first.items():
      np.testing.assert_array_equal(cached[key], value)
      assert cached[key].dtype == value.dtype
    # A touched file changes the key: the OBJs are parsed again.
    stat = (path / "identity001.obj").stat()
    os.utime(path / "identity001.obj", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="an OBJ was parsed"):
      ict.read_ict(path)
  ict.read_ict(path)  # rewrites the cache for the new key
  with monkeypatch.context() as patch:
    _forbid_parsing(patch)
    ict.read_ict(path)


def test_changed_content_invalidates_the_cache(folder):
  path, shapes = folder
  ict.read_ict(path)
  moved = shapes["identity000"] + 0.25
  (path / "identity000.obj").write_text(obj_text(moved))
  stat = (path / "identity000.obj").stat()
  os.utime(path / "identity000.obj", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  arrays = ict.read_ict(path)
  expected = (moved - shapes["neutral"])[:KEPT_VERTICES]
  np.testing.assert_allclose(arrays["basis"][0], expected, atol=1e-5)


def test_an_unreadable_cache_is_ignored_and_rewritten(folder, monkeypatch):
  path, _ = folder
  first = ict.read_ict(path)
  (path / ict.CACHE_FILE).write_bytes(b"PK\x03\x04 not a zip file")
  again = ict.read_ict(path)
  np.testing.assert_array_equal(again["basis"], first["basis"])
  with monkeypatch.context() as patch:
    _forbid_parsing(patch)
    ict.read_ict(path)  # the rewritten cache is good


def test_cache_goes_to_sdsjax_cache_when_the_folder_is_not_writable(folder, cache_dir, monkeypatch):
  path, _ = folder
  # A directory where the cache file would go makes the folder "unwritable" even for root.
  (path / ict.CACHE_FILE).mkdir()
  ict.read_ict(path)
  written = list(cache_dir.glob("ict-*.npz"))
  assert len(written) == 1
  assert not list(path.glob("*.tmp")) and not list(cache_dir.glob("*.tmp"))
  with monkeypatch.context() as patch:
    _forbid_parsing(patch)
    ict.read_ict(path)


# ---------------------------------------------------------------------------------------
# The real model, when a checkout is named by $SDSJAX_ICT_DIR (not downloaded by tests).


@pytest.mark.real_files("SDSJAX_ICT_DIR")
def test_real_ict_facekit_folder():
  model = morphable.load_model(f"ict:{os.environ['SDSJAX_ICT_DIR']}", 100, 53)
  assert model.mean.shape == (15602, 3)
  assert model.faces.shape == (31140, 3)
  assert [p[0] for p in model.parts] == ["face", "back_head", "sclera_left", "sclera_right"]
  assert model.expression_names[26] == "jawOpen"
  source = model.to_source_units(model.mean)
  assert 30 < np.ptp(source[:, 1]) < 40  # centimetres, crown to the bottom of the neck
  # PCA modes: orthogonal over the full mesh, nearly so over the kept part, shrinking.
  basis = np.asarray(model.basis, np.float64).reshape(100, -1)
  norms = np.linalg.norm(basis, axis=1)
  cosines = basis @ basis.T / np.outer(norms, norms) - np.eye(100)
  assert np.sqrt(np.mean(cosines[~np.eye(100, dtype=bool)] ** 2)) < 0.05
  assert norms[0] > 20 * norms[-1]
  # At 1σ the per-vertex standard deviation of all modes is a few millimetres.
  per_vertex = np.linalg.norm(np.asarray(model.basis), axis=-1) * model.source_scale
  assert 0.3 < np.sqrt((per_vertex**2).sum(0).mean()) < 1.5  # cm
