"""Output files open in standard tools and are never left half-written."""

import numpy as np
import pytest
import trimesh
from PIL import Image

from sdsjax import export


def cube():
  v = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], np.float32)
  f = np.array(
    [
      [0, 1, 3],
      [0, 3, 2],
      [4, 6, 7],
      [4, 7, 5],
      [0, 4, 5],
      [0, 5, 1],
      [2, 3, 7],
      [2, 7, 6],
      [0, 2, 6],
      [0, 6, 4],
      [1, 5, 7],
      [1, 7, 3],
    ]
  )
  uv = np.random.default_rng(0).uniform(size=(20, 2)).astype(np.float32)
  uvf = np.random.default_rng(1).integers(0, 20, size=f.shape)
  return v, f, uv, uvf


def test_obj_with_texture_round_trips(tmp_path):
  v, f, uv, uvf = cube()
  tex = np.random.default_rng(2).uniform(size=(8, 8, 3))
  export.write_obj(tmp_path / "head.obj", v, f, uv, uvf, tex)
  mesh = trimesh.load(tmp_path / "head.obj", process=False, force="mesh")
  assert len(mesh.faces) == len(f)
  assert (tmp_path / "texture.png").exists() and (tmp_path / "head.mtl").exists()
  assert "map_Kd texture.png" in (tmp_path / "head.mtl").read_text()
  # Positions survive: the loaded vertex set equals the written one.
  np.testing.assert_allclose(
    np.unique(np.round(mesh.vertices, 5), axis=0), np.unique(v, axis=0), atol=1e-5
  )


def test_glb_loads_with_and_without_texture(tmp_path):
  v, f, uv, uvf = cube()
  export.write_glb(tmp_path / "plain.glb", v, f)
  plain = trimesh.load(tmp_path / "plain.glb", force="mesh")
  assert len(plain.faces) == len(f)
  export.write_glb(tmp_path / "tex.glb", v, f, uv, uvf, np.full((4, 4, 3), 0.5))
  textured = trimesh.load(tmp_path / "tex.glb", force="mesh")
  assert len(textured.faces) == len(f)
  assert textured.visual.uv is not None


def test_png_grid_and_gif(tmp_path):
  frames = np.stack([np.full((4, 6, 3), i / 4) for i in range(5)])
  grid = export.image_grid(frames, columns=2)
  assert grid.shape == (12, 12, 3)
  np.testing.assert_allclose(grid[4:8, 6:12], frames[3])
  export.write_png(tmp_path / "a.png", grid)
  assert Image.open(tmp_path / "a.png").size == (12, 12)
  export.write_gif(tmp_path / "a.gif", frames)
  gif = Image.open(tmp_path / "a.gif")
  assert gif.n_frames == 5


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / "x.bin"
  with pytest.raises(RuntimeError), export.atomic_write(target) as f:
    f.write(b"partial")
    raise RuntimeError("boom")
  assert list(tmp_path.iterdir()) == []


def test_written_files_get_normal_permissions(tmp_path):
  import os

  export.write_png(tmp_path / "p.png", np.zeros((2, 2, 3)))
  umask = os.umask(0)
  os.umask(umask)
  assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o666 & ~umask
