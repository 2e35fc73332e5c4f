"""PyTorch state dicts (diffusers / transformers layout) -> Flax parameter trees.

The Flax modules name their parameters after the PyTorch modules, so one set of rules maps every
checkpoint, and a reader can match weights by eye:

  key path    `down_blocks.0.attentions.1.proj_in.weight` -> ('down_blocks_0', 'attentions_1',
              'proj_in', <leaf>): a numeric part joins the name before it with '_'.
  legacy      VAE attention `query`/`key`/`value`/`proj_attn` (diffusers < 0.14 checkpoints)
              -> `to_q`/`to_k`/`to_v`/`to_out.0` (only right after an `attentions.N`).
  leaf        weight -> kernel  conv (O, I, kh, kw) -> (kh, kw, I, O); linear (O, I) -> (I, O)
              weight -> scale   norms (GroupNorm, LayerNorm)
              weight -> embedding  embeddings, unchanged
              bias   -> bias    unchanged

  prefix      CLIP: the Flax tree mirrors transformers' `text_model.` root; state dicts without
              it (transformers >= 5 saves CLIPTextModel without the prefix, older
              checkpoints, e.g. SD's `text_encoder/model.safetensors`, have it) get it prepended.

Which leaf a `weight` becomes is read off the target tree (from `jax.eval_shape` of the module's
init), so the rules never guess. Works on numpy arrays only: torch is not needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sdsjax.errors import CheckpointError

# Buffers some checkpoints carry that are not parameters.
IGNORED_SUFFIXES = ("position_ids",)
# Old diffusers names of the VAE's mid-block attention projections -> current names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


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


def _flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, (*prefix, k)))
    else:
      flat[(*prefix, k)] = v
  return flat


def _torch_name(path: tuple[str, ...]) -> str:
  """Inverse of `flax_path` for messages: ('down_blocks_0', 'conv', 'kernel') -> dotted."""
  parts = []
  for p in path:
    head, _, tail = p.rpartition("_")
    parts.append(f"{head}.{tail}" if head and tail.isdigit() else p)
  return ".".join(parts)


def convert_state_dict(state: Mapping[str, np.ndarray], target: Mapping) -> dict:
  """Maps `state` onto the structure of `target` (arrays or ShapeDtypeStructs).

  Raises:
    CheckpointError: naming the first few missing, unexpected and mis-shaped keys.
  """
  target = dict(target.get("params", target)) if "params" in target else target
  flat_target = _flatten(target)
  if len(target) == 1:
    (root,) = target
    if not any(k.startswith(root + ".") for k in state):
      state = {f"{root}.{k}": v for k, v in state.items()}
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
      mismatched.append(
        f"{key} {tuple(np.shape(value))} vs expected "
        f"{_expected_torch_shape(want, name, np.ndim(value))}"
      )
      continue
    flat_out[(*module, name)] = array
  missing = [
    _torch_name(p[:-1]) + "." + ("bias" if p[-1] == "bias" else "weight")
    for p in flat_target
    if p not in flat_out
  ]
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"missing {_few(missing)}")
    if mismatched:
      parts.append(f"shape mismatch {_few(mismatched)}")
    if unexpected:
      parts.append(f"unexpected {_few(unexpected)}")
    raise CheckpointError("checkpoint does not match its config: " + "; ".join(parts))
  out: dict = {}
  for path, array in flat_out.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = array
  return out


def _expected_torch_shape(flax_shape, name, torch_ndim):
  if name == "kernel" and len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw) if torch_ndim == 4 else (o, i)
  if name == "kernel" and len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _few(items, n=3):
  more = f" (and {len(items) - n} more)" if len(items) > n else ""
  return ", ".join(items[:n]) + more
