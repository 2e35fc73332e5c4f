"""The texture's optimiser coordinates: a pyramid of textures whose upsampled sum is the texture.

A per-texel Adam moves every texel by about its lr each step, however little signal the texel
gets: under SDS noise the texels that the renders show rarely random-walk, and those that no
view shows keep their start. In pyramid coordinates x = P·u = Σ_l up(u_l), with u_l at
R/2^l texels per side, a coarse texel gathers the gradient of the 4^l fine texels under it
(Pᵀ·g), so it sees their summed signal against averaged noise, and it fills the texels that
no view shows from their neighbours. The finest level is the plain texture, so nothing a
per-texel fit can represent is lost; only the path there starts with the broad colours. It is
the explicit form of the spectral bias that DreamFusion's MLP and Fantasia3D's multi-resolution
hash grid give their textures.

The texture itself stays the parameter (checkpoints and exports keep one (R, R, C) array);
only the optimiser's state lives on the levels: `in_pyramid(adam, coarsest)` is P·adam(Pᵀ·g).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax


def level_sizes(resolution: int, coarsest: int) -> tuple[int, ...]:
  """Sides of the pyramid's levels, finest first: R, R/2, ... while they halve exactly and
  stay ≥ `coarsest` (≥ R: the plain texture alone)."""
  sizes = [resolution]
  while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= max(coarsest, 1):
    sizes.append(sizes[-1] // 2)
  return tuple(sizes)


def expand(pyramid: tuple[jax.Array, ...]) -> jax.Array:
  """P·u: (R, R, C) sum of the levels, each bilinearly upsampled to the finest level's size."""
  finest = pyramid[0].shape
  return sum(jax.image.resize(u, finest, method="linear") for u in pyramid)


def reduce(texture: jax.Array, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """Pᵀ·g: the (R, R, C) gradient `texture` taken to each level (the adjoint of `expand`)."""
  chex.assert_rank(texture, 3)
  levels = tuple(jax.ShapeDtypeStruct((s, s, texture.shape[-1]), texture.dtype) for s in sizes)
  (pyramid,) = jax.linear_transpose(expand, levels)(texture)
  return pyramid


def in_pyramid(inner: optax.GradientTransformation, coarsest: int) -> optax.GradientTransformation:
  """Runs `inner` (e.g. Adam) on each (R, R, C) leaf's pyramid, levels down to `coarsest`
  texels per side (`level_sizes`): the update is P·inner(Pᵀ·g).

  `inner` must not need the params (its `params` argument is None). A leaf whose pyramid is
  one level gets `inner`'s own update (its state holds a 1-tuple per leaf).
  """

  def sizes_of(x):
    chex.assert_rank(x, 3)
    return level_sizes(x.shape[0], coarsest)

  # The leaves go to `inner` as a list of level tuples (optax.partition's MaskedNode
  # placeholders have no leaves, so they drop out here and come back with the treedef).
  def init(params):
    zeros = lambda x: tuple(jnp.zeros((s, s, x.shape[-1]), x.dtype) for s in sizes_of(x))
    return inner.init([zeros(x) for x in jax.tree.leaves(params)])

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    steps, state = inner.update([reduce(g, sizes_of(g)) for g in leaves], state)
    return treedef.unflatten([expand(s) for s in steps]), state

  return optax.GradientTransformation(init, update)
