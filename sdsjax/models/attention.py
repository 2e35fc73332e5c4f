"""Attention, the transformer block and Transformer2DModel (NHWC)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdsjax.models.resnet import Conv2D

# Non-GPU path budgets, in float32 logits: attention up to _SMALL_ELEMENTS (16 MB) in all heads
# at once is computed in one go; larger ones one head and _BLOCK_ELEMENTS (8 MB) of logits at a
# time, so a block stays in cache (measured best on a 2-core CPU at 4096 tokens).
_SMALL_ELEMENTS = 1 << 22
_BLOCK_ELEMENTS = 1 << 21


def _xla_attention(q, k, v, causal: bool):
  """Softmax attention on (..., T, d) x (..., S, d) -> (..., T, d), logits materialised."""
  logits = jnp.einsum("...td,...sd->...ts", q, k)
  if causal:
    t, s = logits.shape[-2:]
    mask = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jnp.einsum("...ts,...sd->...td", jax.nn.softmax(logits, axis=-1), v)


def attend(q, k, v, heads: int, upcast: bool = False, causal: bool = False):
  """Multi-head scaled dot-product attention, exact.

  q: (B, T, heads·d); k, v: (B, S, heads·d) -> (B, T, heads·d). On GPU it calls
  `jax.nn.dot_product_attention` (cuDNN flash attention where it applies). Elsewhere it
  computes long attention one head and one block of queries at a time (`lax.map`), each block
  against all keys, so its logits stay in cache (XLA:CPU's generic attention over 4096 tokens
  was 4x slower). Every query still sees all keys in one softmax: the result is exact.
  `upcast` computes in float32 (SD 2.x `upcast_attention`).
  """
  b, t, c = q.shape
  s = k.shape[1]
  d = c // heads
  dtype = q.dtype
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if jax.default_backend() == "gpu":
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return out.reshape(b, t, c).astype(dtype)

  split = lambda x: x.reshape(b, x.shape[1], heads, d).transpose(0, 2, 1, 3)
  q, k, v = split(q * jnp.asarray(d**-0.5, q.dtype)), split(k), split(v)
  block = t
  while block * s > _BLOCK_ELEMENTS and block % 2 == 0:
    block //= 2
  if causal or b * heads * t * s <= _SMALL_ELEMENTS:
    out = _xla_attention(q, k, v, causal)
  else:
    # One head at a time (a plain GEMM per block), `block` queries against all keys.
    q = q.reshape(b * heads, t // block, block, d)
    k, v = k.reshape(b * heads, s, d), v.reshape(b * heads, s, d)

    def one_head(qkv):
      qh, kh, vh = qkv  # (t // block, block, d), (s, d), (s, d)
      return jax.lax.map(lambda qb: _xla_attention(qb, kh, vh, False), qh)

    out = jax.lax.map(one_head, (q, k, v)).reshape(b, heads, t, d)
  return out.transpose(0, 2, 1, 3).reshape(b, t, c).astype(dtype)


class Attention(nn.Module):
  """to_q/to_k/to_v -> attention -> to_out.0, with diffusers' names.

  With `group_norm_groups` it is the VAE's spatial self-attention: GroupNorm first, a residual
  connection, inputs (B, H, W, C).
  """

  heads: int
  dim_head: int
  qkv_bias: bool = False
  upcast: bool = False
  group_norm_groups: int = 0
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    inner = self.heads * self.dim_head
    if self.group_norm_groups:
      residual = x
      b, h, w, c = x.shape
      x = nn.GroupNorm(
        self.group_norm_groups, epsilon=self.eps, dtype=self.dtype, name="group_norm"
      )(x).reshape(b, h * w, c)
    query_dim = x.shape[-1]
    context = x if context is None else context
    q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
    k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context)
    v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context)
    out = attend(q, k, v, self.heads, upcast=self.upcast)
    out = nn.Dense(query_dim, dtype=self.dtype, name="to_out_0")(out)
    if self.group_norm_groups:
      out = out.reshape(b, h, w, c) + residual
    return out


class GEGLU(nn.Module):
  """proj -> split -> value · GELU(gate) (exact GELU, as diffusers)."""

  inner_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    value, gate = jnp.split(nn.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x), 2, -1)
    return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net.0 (GEGLU) -> net.2 (Linear); net.1 is dropout."""

  dim: int
  mult: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

  dim: int
  heads: int
  dim_head: int
  upcast: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attn = lambda name: Attention(
      self.heads, self.dim_head, upcast=self.upcast, dtype=self.dtype, name=name
    )
    x = x + attn("attn1")(ln("norm1")(x))
    x = x + attn("attn2")(ln("norm2")(x), context)
    return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x))


class Transformer2DModel(nn.Module):
  """GroupNorm -> proj_in -> transformer blocks -> proj_out, residual.

  `use_linear_projection` (SD 2.x) makes proj_in/proj_out Linear on tokens; otherwise they
  are 1x1 convs on the feature map (SD 1.x).
  """

  heads: int
  dim_head: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  upcast: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    """x: (B, H, W, C); context: (B, L, D) -> (B, H, W, C)."""
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    residual = x
    x = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    if self.use_linear_projection:
      x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
    else:
      x = Conv2D(inner, 1, dtype=self.dtype, name="proj_in")(x).reshape(b, h * w, inner)
    for i in range(self.num_layers):
      x = BasicTransformerBlock(
        inner,
        self.heads,
        self.dim_head,
        upcast=self.upcast,
        dtype=self.dtype,
        name=f"transformer_blocks_{i}",
      )(x, context)
    if self.use_linear_projection:
      x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
    else:
      x = Conv2D(c, 1, dtype=self.dtype, name="proj_out")(x.reshape(b, h, w, inner))
    return x + residual
