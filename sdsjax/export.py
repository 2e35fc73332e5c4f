"""Files a user can open: meshes (OBJ with MTL and texture PNG, GLB), PNG turntables, GIFs.

Every writer goes through `atomic_write`, so an interrupted run never leaves a truncated file
under its final name.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def _default_mode() -> int:
  """0o666 less the process umask: what open() would have given the file."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
  """Yields a temporary file beside `path`, renamed onto it only when the block succeeds."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files; outputs should be shareable
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def to_uint8(image) -> np.ndarray:
  """(..., 3) floats in [0, 1] -> uint8."""
  return (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_png(path, image) -> None:
  """Writes (H, W, 3) in [0, 1] as a PNG."""
  with atomic_write(path) as f:
    Image.fromarray(to_uint8(image)).save(f, format="PNG")


def image_grid(images, columns: int) -> np.ndarray:
  """(N, H, W, 3) -> one (rows·H, columns·W, 3) image, filled row by row (white padding)."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.ones((rows * h, columns * w, c), images.dtype)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
  return grid


def write_gif(path, frames, duration_ms: int = 100) -> None:
  """Writes (N, H, W, 3) frames in [0, 1] as a looping GIF."""
  pictures = [Image.fromarray(f) for f in to_uint8(frames)]
  with atomic_write(path) as f:
    pictures[0].save(
      f, format="GIF", save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0
    )


def _rows(fmt: str, array: np.ndarray) -> str:
  """One `fmt` line per row of `array`: a single %-format over the whole array (np.savetxt
  formats row by row in Python, ten times slower for a head)."""
  array = np.asarray(array)
  return ((fmt + "\n") * len(array)) % tuple(array.reshape(-1).tolist())


def write_obj(path, vertices, faces, uvs=None, uv_faces=None, texture=None) -> None:
  """Writes a Wavefront OBJ; with a texture also `<stem>.mtl` and `texture.png` beside it.

  Args:
    vertices: (V, 3). faces: (F, 3) int, 0-based, counter-clockwise.
    uvs: (T, 2) and uv_faces: (F, 3), optional; seams need their own indices.
    texture: (Ht, Wt, 3) in [0, 1], optional; row 0 is the top (v = 1).
  """
  path = Path(path)
  vertices = np.asarray(vertices, np.float64)
  faces = np.asarray(faces, np.int64) + 1
  out = io.StringIO()
  out.write("# written by sdsjax\n")
  if texture is not None:
    mtl = path.with_suffix(".mtl")
    write_png(path.parent / "texture.png", texture)
    with atomic_write(mtl, "w") as f:
      f.write("newmtl head\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\nmap_Kd texture.png\n")
    out.write(f"mtllib {mtl.name}\nusemtl head\n")
  out.write(_rows("v %.6f %.6f %.6f", vertices))
  if uvs is not None:
    out.write(_rows("vt %.6f %.6f", np.asarray(uvs, np.float64)))
    uv_faces = np.asarray(uv_faces, np.int64) + 1
    out.write(_rows("f %d/%d %d/%d %d/%d", np.stack([faces, uv_faces], -1)))
  else:
    out.write(_rows("f %d %d %d", faces))
  with atomic_write(path, "w") as f:
    f.write(out.getvalue())


def write_glb(path, vertices, faces, uvs=None, uv_faces=None, texture=None) -> None:
  """Writes a binary glTF. UV seams are split into separate vertices, as glTF requires."""
  import trimesh  # Heavy import, only needed here.

  vertices = np.asarray(vertices, np.float32)
  faces = np.asarray(faces, np.int64)
  if uvs is not None and texture is not None:
    uv_faces = np.asarray(uv_faces, np.int64)
    # One glTF vertex per distinct (position, uv) corner pair.
    corners = np.stack([faces.reshape(-1), uv_faces.reshape(-1)], -1)
    unique, inverse = np.unique(corners, axis=0, return_inverse=True)
    mesh = trimesh.Trimesh(
      vertices=vertices[unique[:, 0]],
      faces=inverse.reshape(-1, 3),
      process=False,
      visual=trimesh.visual.TextureVisuals(
        uv=np.asarray(uvs, np.float32)[unique[:, 1]], image=Image.fromarray(to_uint8(texture))
      ),
    )
  else:
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
  data = mesh.export(file_type="glb")
  with atomic_write(path) as f:
    f.write(data)
