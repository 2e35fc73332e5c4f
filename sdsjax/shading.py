"""Lambertian shading on top of the soft rasterizer: `render_soft`.

Per fragment (pixel p, selected face f, perspective-correct barycentrics b):

* normal `n = normalize(Σ_i b_i N_{f_i})` with smooth area-weighted vertex normals N
  (computed from `verts`, so differentiable), or the face normal with `smooth_normals=False`;
* albedo = `sample_texture(texture, Σ_i b_i uv_{uv_faces[f, i]})` (bilinear, v up, clamped at
  the borders), or the constant grey `albedo` when there is no texture; `light.textureless`
  blends towards the grey (1 = grey only);
* colour = albedo · (ambient + diffuse · max(0, n · light.direction)).

Fragments are then blended with `raster.blend` (by default layered compositing: a pixel
inside the mesh takes the colour of the nearest face containing its centre, the outline
fringes of nearer surfaces blend over it, and alpha is soft outside the silhouette only;
see `sdsjax.raster`). The depth and normal outputs are hard: those of the nearest face
containing the pixel centre (slot 0 of the selection when it is inside), 0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import struct

from sdsjax import camera as camera_lib
from sdsjax import raster
from sdsjax import unrolled

Array = jax.Array

DEFAULT_ALBEDO = (0.7, 0.7, 0.7)


@struct.dataclass
class RenderOutput:
  """One rendered view.

  Attributes:
    rgb: (H, W, 3) blended colour in [0, 1] (background where empty).
    alpha: (H, W) soft silhouette (`raster.fragment_alpha`: 1 where a face covers the
      pixel centre, else the outline fringe, with the default `blend="layered"`).
    depth: (H, W) view-space distance along −z of the nearest face covering the pixel
      centre (0 where empty).
    normals: (H, W, 3) world-space unit shading normal of that face at the pixel (0 where
      empty).
    overflow: () int32 (tile, face) overlaps dropped because a bin was full.
  """

  rgb: Array
  alpha: Array
  depth: Array
  normals: Array
  overflow: Array


def _normalize(v: Array) -> Array:
  return unrolled.normalize_last(v, 1e-20)


def face_normals(verts: Array, faces: Array) -> Array:
  """(F, 3) unit normals of counter-clockwise faces (outward)."""
  tri = verts[faces]
  return _normalize(unrolled.cross3(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]))


def vertex_normals(verts: Array, faces: Array) -> Array:
  """(V, 3) smooth unit vertex normals: area-weighted sums of the adjacent face normals."""
  tri = verts[faces]
  weighted = unrolled.cross3(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # |n| = 2 · area
  sums = jnp.zeros_like(verts).at[faces.reshape(-1)].add(jnp.repeat(weighted, 3, axis=0))
  return _normalize(sums)


def sample_texture(texture: Array, uv: Array) -> Array:
  """Bilinear texture lookup, differentiable w.r.t. `texture` and `uv`.

  Args:
    texture: (Ht, Wt, C); row 0 is the top of the image (v = 1).
    uv: (..., 2) in [0, 1], v up (OBJ convention); clamped to the border texels.

  Returns:
    (..., C) sampled values.
  """
  chex.assert_rank(texture, 3)
  chex.assert_axis_dimension(uv, -1, 2)
  height, width = texture.shape[0], texture.shape[1]
  x = uv[..., 0] * width - 0.5
  y = (1.0 - uv[..., 1]) * height - 0.5
  x = jnp.clip(x, 0.0, width - 1.0)
  y = jnp.clip(y, 0.0, height - 1.0)
  x0 = jnp.clip(jnp.floor(x), 0, width - 2 if width > 1 else 0)
  y0 = jnp.clip(jnp.floor(y), 0, height - 2 if height > 1 else 0)
  fx = (x - x0)[..., None]
  fy = (y - y0)[..., None]
  ix0, iy0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  ix1 = jnp.minimum(ix0 + 1, width - 1)
  iy1 = jnp.minimum(iy0 + 1, height - 1)
  top = texture[iy0, ix0] * (1.0 - fx) + texture[iy0, ix1] * fx
  bottom = texture[iy1, ix0] * (1.0 - fx) + texture[iy1, ix1] * fx
  return top * (1.0 - fy) + bottom * fy


def render_soft(
  verts: Array,
  faces: Array,
  camera: camera_lib.Camera,
  light: camera_lib.Light,
  settings: raster.RasterSettings,
  texture: Array | None = None,
  uvs: Array | None = None,
  uv_faces: Array | None = None,
  background: Sequence[float] | Array = (1.0, 1.0, 1.0),
  albedo: Sequence[float] | Array = DEFAULT_ALBEDO,
  smooth_normals: bool = True,
) -> RenderOutput:
  """Renders a mesh with the soft rasterizer and Lambertian shading.

  Jits with `settings` and `smooth_normals` static (RasterSettings is a leafless pytree,
  so it can also be passed as an ordinary argument); vmaps over cameras, lights, vertex
  sets and textures.

  Args:
    verts: (V, 3) world-space vertices.
    faces: (F, 3) int32, counter-clockwise seen from outside.
    camera: the camera.
    light: the light (direction, ambient, diffuse, textureless).
    settings: raster settings; images are `settings.image_size` squared.
    texture: optional (Ht, Wt, 3) albedo texture in [0, 1].
    uvs: (T, 2) texture coordinates; required with `texture`.
    uv_faces: (F, 3) int32 indices into `uvs` (separate from `faces` for seams); defaults
      to `faces` when `uvs` is per vertex.
    background: (3,) colour or (H, W, 3) image behind the mesh.
    albedo: (3,) grey albedo used without a texture and for textureless renders.
    smooth_normals: interpolate smooth vertex normals (else flat face normals).

  Returns:
    The render (see `RenderOutput`).
  """
  chex.assert_rank(verts, 2)
  chex.assert_axis_dimension(verts, 1, 3)
  chex.assert_rank(faces, 2)
  chex.assert_axis_dimension(faces, 1, 3)
  dtype = verts.dtype
  size = settings.image_size
  if texture is not None:
    if uvs is None:
      raise ValueError("render_soft: a texture needs uvs (and uv_faces for seams).")
    chex.assert_rank(texture, 3)
    chex.assert_axis_dimension(texture, 2, 3)
    if uv_faces is None:
      uv_faces = faces
    chex.assert_equal_shape([faces, uv_faces])
  faces = faces.astype(jnp.int32)

  projected = raster.project_mesh(verts, faces, camera, settings)
  face_ids, overflow = raster.select_faces(projected, settings)
  pixels = camera_lib.pixel_centers(size, dtype)
  background = jnp.broadcast_to(jnp.asarray(background, dtype), (size, size, 3))
  grey = jnp.asarray(albedo, dtype)
  if smooth_normals:
    normal_table = vertex_normals(verts, faces)[faces].reshape(-1, 9)  # (F, 3 corners · 3)
  else:
    normal_table = jnp.tile(face_normals(verts, faces), (1, 3))
  # One packed per-face table, gathered once per fragment.
  if texture is None:
    table = normal_table
  else:
    table = jnp.concatenate([normal_table, uvs.astype(dtype)[uv_faces].reshape(-1, 6)], -1)

  def shade_chunk(chunk):
    ids, pix, bg = chunk
    frags = raster.evaluate_fragments(projected, ids, pix, settings)
    gathered = table[jnp.maximum(ids, 0)]  # (P, K, 9 or 15)
    b = [frags.bary[..., i] for i in range(3)]  # 3 × (P, K)

    def interpolate(first: int, width: int) -> Array:
      cols = [
        sum(b[c] * gathered[..., first + width * c + j] for c in range(3)) for j in range(width)
      ]
      return jnp.stack(cols, axis=-1)

    normals = _normalize(interpolate(0, 3))  # (P, K, 3)
    if texture is None:
      base = jnp.broadcast_to(grey, normals.shape)
    else:
      textured = sample_texture(texture.astype(dtype), interpolate(9, 2))
      base = light.textureless * grey + (1.0 - light.textureless) * textured
    lambert = jnp.maximum(unrolled.dot_last(normals, light.direction, keepdims=True), 0.0)
    colors = base * (light.ambient + light.diffuse * lambert)
    rgb, alpha = raster.blend(colors, frags, bg, settings)
    hit = frags.inside[..., 0]
    depth = jnp.where(hit, frags.depth[..., 0], 0.0)
    normal = jnp.where(hit[..., None], normals[..., 0, :], 0.0)
    return rgb, alpha, depth, normal

  rgb, alpha, depth, normal = raster.map_pixel_chunks(
    shade_chunk, (face_ids, pixels, background), settings
  )
  return RenderOutput(rgb=rgb, alpha=alpha, depth=depth, normals=normal, overflow=overflow)
