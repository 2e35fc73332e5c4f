"""3×3 stride-1 convolution by Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray, 2016).

Each 4×4 block of output pixels is computed from a 6×6 input tile with 36 multiplies per
(input, output) channel pair instead of 144, so the GEMMs do 4× less work than a direct
convolution; the tile and kernel transforms around them are memory-bound. Used on CPU, where
XLA's own convolution is slower than oneDNN's (see `resnet.conv_algorithm` for where); in float32
only, since the transforms' coefficients (up to ±8) would amplify bfloat16's rounding. The result
differs from a direct convolution by ~2e-5 relative to its scale.

Layouts: x (B, H, W, Cin), kernel (3, 3, Cin, Cout) (HWIO), output (B, H, W, Cout), "SAME"
padding. The gradient w.r.t. x is again a Winograd convolution (of the output gradient with the
flipped kernel); the one w.r.t. the kernel falls back to XLA's.

The kernel transforms G·g·Gᵀ (`transform_kernel`, `transform_input_gradient_kernel`) depend on
the weights only. For frozen weights they can be computed once and passed in
(`resnet.prepare_winograd`), rather than recomputed in every call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

M = 4  # output tile side
A = M + 2  # input tile side (M + 3 - 1)

# Interpolation points 0, ±1, ±2 and ∞.
B_T = np.array(
  [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
  ],
  np.float64,
)
G = np.array(
  [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
  ],
  np.float64,
)
A_T = np.array(
  [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64
)


def _combine(matrix: np.ndarray, terms: list[jax.Array]) -> list[jax.Array]:
  """Rows of a small constant matrix applied to a list of arrays, skipping zero coefficients,
  so XLA sees a few fused adds instead of a tiny dense contraction."""
  out = []
  for row in matrix:
    acc = None
    for coef, term in zip(row, terms):
      if coef == 0:
        continue
      t = term if coef == 1 else -term if coef == -1 else term * jnp.asarray(coef, term.dtype)
      acc = t if acc is None else acc + t
    out.append(acc)
  return out


def _input_transform(x: jax.Array) -> jax.Array:
  """x (B, H, W, C) -> V (36, B·th·tw, C): B_T d B of every overlapping 6×6 tile d."""
  b, h, w, c = x.shape
  th, tw = -(-h // M), -(-w // M)
  # One pixel of "SAME" padding in front; behind, enough to give every tile its 6 rows/columns.
  xp = jnp.pad(x, ((0, 0), (1, M * (th + 1) - h - 1), (1, M * (tw + 1) - w - 1), (0, 0)))
  # Tile k spans rows 4k..4k+5: the 4 rows of block k and the first 2 of block k+1. Splitting
  # rows into (block, row-in-block) turns the overlapping windows into plain slices.
  xr = xp.reshape(b, th + 1, M, xp.shape[2], c)
  rows = [xr[:, i // M : i // M + th, i % M] for i in range(A)]  # (B, th, Wp, C)
  rows = jnp.stack(_combine(B_T, rows))  # (6, B, th, Wp, C)
  rr = rows.reshape(A, b, th, tw + 1, M, c)
  cols = [rr[:, :, :, j // M : j // M + tw, j % M] for j in range(A)]  # (6, B, th, tw, C)
  v = jnp.stack(_combine(B_T, cols), 1)  # (6, 6, B, th, tw, C)
  return v.reshape(A * A, b * th * tw, c)


def _output_transform(m: jax.Array, b: int, h: int, w: int) -> jax.Array:
  """m (36, B·th·tw, Cout) -> (B, H, W, Cout): A_T m A of every tile, tiles put in place."""
  th, tw = -(-h // M), -(-w // M)
  m = m.reshape(A, A, b, th, tw, -1)
  r = jnp.stack(_combine(A_T, [m[i] for i in range(A)]))  # (4, 6, B, th, tw, O)
  y = jnp.stack(_combine(A_T, [r[:, j] for j in range(A)]), -2)  # (4, B, th, tw, 4, O)
  y = y.transpose(1, 2, 0, 3, 4, 5).reshape(b, th * M, tw * M, -1)
  return y[:, :h, :w]


def transform_kernel(kernel: jax.Array) -> jax.Array:
  """kernel (3, 3, Cin, Cout) -> U (36, Cin, Cout) = G g G_T, as one (36×9)·(9×Cin·Cout)
  GEMM."""
  _, _, cin, cout = kernel.shape
  g2 = jnp.asarray(np.kron(G, G), kernel.dtype)
  return (g2 @ kernel.reshape(9, cin * cout)).reshape(A * A, cin, cout)


def transform_input_gradient_kernel(kernel: jax.Array) -> jax.Array:
  """kernel (3, 3, Cin, Cout) -> (36, Cout, Cin): the transform of the kernel rotated by 180°
  with its channel axes swapped, with which the input gradient is a Winograd convolution."""
  return transform_kernel(jnp.flip(kernel, (0, 1)).swapaxes(2, 3))


def _winograd(x: jax.Array, u: jax.Array) -> jax.Array:
  """x (B, H, W, Cin), U (36, Cin, Cout) -> (B, H, W, Cout)."""
  b, h, w, _ = x.shape
  v = _input_transform(x)
  m = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))  # 36 GEMMs (T, Cout)
  return _output_transform(m, b, h, w)


@jax.custom_vjp
def conv3x3_winograd(
  x: jax.Array,
  kernel: jax.Array,
  u: jax.Array | None = None,
  u_input_gradient: jax.Array | None = None,
) -> jax.Array:
  """ "SAME" 3×3 stride-1 convolution. x: (B, H, W, Cin); kernel: (3, 3, Cin, Cout) ->
  (B, H, W, Cout).

  `u` (36, Cin, Cout) = `transform_kernel(kernel)` and `u_input_gradient` (36, Cout, Cin) =
  `transform_input_gradient_kernel(kernel)` may be given precomputed; missing ones are computed
  here. They are taken as constants: their cotangents are zero, the kernel gets the convolution's
  gradient."""
  return _winograd(x, transform_kernel(kernel) if u is None else u)


def _fwd(x, kernel, u=None, u_input_gradient=None):
  y = _winograd(x, transform_kernel(kernel) if u is None else u)
  return y, (x, kernel, u_input_gradient)


def _bwd(res, dy):
  x, kernel, u_input_gradient = res
  # The input gradient of a "SAME" 3×3 convolution is the "SAME" convolution of dy with the
  # kernel rotated by 180° and its channel axes swapped.
  if u_input_gradient is None:
    u_input_gradient = transform_input_gradient_kernel(kernel)
  dx = _winograd(dy, u_input_gradient)
  _, kernel_vjp = jax.vjp(
    lambda k: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    ),
    kernel,
  )
  return dx, kernel_vjp(dy)[0], None, None


conv3x3_winograd.defvjp(_fwd, _bwd)
