"""The Stable Diffusion UNet (diffusers' UNet2DConditionModel) in Flax, NHWC.

Fields are the checkpoint's `config.json` keys. Parameter names follow the PyTorch modules
(`down_blocks_0/attentions_1/...`), see `sdsjax.models.convert`.

Heads: as in diffusers, when `num_attention_heads` is null the config's `attention_head_dim`
is the number of HEADS per block (a famous misnomer), and each head has out_channels / heads dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from sdsjax.models.attention import Transformer2DModel
from sdsjax.models.embeddings import TimestepEmbedding
from sdsjax.models.embeddings import timestep_embedding
from sdsjax.models.module_config import module_from_config
from sdsjax.models.resnet import Downsample2D
from sdsjax.models.resnet import ResnetBlock2D
from sdsjax.models.resnet import Upsample2D
from sdsjax.models.resnet import conv

_SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value, n: int) -> tuple:
  return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


class DownBlock(nn.Module):
  """(CrossAttn)DownBlock2D: resnets (+ transformers), then an optional stride-2 conv."""

  out_channels: int
  num_layers: int
  heads: int
  cross_attention: bool
  add_downsample: bool
  groups: int
  eps: float
  transformer_layers: int
  use_linear_projection: bool
  upcast: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.eps, self.dtype, name=f"resnets_{i}")(
        x, temb
      )
      if self.cross_attention:
        x = Transformer2DModel(
          self.heads,
          self.out_channels // self.heads,
          self.transformer_layers,
          self.groups,
          self.use_linear_projection,
          self.upcast,
          self.dtype,
          name=f"attentions_{i}",
        )(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class UpBlock(nn.Module):
  """(CrossAttn)UpBlock2D: resnets on [x, skip] (+ transformers), then an optional upsample."""

  out_channels: int
  num_layers: int
  heads: int
  cross_attention: bool
  add_upsample: bool
  groups: int
  eps: float
  transformer_layers: int
  use_linear_projection: bool
  upcast: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, skips, temb, context):
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = ResnetBlock2D(self.out_channels, self.groups, self.eps, self.dtype, name=f"resnets_{i}")(
        x, temb
      )
      if self.cross_attention:
        x = Transformer2DModel(
          self.heads,
          self.out_channels // self.heads,
          self.transformer_layers,
          self.groups,
          self.use_linear_projection,
          self.upcast,
          self.dtype,
          name=f"attentions_{i}",
        )(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet -> transformer -> resnet."""

  channels: int
  heads: int
  groups: int
  eps: float
  transformer_layers: int
  use_linear_projection: bool
  upcast: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, temb, context):
    x = ResnetBlock2D(self.channels, self.groups, self.eps, self.dtype, name="resnets_0")(x, temb)
    x = Transformer2DModel(
      self.heads,
      self.channels // self.heads,
      self.transformer_layers,
      self.groups,
      self.use_linear_projection,
      self.upcast,
      self.dtype,
      name="attentions_0",
    )(x, context)
    return ResnetBlock2D(self.channels, self.groups, self.eps, self.dtype, name="resnets_1")(
      x, temb
    )


class UNet2DConditionModel(nn.Module):
  """ε (or v) prediction: (B, H, W, 4) latents, (B,) timesteps, (B, L, D) text -> (B, H, W, 4)."""

  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_head_dim: Any = 8
  num_attention_heads: Any = None
  cross_attention_dim: int = 768
  transformer_layers_per_block: Any = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: dict, dtype=jnp.float32, **kw) -> UNet2DConditionModel:
    for key, value in (("down_block_types", _SUPPORTED_DOWN), ("up_block_types", _SUPPORTED_UP)):
      bad = [b for b in config.get(key, ()) if b not in value]
      if bad:
        raise NotImplementedError(f"{key} {bad[0]} is not supported (only {', '.join(value)})")
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim"):
      if config.get(key) is not None:
        raise NotImplementedError(f"{key}={config[key]!r} is not supported")
    return module_from_config(cls, config, dtype, **kw)

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states):
    chex.assert_rank([sample, encoder_hidden_states], [4, 3])
    n = len(self.block_out_channels)
    heads = _per_block(self.num_attention_heads or self.attention_head_dim, n)
    layers = _per_block(self.transformer_layers_per_block, n)
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    c0 = self.block_out_channels[0]
    temb = timestep_embedding(timesteps, c0, self.flip_sin_to_cos, self.freq_shift)
    temb = TimestepEmbedding(4 * c0, dtype=self.dtype, name="time_embedding")(
      temb.astype(self.dtype)
    )
    context = encoder_hidden_states.astype(self.dtype)
    common = dict(
      groups=self.norm_num_groups,
      eps=self.norm_eps,
      use_linear_projection=self.use_linear_projection,
      upcast=self.upcast_attention,
      dtype=self.dtype,
    )

    x = conv(c0, 3, "conv_in", self.dtype)(sample.astype(self.dtype))
    skips = [x]
    for i, kind in enumerate(self.down_block_types):
      x, block_skips = DownBlock(
        self.block_out_channels[i],
        self.layers_per_block,
        heads[i],
        kind.startswith("CrossAttn"),
        i < n - 1,
        transformer_layers=layers[i],
        name=f"down_blocks_{i}",
        **common,
      )(x, temb, context)
      skips += block_skips
    x = MidBlock(
      self.block_out_channels[-1],
      heads[-1],
      transformer_layers=layers[-1],
      name="mid_block",
      **common,
    )(x, temb, context)
    rev_channels = tuple(reversed(self.block_out_channels))
    rev_heads, rev_layers = tuple(reversed(heads)), tuple(reversed(layers))
    for i, kind in enumerate(self.up_block_types):
      x = UpBlock(
        rev_channels[i],
        self.layers_per_block + 1,
        rev_heads[i],
        kind.startswith("CrossAttn"),
        i < n - 1,
        transformer_layers=rev_layers[i],
        name=f"up_blocks_{i}",
        **common,
      )(x, skips, temb, context)
    x = nn.GroupNorm(
      self.norm_num_groups, epsilon=self.norm_eps, dtype=self.dtype, name="conv_norm_out"
    )(x)
    x = conv(self.out_channels, 3, "conv_out", self.dtype)(nn.silu(x))
    return x.astype(jnp.float32)
