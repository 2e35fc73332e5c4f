"""ResNet blocks and resampling layers shared by the UNet and the VAE (NHWC)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


# XLA:CPU's own convolution emitter is slow on small images with many channels (8²×1280: 115 ms
# against PyTorch's 42 ms, benchmarks/RESULTS.md), while its GEMMs keep pace with PyTorch's. So
# there a 3×3 convolution is done as one GEMM over the 9 shifted copies of the input (im2col).
# It loses on large images (the copies cost more than the GEMM gains), hence the size limit.
IM2COL_MAX_PIXELS = 256


def _as_matmul(x: jax.Array, kernel: int, stride: int) -> bool:
  if stride != 1 or jax.default_backend() != "cpu":
    return False
  # A 1×1 convolution is a plain GEMM, which XLA:CPU runs ~1.4× faster than its conv
  # (64²×320→320: 10.9 vs 15.7 ms); a 3×3 one only pays off on small images.
  return kernel == 1 or (kernel == 3 and x.shape[-3] * x.shape[-2] <= IM2COL_MAX_PIXELS)


def conv_im2col(x: jax.Array, kernel: jax.Array, padding: int = 1) -> jax.Array:
  """Stride-1 convolution as one matrix product. x: (B, H, W, Cin); kernel: (k, k, Cin, Cout)."""
  k = kernel.shape[0]
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
  # Channel blocks in (row, column) order of the kernel taps, matching kernel.reshape below.
  cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo] for i in range(k) for j in range(k)], -1)
  out = cols.reshape(b * ho * wo, k * k * c) @ kernel.reshape(k * k * c, -1)
  return out.reshape(b, ho, wo, -1)


class Conv2D(nn.Module):
  """A square convolution with `kernel` (k, k, Cin, Cout) and `bias` params, as `nn.Conv`
  names and shapes them (so checkpoints convert the same), computed by im2col where that is
  faster (see IM2COL_MAX_PIXELS)."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, Cin) -> (B, H', W', features)."""
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if _as_matmul(x, k, self.stride):
      y = conv_im2col(x, kernel, self.padding)
    else:
      pad = (self.padding, self.padding)
      y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), (pad, pad),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


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
