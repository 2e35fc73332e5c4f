"""Finding a Stable Diffusion checkpoint: a local diffusers-format folder or a Hugging Face Hub id.

A checkpoint is a folder with

    unet/          config.json + weights
    vae/           config.json + weights
    text_encoder/  config.json + weights
    tokenizer/     vocab.json + merges.txt (or tokenizer.json)
    scheduler/     scheduler_config.json

where the weights are safetensors only (never pickled .bin/.ckpt):
`diffusion_pytorch_model.safetensors` or `model.safetensors`, sharded (`*.safetensors.index.json`
+ shards) or not, and the fp16 variants (`*.fp16.safetensors`, `*.safetensors.index.fp16.json`)
when only they exist.

A hub id (`owner/name`) is resolved with `huggingface_hub.snapshot_download`, downloading only those
files: first from the local cache, then from the network. Everything that can go wrong becomes a
one-line `CheckpointError` that says what to do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from sdsjax.errors import CheckpointError

# Component subfolder -> base name of its weights file.
WEIGHT_BASENAMES = {
  "unet": ("diffusion_pytorch_model", "model"),
  "vae": ("diffusion_pytorch_model", "model"),
  "text_encoder": ("model", "diffusion_pytorch_model"),
}
CONFIG_FILES = {
  "unet": "config.json",
  "vae": "config.json",
  "text_encoder": "config.json",
  "scheduler": "scheduler_config.json",
}
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def _weight_candidates(base: str) -> list[tuple[str, bool]]:
  """(file name, is_index) in order of preference: fp32 before fp16, single file before shards."""
  return [
    (f"{base}.safetensors", False),
    (f"{base}.safetensors.index.json", True),
    (f"{base}.fp16.safetensors", False),
    (f"{base}.safetensors.index.fp16.json", True),
  ]


def weight_files(component_dir: Path) -> list[Path]:
  """The safetensors files holding a component's weights (one file, or the shards of an index).

  Raises:
    CheckpointError: no safetensors weights, or an index names a shard that is missing.
  """
  component_dir = Path(component_dir)
  for base in WEIGHT_BASENAMES.get(component_dir.name, ("diffusion_pytorch_model", "model")):
    for name, is_index in _weight_candidates(base):
      path = component_dir / name
      if not path.is_file():
        continue
      if not is_index:
        return [path]
      try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
      except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read the shard index {path}: {e}") from None
      missing = [s for s in shards if not (component_dir / s).is_file()]
      if missing:
        raise CheckpointError(
          f"{path} names shard(s) that are missing: {', '.join(missing)}; "
          "download them into the same folder"
        ) from None
      return [component_dir / s for s in shards]
  pickled = sorted(p.name for p in component_dir.glob("*") if p.suffix in (".bin", ".ckpt", ".pt"))
  if pickled:
    raise CheckpointError(
      f"{component_dir} has only pickled weights ({', '.join(pickled)}); sdsjax reads "
      "safetensors only: convert them (load with diffusers, save_pretrained with "
      "safe_serialization=True)"
    )
  raise CheckpointError(
    f"{component_dir} has no weights: expected diffusion_pytorch_model.safetensors or "
    "model.safetensors (or their .fp16 / sharded .index.json variants)"
  )


def check_folder(folder: str | os.PathLike) -> Path:
  """Checks that `folder` is a complete diffusers-format checkpoint and returns it.

  Raises:
    CheckpointError: naming the first missing subfolder, config, tokenizer or weights file.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise CheckpointError(f"checkpoint folder {folder} does not exist")
  missing = [s for s in SUBFOLDERS if not (folder / s).is_dir()]
  if missing:
    raise CheckpointError(
      f"{folder} is not a diffusers-format Stable Diffusion folder: missing subfolder(s) "
      f"{', '.join(m + '/' for m in missing)} (need {', '.join(s + '/' for s in SUBFOLDERS)})"
    )
  for sub, name in CONFIG_FILES.items():
    if not (folder / sub / name).is_file():
      raise CheckpointError(f"checkpoint {folder} is missing {sub}/{name}")
  tokenizer = folder / "tokenizer"
  has_bpe = (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
  if not has_bpe and not (tokenizer / "tokenizer.json").is_file():
    raise CheckpointError(
      f"checkpoint {folder} is missing tokenizer/vocab.json and "
      "tokenizer/merges.txt (or tokenizer/tokenizer.json)"
    )
  for sub in WEIGHT_BASENAMES:
    weight_files(folder / sub)
  return folder


def _safe_check(folder: Path) -> bool:
  try:
    check_folder(folder)
    return True
  except CheckpointError:
    return False


def download_patterns(fp16: bool = False) -> list[str]:
  """`allow_patterns` for snapshot_download: configs, tokenizer, safetensors weights only."""
  patterns = ["model_index.json", "tokenizer/*"]
  patterns += [f"{sub}/{name}" for sub, name in CONFIG_FILES.items()]
  for sub, bases in WEIGHT_BASENAMES.items():
    for base in bases:
      if fp16:
        patterns += [
          f"{sub}/{base}.fp16.safetensors",
          f"{sub}/{base}.safetensors.index.fp16.json",
          f"{sub}/{base}.fp16-*-of-*.safetensors",
        ]
      else:
        patterns += [
          f"{sub}/{base}.safetensors",
          f"{sub}/{base}.safetensors.index.json",
          f"{sub}/{base}-*-of-*.safetensors",
        ]
  return patterns


def hub_cache_dir() -> Path:
  """The Hugging Face Hub cache, read from the environment now (not at import time)."""
  if os.environ.get("HF_HUB_CACHE"):
    return Path(os.environ["HF_HUB_CACHE"]).expanduser()
  if os.environ.get("HF_HOME"):
    return Path(os.environ["HF_HOME"]).expanduser() / "hub"
  from huggingface_hub import constants

  return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
  """True when HF_HUB_OFFLINE is set, read from the environment now."""
  value = os.environ.get("HF_HUB_OFFLINE")
  if value is not None:
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")
  from huggingface_hub import constants

  return bool(constants.HF_HUB_OFFLINE)


def download_command(repo_id: str) -> str:
  """A short `hf download` command line for the usual (unsharded, fp32) layout."""
  include = [
    "*.json",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
  ]
  return f"hf download {repo_id} --include " + " ".join(f"'{p}'" for p in include)


def _offline_message(repo_id: str, reason: str) -> str:
  return (
    f"{reason} and no complete cached copy of {repo_id} in {hub_cache_dir()}: on a machine "
    f"with network run `{download_command(repo_id)}` (and copy its cache to HF_HOME here), "
    f"or copy a diffusers-format folder here and pass --model /path/to/folder"
  )


def _snapshot(repo_id: str, local_only: bool, fp16: bool = False) -> Path:
  from huggingface_hub import snapshot_download

  return Path(
    snapshot_download(
      repo_id,
      cache_dir=hub_cache_dir(),
      local_files_only=local_only,
      allow_patterns=download_patterns(fp16),
    )
  )


def resolve_hub_id(repo_id: str) -> Path:
  """Returns a local snapshot folder for a hub id: from the cache if complete, else downloaded.

  Raises:
    CheckpointError: offline without a cached copy, unknown or gated repo, incomplete repo.
  """
  from huggingface_hub import errors as hub_errors

  cache_problem = ""
  try:
    folder = _snapshot(repo_id, local_only=True)
  except Exception:  # Nothing cached: the network is next.
    pass
  else:
    try:
      return check_folder(folder)
    except CheckpointError as e:
      cache_problem = f" (the cached copy is incomplete: {e})"
  if hub_offline():
    raise CheckpointError(_offline_message(repo_id, "HF_HUB_OFFLINE is set") + cache_problem)
  try:
    folder = _snapshot(repo_id, local_only=False)
    if not _safe_check(folder):
      # Some repos only ship fp16 weights for a component.
      folder = _snapshot(repo_id, local_only=False, fp16=True)
  except hub_errors.GatedRepoError:
    raise CheckpointError(
      f"{repo_id} is gated on the Hugging Face Hub: accept its license on huggingface.co, run "
      "`hf auth login`, and try again"
    ) from None
  except hub_errors.RepositoryNotFoundError:
    raise CheckpointError(
      f"no Hugging Face Hub model {repo_id!r} (or it is private): check the id, or pass a "
      "diffusers-format folder"
    ) from None
  except hub_errors.RevisionNotFoundError as e:
    raise CheckpointError(f"cannot find the revision of {repo_id} on the Hub: {e}") from None
  except CheckpointError:
    raise
  except Exception as e:  # Connection refused, DNS, timeouts, proxies: all mean "no network".
    reason = f"cannot reach the Hugging Face Hub ({type(e).__name__})"
    raise CheckpointError(_offline_message(repo_id, reason) + cache_problem) from None
  try:
    return check_folder(folder)
  except CheckpointError as e:
    raise CheckpointError(
      f"the Hub repo {repo_id} is not a usable diffusers-format Stable Diffusion checkpoint: {e}"
    ) from None


def looks_like_hub_id(spec: str) -> bool:
  return bool(_HUB_ID.match(spec)) and not spec.startswith(".")


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
  """Returns a checked local diffusers-format folder for a folder path or a hub id.

  Args:
    path_or_hub_id: a folder (absolute, relative or `~`), or a hub id like
      `stable-diffusion-v1-5/stable-diffusion-v1-5`. An existing folder wins over a hub id.

  Raises:
    CheckpointError: see `check_folder` and `resolve_hub_id`.
  """
  spec = os.fspath(path_or_hub_id)
  path = Path(spec).expanduser()
  if path.is_dir():
    return check_folder(path)
  if path.exists():
    raise CheckpointError(
      f"{spec} is a file; sdsjax needs a diffusers-format folder (unet/, vae/, "
      "text_encoder/, tokenizer/, scheduler/) or a Hugging Face Hub id"
    )
  if looks_like_hub_id(spec):
    return resolve_hub_id(spec)
  raise CheckpointError(
    f"no such checkpoint folder {spec}, and it is not a Hugging Face Hub id "
    "(owner/name): pass a diffusers-format folder, a hub id or tiny-random"
  )
