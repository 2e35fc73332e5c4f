"""A second start without tracing: the fit step's lowered program, saved with `jax.export`.

JAX's persistent compilation cache (`--compile-cache`) skips XLA's compile on a later start, but
not the tracing and lowering of the step in Python that come before it. For tiny on CPU that is
most of what is left: 5.3 s of tracing and 1.3 s of lowering against 1.6 s to read the cached
executable. `compile_step` saves the lowered program (StableHLO, `jax.export`) under a key of
everything its trace depends on, and on a later start compiles the saved program without
tracing; XLA's cache then supplies the executable. The result is the same program: its outputs
are bitwise those of a traced one.

The key covers the caller's identity (config, head arrays, model configs), the argument shapes,
dtypes and shardings, the devices, JAX's trace-affecting flags, the versions of the packages
that trace, and the source of sdsjax itself, so an edit to the code never reuses a stale program.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

FORMAT = 1  # bump when what is saved changes
MAX_PROGRAMS = 32  # the oldest are removed beyond this (a tiny program is ~8 MB)
SUFFIX = ".jaxexport"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
  """sha256 of every Python file of the sdsjax package (names and contents)."""
  root = Path(__file__).resolve().parent
  digest = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()


def array_digest(tree) -> str:
  """sha256 of a pytree's structure and its arrays' dtypes, shapes and bytes."""
  leaves, treedef = jax.tree.flatten(tree)
  digest = hashlib.sha256(str(treedef).encode())
  for leaf in leaves:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
  return digest.hexdigest()


def _environment() -> dict:
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  flags = {k: repr(v) for k, v in sorted(jax.config.values.items()) if "cache" not in k}
  devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
  return {"versions": versions, "flags": flags, "devices": devices, "source": source_digest()}


def _signature(args) -> list:
  leaves, treedef = jax.tree.flatten(args)
  return [str(treedef)] + [
    (str(x.dtype), tuple(x.shape), str(getattr(x, "sharding", None))) for x in leaves
  ]


def program_key(identity: Any, args: tuple) -> str:
  """The file name stem of the program `step(*args)` made from what `identity` names."""
  text = json.dumps(
    [FORMAT, identity, _signature(args), _environment()], sort_keys=True, default=repr
  )
  return hashlib.sha256(text.encode()).hexdigest()[:40]


class CachedProgram:
  """A compiled `step(state, *rest) -> (state, metrics)` over flattened arguments, called with
  the pytrees as the traced step is."""

  def __init__(self, compiled, treedefs):
    self.compiled = compiled
    self.treedefs = treedefs

  def __call__(self, *args):
    state_leaves, metrics = self.compiled(*(jax.tree.leaves(a) for a in args))
    return jax.tree.unflatten(self.treedefs[0], state_leaves), metrics

  def memory_analysis(self):
    return self.compiled.memory_analysis()


def compile_step(step_fn, args: tuple, identity: Any, folder: Path | None):
  """`step_fn.lower(*args).compile()`, through the program cache in `folder` where it can be.

  `step_fn` is a `jax.jit` function `(state, *rest) -> (state, metrics)` that donates its state;
  `metrics` is a dict of arrays. Anything else (no folder, several processes, a step that is not
  a jit function, a program that cannot be exported) compiles the plain way: a cache never
  stops a run.
  """
  if folder is None or jax.process_count() > 1 or not hasattr(step_fn, "trace"):
    return step_fn.lower(*args).compile()
  flat_args = [jax.tree.leaves(a) for a in args]
  treedefs = [jax.tree.structure(a) for a in args]
  path = Path(folder) / (program_key(identity, args) + SUFFIX)
  saved = _read(path)
  if saved is not None:
    try:
      return CachedProgram(_compile_exported(saved, flat_args), treedefs)
    except Exception:  # e.g. written by another JAX that read it differently: made again
      path.unlink(missing_ok=True)

  def flat_step(*flat):
    state, metrics = step_fn(*(jax.tree.unflatten(d, x) for d, x in zip(treedefs, flat)))
    return jax.tree.leaves(state), metrics

  try:
    exported = jax.export.export(jax.jit(flat_step, donate_argnums=(0,)))(*flat_args)
  except Exception:  # e.g. a host callback in the step: it cannot be saved
    return step_fn.lower(*args).compile()
  _write(path, exported)
  return CachedProgram(_compile_exported(exported, flat_args), treedefs)


def _compile_exported(exported, flat_args):
  return jax.jit(exported.call, donate_argnums=(0,)).lower(*flat_args).compile()


def _read(path: Path):
  try:
    blob = path.read_bytes()
  except OSError:
    return None
  try:
    exported = jax.export.deserialize(bytearray(blob))
  except Exception:  # damaged or from another format: made again
    path.unlink(missing_ok=True)
    return None
  os.utime(path)  # recently used: kept longest
  return exported


def _write(path: Path, exported) -> None:
  try:
    blob = exported.serialize()
  except Exception:  # flatbuffers missing, or a type it cannot write: used unsaved
    return
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".partial")
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
    os.replace(tmp, path)
    tmp = None
    programs = sorted(path.parent.glob("*" + SUFFIX), key=lambda p: p.stat().st_mtime)
    for old in programs[:-MAX_PROGRAMS]:
      old.unlink(missing_ok=True)
  except OSError:
    pass  # a full or read-only cache folder: the run goes on uncached
  finally:
    if tmp is not None:
      Path(tmp).unlink(missing_ok=True)
