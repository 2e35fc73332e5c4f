"""PyTorch state dicts (diffusers / transformers layout) <-> Flax parameter trees.

Every rename between the two layouts lives here. The Flax modules name their parameters after
the PyTorch modules, so one set of rules maps every checkpoint, and a reader can match weights by
eye:

  key path    `down_blocks.0.attentions.1.proj_in.weight` -> ('down_blocks_0', 'attentions_1',
              'proj_in', <leaf>): a numeric part joins the name before it with '_'.
  legacy      VAE attention `query`/`key`/`value`/`proj_attn` (diffusers < 0.14 checkpoints)
              -> `to_q`/`to_k`/`to_v`/`to_out.0` (only right after an `attentions.N`).
  prefix      CLIP: the Flax tree mirrors transformers' `text_model.` root. State dicts without
              it get it prepended: transformers >= 5 saves CLIPTextModel without the prefix,
              while older checkpoints (e.g. SD's `text_encoder/model.safetensors`) have it.
  leaf        weight -> kernel  conv (O, I, kh, kw) -> (kh, kw, I, O); linear (O, I) -> (I, O)
              weight -> scale   norms (GroupNorm, LayerNorm)
              weight -> embedding  embeddings, unchanged
              bias   -> bias    unchanged

Which leaf a `weight` becomes is read off the target tree (from `jax.eval_shape` of the module's
init), so the rules never guess. `torch_state_shapes` is the inverse: the state-dict layout a
Flax tree corresponds to. Works on numpy arrays only: torch is not needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from sdsjax.errors import CheckpointError

# Buffers some checkpoints carry that are not parameters.
IGNORED_SUFFIXES = ("position_ids",)
# Old diffusers names of the VAE's mid-block attention projections -> current names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
# The PyTorch ModuleLists and Sequentials whose children are numbered. A Flax name `resnets_1`
# is the child `resnets.1`, while `linear_1` (TimestepEmbedding) is a plain attribute.
INDEXED_MODULES = frozenset(
  {
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "transformer_blocks",
    "to_out",
    "net",
    "layers",
  }
)
# Flax leaf names -> the PyTorch parameter name they come from.
TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def flax_path(key: str) -> tuple[str, ...]:
  """'down_blocks.0.resnets.1.conv1.weight' -> ('down_blocks_0', 'resnets_1', 'conv1', 'weight')."""
  out: list[str] = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    elif part in LEGACY_ATTENTION_NAMES and out and out[-1].startswith("attentions_"):
      out.append(LEGACY_ATTENTION_NAMES[part])
    else:
      out.append(part)
  return tuple(out)


def torch_key(path: tuple[str, ...]) -> str:
  """The inverse of `flax_path` with the leaf renamed: ('time_embedding', 'linear_1', 'kernel')
  -> 'time_embedding.linear_1.weight'; ('down_blocks_0', 'conv', 'kernel') -> dotted."""
  parts = []
  for part in path[:-1]:
    head, _, index = part.rpartition("_")
    parts.append(f"{head}.{index}" if head in INDEXED_MODULES and index.isdigit() else part)
  return ".".join([*parts, TORCH_LEAF_NAMES.get(path[-1], path[-1])])


def torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The PyTorch shape of a Flax leaf: kernels back to (O, I, kh, kw) or (O, I)."""
  if leaf == "kernel" and len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if leaf == "kernel" and len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def torch_state_shapes(target: Mapping) -> dict[str, tuple[int, ...]]:
  """The state-dict keys and shapes that `convert_state_dict` maps onto `target` (a Flax
  parameter tree of arrays or ShapeDtypeStructs), in the current diffusers / transformers names.
  """
  return {
    torch_key(path): torch_shape(tuple(leaf.shape), path[-1])
    for path, leaf in traverse_util.flatten_dict(dict(target)).items()
  }


def convert_leaf(value: np.ndarray, leaf: str, target_leaves: Mapping[str, Any]):
  """Returns (flax leaf name, array) for one PyTorch tensor named `leaf` ('weight' or 'bias')."""
  if leaf != "weight":
    return leaf, value
  if "kernel" in target_leaves:
    kernel_rank = len(target_leaves["kernel"].shape)
    if value.ndim == 4 and kernel_rank == 2 and value.shape[2:] == (1, 1):
      return "kernel", value[:, :, 0, 0].T  # a Linear stored as a 1x1 conv (old VAE attention)
    if value.ndim == 4:
      return "kernel", np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
      if kernel_rank == 4:  # a 1x1 conv stored as a Linear weight
        return "kernel", value.T[None, None]
      return "kernel", value.T
    return "kernel", value
  if "embedding" in target_leaves:
    return "embedding", value
  return "scale", value


def _with_root(state: Mapping[str, np.ndarray], target: Mapping) -> Mapping[str, np.ndarray]:
  """Prepends the target's single root module (CLIP's `text_model`) where the state lacks it."""
  if len(target) != 1:
    return state
  (root,) = target
  if any(k.startswith(root + ".") for k in state):
    return state
  return {f"{root}.{k}": v for k, v in state.items()}


def convert_state_dict(state: Mapping[str, np.ndarray], target: Mapping) -> dict:
  """Maps `state` onto the structure of `target` (arrays or ShapeDtypeStructs).

  Raises:
    CheckpointError: naming the first few missing, unexpected and mis-shaped keys.
  """
  target = dict(target.get("params", target))
  state = _with_root(state, target)
  flat_target = traverse_util.flatten_dict(target)
  by_module: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf in flat_target.items():
    by_module.setdefault(path[:-1], {})[path[-1]] = leaf

  flat_out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, mismatched = [], []
  for key, value in state.items():
    if key.endswith(IGNORED_SUFFIXES):
      continue
    path = flax_path(key)
    module, leaf = path[:-1], path[-1]
    leaves = by_module.get(module)
    if leaves is None or leaf not in ("weight", "bias"):
      unexpected.append(key)
      continue
    name, array = convert_leaf(np.asarray(value), leaf, leaves)
    if name not in leaves:
      unexpected.append(key)
      continue
    want = tuple(leaves[name].shape)
    if tuple(array.shape) != want:
      expected = torch_shape(want, name)
      if name == "kernel" and len(want) == 4 and np.ndim(value) == 2:
        expected = expected[:2]  # the 1x1 conv was stored as a Linear
      mismatched.append(f"{key} {tuple(np.shape(value))} vs expected {expected}")
      continue
    flat_out[(*module, name)] = array
  missing = [torch_key(p) for p in flat_target if p not in flat_out]
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"missing {_few(missing)}")
    if mismatched:
      parts.append(f"shape mismatch {_few(mismatched)}")
    if unexpected:
      parts.append(f"unexpected {_few(unexpected)}")
    raise CheckpointError("checkpoint does not match its config: " + "; ".join(parts))
  return traverse_util.unflatten_dict(flat_out)


def _few(items, n=3):
  more = f" (and {len(items) - n} more)" if len(items) > n else ""
  return ", ".join(items[:n]) + more
