"""`tiny-random`: a built-in tiny Stable Diffusion with deterministic random weights.

This is NOT a real model: its weights are random, so its noise predictions and decoded images mean
nothing. It exists so that tests, CI and quick experiments can run the whole pipeline (tokenizer,
text encoder, VAE, UNet, scheduler) on a laptop CPU in seconds, through exactly the same loading
code as a real checkpoint.

`write_random_checkpoint(folder, configs, seed)` writes a complete diffusers-format folder

    model_index.json
    unet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}
    text_encoder/{config.json, model.safetensors}
    tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
    scheduler/scheduler_config.json

for any supported configs, with random weights (`random_state`). The state-dict layout is that
of sdsjax's own Flax modules (`jax.eval_shape` of their init), mapped back to the diffusers /
transformers names by `convert.torch_state_shapes`; diffusers' and transformers'
`from_pretrained` load the folder (tests/test_sd_loading.py). The tokenizer is the package data
in `sdsjax/data/tiny_tokenizer/` (built by scripts/build_tiny_tokenizer.py).

`write_tiny_random(folder)` writes it with the tiny configs below, and `materialize_tiny_random()`
writes that once into `$SDSJAX_CACHE` (default `~/.cache/sdsjax`) under `tiny-random-v1/`,
atomically (temp dir + rename), and returns its path.

Importing this module does not import jax (benchmarks read the configs before setting up jax).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

NAME = "tiny-random"
VERSION = "v1"  # Bump whenever the written weights, configs or tokenizer change (stale caches).
SEED = 20240601

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

UNET_CONFIG: dict[str, Any] = {
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.42.1",
  "sample_size": 8,
  "in_channels": 4,
  "out_channels": 4,
  "center_input_sample": False,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "only_cross_attention": False,
  "block_out_channels": [32, 64],
  "layers_per_block": 1,
  "downsample_padding": 1,
  "mid_block_scale_factor": 1,
  "act_fn": "silu",
  "norm_num_groups": 8,
  "norm_eps": 1e-5,
  "cross_attention_dim": 32,
  "attention_head_dim": 8,  # diffusers' misnomer: the number of heads (head size 4 and 8).
  "use_linear_projection": False,
  "upcast_attention": False,
  "transformer_layers_per_block": 1,
}

VAE_CONFIG: dict[str, Any] = {
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.42.1",
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ["DownEncoderBlock2D"] * 4,  # 3 downsamplers: latents are H/8.
  "up_block_types": ["UpDecoderBlock2D"] * 4,
  "block_out_channels": [8, 16, 16, 16],
  "layers_per_block": 1,
  "act_fn": "silu",
  "latent_channels": 4,
  "norm_num_groups": 4,
  "sample_size": 64,
  "scaling_factor": 0.18215,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
  "architectures": ["CLIPTextModel"],
  "model_type": "clip_text_model",
  "hidden_size": 32,
  "intermediate_size": 64,
  "projection_dim": 32,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "max_position_embeddings": 77,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-5,
  "attention_dropout": 0.0,
  "initializer_range": 0.02,
  "initializer_factor": 1.0,
  "dtype": "float32",
  # vocab_size, bos/eos/pad ids are filled in from the tokenizer's vocabulary.
}

SCHEDULER_CONFIG: dict[str, Any] = {
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.42.1",
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "set_alpha_to_one": False,
  "skip_prk_steps": True,
  "steps_offset": 1,
  "clip_sample": False,
  "trained_betas": None,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
  "unet": UNET_CONFIG,
  "vae": VAE_CONFIG,
  "text_encoder": TEXT_ENCODER_CONFIG,
  "scheduler": SCHEDULER_CONFIG,
}

# (component, weight file, seed offset) of the networks.
_NETWORKS = (
  ("unet", "diffusion_pytorch_model.safetensors", 1),
  ("vae", "diffusion_pytorch_model.safetensors", 2),
  ("text_encoder", "model.safetensors", 3),
)


def _tokenizer_folder():
  return importlib.resources.files("sdsjax") / "data" / "tiny_tokenizer"


def tokenizer_vocab() -> dict[str, int]:
  """The tiny CLIP vocabulary, token -> id."""
  return json.loads((_tokenizer_folder() / "vocab.json").read_text(encoding="utf-8"))


def write_tokenizer(folder: str | os.PathLike) -> Path:
  """Copies the tiny CLIP tokenizer (vocab.json, merges.txt and its configs) into `folder`."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for resource in _tokenizer_folder().iterdir():
    if resource.is_file():
      (folder / resource.name).write_bytes(resource.read_bytes())
  return folder


def random_state(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """Deterministic float32 weights for a state-dict layout, O(1) activations.

  Each tensor draws from its own generator, seeded by `seed` and its key, so a tensor's values do
  not depend on which other keys exist. Matrices and kernels are normal with std 1/sqrt(fan_in);
  norm scales are 1 + 0.1·N(0, 1) and biases 0.05·N(0, 1) (not exactly 1 and 0, so that a swapped
  scale and bias or a dropped bias shows up in parity tests); embeddings are N(0, 0.5²).
  """
  state = {}
  for key, shape in shapes.items():
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    module = key.rsplit(".", 1)[0]
    is_norm = any(
      part.startswith(("norm", "layer_norm", "final_layer_norm", "group_norm", "conv_norm_out"))
      for part in module.split(".")
    )
    if key.endswith(".bias"):
      value = 0.05 * rng.standard_normal(shape)
    elif is_norm:
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif "embedding.weight" in key and len(shape) == 2 and "time_embedding" not in key:
      value = 0.5 * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[1:]))
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    state[key] = np.ascontiguousarray(value, dtype=np.float32)
  return state


def _write_json(path: Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_random_checkpoint(
  folder: str | os.PathLike, configs: Mapping[str, Mapping[str, Any]], seed: int
) -> Path:
  """Writes a diffusers-format folder (see the module docstring) with random weights.

  Args:
    folder: the folder to write; created if missing, files in it are overwritten.
    configs: the "unet", "vae", "text_encoder" and "scheduler" config dicts, as in their
      config.json files. The text encoder's vocab_size and bos/eos/pad token ids are set to the
      tiny tokenizer's.
    seed: the weights are `random_state(layout, seed + 1)` for the UNet, `+ 2` the VAE and
      `+ 3` the text encoder: the same seed and configs write the same bytes.

  Returns:
    The folder as a `Path`.
  """
  # Lazy: jax and the Flax modules are only needed to write weights.
  from safetensors.numpy import save_file

  from sdsjax.models import convert
  from sdsjax.models import stable_diffusion

  folder = Path(folder)
  vocab = tokenizer_vocab()
  configs = dict(configs)
  configs["text_encoder"] = dict(
    configs["text_encoder"],
    vocab_size=len(vocab),
    bos_token_id=vocab[BOS_TOKEN],
    eos_token_id=vocab[EOS_TOKEN],
    pad_token_id=vocab[EOS_TOKEN],
  )
  for component, filename, offset in _NETWORKS:
    (folder / component).mkdir(parents=True, exist_ok=True)
    _, shapes = stable_diffusion.build_component(component, configs[component])
    _write_json(folder / component / "config.json", configs[component])
    save_file(
      random_state(convert.torch_state_shapes(shapes), seed + offset),
      str(folder / component / filename),
      metadata={"format": "pt"},
    )
  write_tokenizer(folder / "tokenizer")
  (folder / "scheduler").mkdir(parents=True, exist_ok=True)
  _write_json(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])
  _write_json(
    folder / "model_index.json",
    {
      "_class_name": "StableDiffusionPipeline",
      "_diffusers_version": "0.42.1",
      "feature_extractor": [None, None],
      "requires_safety_checker": False,
      "safety_checker": [None, None],
      "scheduler": ["diffusers", configs["scheduler"].get("_class_name", "PNDMScheduler")],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
    },
  )
  (folder / "README.md").write_text(
    "A Stable Diffusion checkpoint with deterministic RANDOM weights, written by sdsjax for "
    "tests and benchmarks.\nIt is not a real model; its outputs mean nothing.\n",
    encoding="utf-8",
  )
  return folder


def write_tiny_random(folder: str | os.PathLike) -> Path:
  """Writes the tiny-random folder (`TINY_CONFIGS`, `SEED`) and returns it."""
  return write_random_checkpoint(folder, TINY_CONFIGS, SEED)


def cache_root() -> Path:
  """`$SDSJAX_CACHE`, or `~/.cache/sdsjax`."""
  root = os.environ.get("SDSJAX_CACHE")
  return Path(root).expanduser() if root else Path.home() / ".cache" / "sdsjax"


def materialize_tiny_random() -> Path:
  """Returns the cached tiny-random folder, writing it first (atomically) if it is missing."""
  target = cache_root() / f"{NAME}-{VERSION}"
  if (target / "model_index.json").is_file():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
  try:
    write_tiny_random(tmp)
    try:
      os.rename(tmp, target)
    except OSError:
      # Another process won the race (the target now exists): use its copy.
      if not (target / "model_index.json").is_file():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target
