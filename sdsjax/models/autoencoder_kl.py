"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in Flax, NHWC.

`encode(images in [-1, 1]) -> (mean, logvar)` and `decode(z) -> images in [-1, 1]`; the bundle
applies `scaling_factor`. `remat` recomputes (parts of) the encoder blocks in the backward pass
(`remat_policy`), since SDS back-propagates through the encoder at 512² and its activations are
large.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sdsjax.models.attention import Attention
from sdsjax.models.module_config import module_from_config
from sdsjax.models.resnet import Downsample2D
from sdsjax.models.resnet import ResnetBlock2D
from sdsjax.models.resnet import Upsample2D
from sdsjax.models.resnet import conv


class VAEMidBlock(nn.Module):
  """UNetMidBlock2D: resnet -> single-head spatial self-attention -> resnet."""

  channels: int
  groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name="resnets_0")(x)
    x = Attention(
      1,
      self.channels,
      qkv_bias=True,
      upcast=True,
      group_norm_groups=self.groups,
      dtype=self.dtype,
      name="attentions_0",
    )(x)
    return ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
  out_channels: int
  num_layers: int
  add_downsample: bool
  groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, self.dtype, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock(nn.Module):
  out_channels: int
  num_layers: int
  add_upsample: bool
  groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, self.dtype, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


REMAT_POLICIES = ("auto", "convs", "blocks")


def remat_policy(name: str):
  """The jax.checkpoint policy of the encoder blocks: "blocks" recomputes them whole; "convs"
  keeps the convolution outputs and recomputes the norms, activations and attention; "auto"
  picks per backend. From XLA's temp memory and the time of an SD-1.5 VAE encode fwd+bwd at 512²
  (benchmarks/bench_vae_remat.py): on CPU, whole blocks saved little memory over no remat and
  cost a forward pass, while "convs" needed the least memory; on an H200 whole blocks saved
  memory and "convs" did not (see benchmarks/RESULTS.md)."""
  if name == "auto":
    name = "convs" if jax.default_backend() == "cpu" else "blocks"
  if name == "convs":
    return jax.checkpoint_policies.save_only_these_names("conv_out")
  if name == "blocks":
    return None
  raise ValueError(f"remat_policy {name!r}: expected one of {REMAT_POLICIES}")


class Encoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  remat: bool
  remat_policy: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    policy = remat_policy(self.remat_policy)
    block = nn.remat(DownEncoderBlock, policy=policy) if self.remat else DownEncoderBlock
    x = conv(self.block_out_channels[0], 3, "conv_in", self.dtype)(x)
    n = len(self.block_out_channels)
    for i, ch in enumerate(self.block_out_channels):
      x = block(
        ch, self.layers_per_block, i < n - 1, self.groups, self.dtype, name=f"down_blocks_{i}"
      )(x)
    mid = nn.remat(VAEMidBlock, policy=policy) if self.remat else VAEMidBlock
    x = mid(self.block_out_channels[-1], self.groups, self.dtype, name="mid_block")(x)
    x = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="conv_norm_out")(x)
    return conv(2 * self.latent_channels, 3, "conv_out", self.dtype)(nn.silu(x))


class Decoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  dtype: Any

  @nn.compact
  def __call__(self, z):
    channels = tuple(reversed(self.block_out_channels))
    x = conv(channels[0], 3, "conv_in", self.dtype)(z)
    x = VAEMidBlock(channels[0], self.groups, self.dtype, name="mid_block")(x)
    n = len(channels)
    for i, ch in enumerate(channels):
      x = UpDecoderBlock(
        ch, self.layers_per_block + 1, i < n - 1, self.groups, self.dtype, name=f"up_blocks_{i}"
      )(x)
    x = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="conv_norm_out")(x)
    return conv(self.out_channels, 3, "conv_out", self.dtype)(nn.silu(x))


class AutoencoderKL(nn.Module):
  """Fields are the VAE `config.json` keys."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Sequence[str] = ("DownEncoderBlock2D",) * 4
  up_block_types: Sequence[str] = ("UpDecoderBlock2D",) * 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  remat: bool = False
  remat_policy: str = "auto"  # see remat_policy()
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: dict, dtype=jnp.float32, **kw) -> AutoencoderKL:
    for key, kind in (
      ("down_block_types", "DownEncoderBlock2D"),
      ("up_block_types", "UpDecoderBlock2D"),
    ):
      bad = [b for b in config.get(key, ()) if b != kind]
      if bad:
        raise NotImplementedError(f"{key} {bad[0]} is not supported (only {kind})")
    return module_from_config(cls, config, dtype, **kw)

  def setup(self):
    self.encoder = Encoder(
      self.block_out_channels,
      self.layers_per_block,
      self.latent_channels,
      self.norm_num_groups,
      self.remat,
      self.remat_policy,
      self.dtype,
    )
    self.decoder = Decoder(
      self.block_out_channels,
      self.layers_per_block,
      self.out_channels,
      self.norm_num_groups,
      self.dtype,
    )
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

  def encode(self, images):
    """images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/8, W/8, latent_channels)."""
    chex.assert_rank(images, 4)
    moments = self.encoder(images.astype(self.dtype))
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """z (B, h, w, latent_channels) unscaled -> images (B, 8h, 8w, 3) in about [-1, 1]."""
    z = z.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images):
    mean, _ = self.encode(images)
    return self.decode(mean)
