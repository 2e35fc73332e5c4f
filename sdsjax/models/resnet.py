"""ResNet blocks and resampling layers shared by the UNet and the VAE (NHWC)."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.ad_checkpoint import checkpoint_name

from sdsjax.models import winograd

# XLA:CPU's own convolution trails oneDNN's (PyTorch) by 10-20%, while its GEMMs keep pace. So on
# CPU a convolution becomes GEMMs where that is faster (benchmarks/bench_ops.py, ms vs XLA's):
# - 1×1: a plain GEMM (64²×320→320: 11.8 vs 15.9).
# - 3×3 on images of ≤ 8²: one im2col GEMM over the 9 shifted copies (8²×1280: 33 vs 41).
# - 3×3 on larger images, float32, ≥ 32 channels: Winograd F(4,3), 4× fewer multiplies
#   (64²×320: 34 vs 89; 128²×512: 140 vs 380; 512²×128: 332 vs 392).
# Few channels (the RGB input, the 4-channel latents) leave the transforms nothing to amortise.
IM2COL_MAX_PIXELS = 64
WINOGRAD_MIN_CHANNELS = 32

# Optional leaves beside a Conv2D's `kernel` and `bias`: its Winograd kernel transforms, computed
# once for frozen weights by `prepare_winograd`, and otherwise in every call.
WINOGRAD_KERNEL = "winograd_kernel"  # (36, Cin, Cout) winograd.transform_kernel(kernel)
WINOGRAD_INPUT_GRADIENT_KERNEL = "winograd_input_gradient_kernel"  # (36, Cout, Cin)
# The collection in which a Conv2D that computes by Winograd marks itself (prepare_winograd).
_WINOGRAD_CONVS = "winograd_convs"


def conv_algorithm(x: jax.Array, kernel: int, out_channels: int, stride: int, padding: int) -> str:
  """How Conv2D computes: "xla" (lax.conv_general_dilated), "matmul", "im2col" or "winograd"."""
  if stride != 1 or jax.default_backend() != "cpu":
    return "xla"
  if kernel == 1 and padding == 0:
    return "matmul"
  if kernel != 3:
    return "xla"
  if x.shape[-3] * x.shape[-2] <= IM2COL_MAX_PIXELS:
    return "im2col"
  if (
    padding == 1
    and x.dtype == jnp.float32
    and min(x.shape[-1], out_channels) >= WINOGRAD_MIN_CHANNELS
  ):
    return "winograd"
  return "xla"


def conv_im2col(x: jax.Array, kernel: jax.Array, padding: int = 1) -> jax.Array:
  """Stride-1 convolution as one matrix product. x: (B, H, W, Cin); kernel: (k, k, Cin, Cout)."""
  k = kernel.shape[0]
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
  # Channel blocks in (row, column) order of the kernel taps, matching kernel.reshape below.
  cols = jnp.concatenate([xp[:, i : i + ho, j : j + wo] for i in range(k) for j in range(k)], -1)
  out = cols.reshape(b * ho * wo, k * k * c) @ kernel.reshape(k * k * c, -1)
  return out.reshape(b, ho, wo, -1)


class Conv2D(nn.Module):
  """A square convolution with `kernel` (k, k, Cin, Cout) and `bias` params, as `nn.Conv`
  names and shapes them (so checkpoints convert the same), computed as GEMMs where that is
  faster (see `conv_algorithm`)."""

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, Cin) -> (B, H', W', features)."""
    k = self.kernel_size
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    algorithm = conv_algorithm(x, k, self.features, self.stride, self.padding)
    if algorithm == "winograd":
      if self.is_mutable_collection(_WINOGRAD_CONVS):
        self.put_variable(_WINOGRAD_CONVS, "uses_winograd", jnp.ones((), jnp.bool_))
      prepared = (
        self.get_variable("params", name) if self.has_variable("params", name) else None
        for name in (WINOGRAD_KERNEL, WINOGRAD_INPUT_GRADIENT_KERNEL)
      )
      y = winograd.conv3x3_winograd(x, kernel, *prepared)
    elif algorithm in ("matmul", "im2col"):
      y = conv_im2col(x, kernel, self.padding)
    else:
      pad = (self.padding, self.padding)
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (self.stride, self.stride),
        (pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
    # Named so that a remat policy can keep convolution outputs (autoencoder_kl.Encoder).
    return checkpoint_name(y + bias, "conv_out")


def prepare_winograd(
  module: nn.Module,
  params: Mapping,
  inputs: Sequence[Any],
  method=None,
  input_gradients: bool = False,
) -> dict:
  """`params` plus the Winograd kernel transforms of every Conv2D that computes by Winograd in
  `module.apply({"params": params}, *inputs, method=method)`, for frozen weights.

  Which convolutions use Winograd depends on the backend and the input sizes (`conv_algorithm`):
  `inputs` need only have the shapes and dtypes of the real ones (a batch of 1 is enough; this
  traces the module without running it). `input_gradients` adds the transforms for the gradient
  w.r.t. the convolutions' inputs (4× the kernel's size each, like the forward one). Results are
  the same as without them; other Conv2Ds compute as before. On an accelerator nothing changes.
  """
  params = dict(params)
  marks = jax.eval_shape(
    lambda p, args: module.apply({"params": p}, *args, method=method, mutable=[_WINOGRAD_CONVS]),
    params,
    tuple(inputs),
  )[1]
  convs = [path[:-1] for path in traverse_util.flatten_dict(dict(marks.get(_WINOGRAD_CONVS, {})))]
  if not convs:
    return params
  flat = traverse_util.flatten_dict(params)
  kernels = [flat[(*conv, "kernel")] for conv in convs]

  @jax.jit
  def transforms(kernels):
    out = [{WINOGRAD_KERNEL: winograd.transform_kernel(k)} for k in kernels]
    if input_gradients:
      for leaves, k in zip(out, kernels):
        leaves[WINOGRAD_INPUT_GRADIENT_KERNEL] = winograd.transform_input_gradient_kernel(k)
    return out

  for conv, leaves in zip(convs, transforms(kernels)):
    flat.update({(*conv, name): value for name, value in leaves.items()})
  return traverse_util.unflatten_dict(flat)


def conv(features: int, kernel: int, name: str, dtype, stride: int = 1, padding: int | None = None):
  pad = kernel // 2 if padding is None else padding
  return Conv2D(features, kernel, stride=stride, padding=pad, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """norm1 -> SiLU -> conv1 (+ time embedding) -> norm2 -> SiLU -> conv2, plus a shortcut.

  The 1x1 `conv_shortcut` exists when the input and output channels differ, as in diffusers.
  """

  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    """x: (B, H, W, Cin); temb: (B, Ct) or None -> (B, H, W, out_channels)."""
    h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
    h = conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(h))
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h)
    h = conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Downsample2D(nn.Module):
  """3x3 stride-2 conv. `padding=0` pads right/bottom by one first (the VAE encoder's variant)."""

  out_channels: int
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.out_channels, 3, "conv", self.dtype, stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.out_channels, 3, "conv", self.dtype)(x)
