"""ResNet blocks and resampling layers shared by the UNet and the VAE (NHWC)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv(features: int, kernel: int, name: str, dtype, stride: int = 1, padding: int | None = None):
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


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
