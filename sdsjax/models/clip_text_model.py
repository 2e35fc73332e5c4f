"""The CLIP text encoder Stable Diffusion uses (transformers' CLIPTextModel) in Flax.

Returns the last hidden state after `final_layer_norm`, (B, 77, D), as SD pipelines use it.
Parameter names mirror transformers: `text_model/encoder/layers_0/self_attn/q_proj/...`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sdsjax.models.attention import attend
from sdsjax.models.module_config import module_from_config

_ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention with q/k/v/out projections."""

  hidden_size: int
  heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    q, k, v = (
      nn.Dense(self.hidden_size, dtype=self.dtype, name=n)(x)
      for n in ("q_proj", "k_proj", "v_proj")
    )
    out = attend(q, k, v, self.heads, causal=True)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  act: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(_ACTIVATIONS[self.act](x))


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  hidden_size: int
  heads: int
  intermediate_size: int
  act: str
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    ln = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name=name)
    x = x + CLIPAttention(self.hidden_size, self.heads, self.dtype, name="self_attn")(
      ln("layer_norm1")(x)
    )
    return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.act, self.dtype, name="mlp")(
      ln("layer_norm2")(x)
    )


class CLIPEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Any

  @nn.compact
  def __call__(self, ids):
    tok = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")(ids)
    pos = nn.Embed(
      self.max_position_embeddings, self.hidden_size, dtype=self.dtype, name="position_embedding"
    )(jnp.arange(ids.shape[1]))
    return tok + pos[None]


class CLIPEncoder(nn.Module):
  num_layers: int
  layer: dict

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = CLIPEncoderLayer(**self.layer, name=f"layers_{i}")(x)
    return x


class CLIPTextTransformer(nn.Module):
  config: dict  # CLIPTextModel's fields

  @nn.compact
  def __call__(self, input_ids):
    c = _Fields(**self.config)
    x = CLIPEmbeddings(
      c.vocab_size, c.hidden_size, c.max_position_embeddings, c.dtype, name="embeddings"
    )(input_ids)
    layer = dict(
      hidden_size=c.hidden_size,
      heads=c.num_attention_heads,
      intermediate_size=c.intermediate_size,
      act=c.hidden_act,
      eps=c.layer_norm_eps,
      dtype=c.dtype,
    )
    x = CLIPEncoder(c.num_hidden_layers, layer, name="encoder")(x)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, name="final_layer_norm")(x)


@dataclasses.dataclass(frozen=True)
class _Fields:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any


class CLIPTextModel(nn.Module):
  """Fields are the text encoder `config.json` keys."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: dict, dtype=jnp.float32, **kw) -> CLIPTextModel:
    if config.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
      raise NotImplementedError(f"hidden_act {config['hidden_act']!r} is not supported")
    return module_from_config(cls, config, dtype, **kw)

  @nn.compact
  def __call__(self, input_ids):
    """input_ids (B, L) int32 -> last hidden state after final_layer_norm (B, L, hidden_size)."""
    chex.assert_rank(input_ids, 2)
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(_Fields)}
    return CLIPTextTransformer(fields, name="text_model")(input_ids).astype(jnp.float32)
