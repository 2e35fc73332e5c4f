"""Priors that keep a fitted head human: a Gaussian prior per parameter group, a fold-over
penalty on the shape and a smoothness prior on the texture. `Priors` is the config's `prior`
section; `sdsjax.fit_step.make_optimizer` applies them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sdsjax import shading
from sdsjax import unrolled
from sdsjax.field_checks import bounded
from sdsjax.field_checks import check_fields


@dataclasses.dataclass(frozen=True)
class Priors:
  """Regularisers, added to the clipped SDS gradient before Adam (so they are scale-free).

  `identity`, `expression` and `pose` are λ of a Gaussian prior −log p = ½λ‖x‖² on each
  parameter group: its gradient λx is added after gradient clipping, where the SDS gradient's
  norm is at most `grad_clip`, so λ = 0.1 balances a full-strength push at ‖x‖ = 10·grad_clip.
  `fold` weighs a penalty on faces whose normal turns more than acos(fold_cos) away from the
  mean shape's (creases and self-intersections start as such fold-overs).
  `bound` keeps identity and expression weights within ±bound σ (projected after each step;
  0: unbounded): the range a head model is built to stay plausible in, so the weak Gaussian
  terms shrink what the renders barely see while a strong, steady SDS push (CFG at 100
  exaggerates) cannot carry a weight into a caricature.
  """

  identity: float = bounded(0.003, 0.0, 1e3)
  expression: float = bounded(0.003, 0.0, 1e3)
  pose: float = bounded(1.0, 0.0, 1e3)
  fold: float = bounded(1.0, 0.0, 1e6)
  fold_cos: float = bounded(0.5, -1.0, 1.0)
  bound: float = bounded(3.0, 0.0, 1e3)

  def __post_init__(self):
    check_fields(self)


def fold_penalty(verts: jax.Array, faces: jax.Array, rest_normals: jax.Array, cos_min: float):
  """Mean over faces of relu(cos_min − n·n_rest)²: faces that turn (fold) away from the mean.

  Within the model's plausible range faces turn little, so the penalty is 0 there and does not
  bias a fit; folds and self-intersections begin as faces that flip.
  """
  normals = shading.face_normals(verts, faces)
  cos = unrolled.dot_last(normals, rest_normals)
  return jnp.mean(jax.nn.relu(cos_min - cos) ** 2)


def texture_smoothness(texture):
  """Mean squared difference between neighbouring texels of (Ht, Wt, 3): a Laplacian prior."""
  dy = texture[1:] - texture[:-1]
  dx = texture[:, 1:] - texture[:, :-1]
  return jnp.mean(dy**2) + jnp.mean(dx**2)
