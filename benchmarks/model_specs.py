"""Model dimensions the benchmarks share (diffusers / transformers config keys).

`SD15_UNET` and `SD15_VAE` are Stable Diffusion 1.5's unet/config.json and vae/config.json (the
keys that matter). `FIT_MODELS` are bench_fit's random-weight checkpoints besides tiny-random:

- small: SD-shaped with reduced channels (UNet 64-128-256-256, one layer per block; VAE
  32-64-128-128), render 128², SD 256²;
- sd15: SD-1.5 UNet and VAE dimensions, render 128², SD 512².

Both have a one-layer 768-wide text encoder: it runs once per prompt, outside the step.
`checkpoint(name)` writes a model's random weights once under $SDSJAX_CACHE (never downloads),
`fit_config(name, folder, dtype)` is its FitConfig (tiny: configs/tiny.yaml, render 32², SD 64²).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from sdsjax import config as config_lib  # jax-free
from sdsjax.models import tiny_random  # jax-free

CHECKPOINT_VERSION = "v2"  # bump when FIT_MODELS or the weights written for them change

SD15_UNET = dict(
  sample_size=64,
  in_channels=4,
  out_channels=4,
  layers_per_block=2,
  block_out_channels=[320, 640, 1280, 1280],
  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
  cross_attention_dim=768,
  attention_head_dim=8,
  norm_num_groups=32,
  norm_eps=1e-5,
  flip_sin_to_cos=True,
  freq_shift=0,
)
SD15_VAE = dict(
  in_channels=3,
  out_channels=3,
  latent_channels=4,
  layers_per_block=2,
  block_out_channels=[128, 256, 512, 512],
  norm_num_groups=32,
  sample_size=512,
  down_block_types=["DownEncoderBlock2D"] * 4,
  up_block_types=["UpDecoderBlock2D"] * 4,
  scaling_factor=0.18215,
)
TEXT_ENCODER_768 = dict(
  tiny_random.TEXT_ENCODER_CONFIG,
  hidden_size=768,
  intermediate_size=3072,
  projection_dim=768,
  num_hidden_layers=1,
  num_attention_heads=12,
)

FIT_MODELS = {
  "small": {
    "unet": {
      **tiny_random.UNET_CONFIG,
      **SD15_UNET,
      "sample_size": 32,
      "block_out_channels": [64, 128, 256, 256],
      "layers_per_block": 1,
    },
    "vae": {
      **tiny_random.VAE_CONFIG,
      **SD15_VAE,
      "block_out_channels": [32, 64, 128, 128],
      "layers_per_block": 1,
      "sample_size": 256,
    },
    "text_encoder": TEXT_ENCODER_768,
    "overrides": dict(render_resolution=128, sd_resolution=256),
  },
  "sd15": {
    "unet": {**tiny_random.UNET_CONFIG, **SD15_UNET},
    "vae": {**tiny_random.VAE_CONFIG, **SD15_VAE},
    "text_encoder": TEXT_ENCODER_768,
    "overrides": dict(render_resolution=128, sd_resolution=512),
  },
}


def checkpoint(name: str) -> Path:
  """The diffusers-format folder of a benchmark model ("tiny" or a FIT_MODELS key), written once
  (random weights, atomically: a temp folder renamed)."""
  if name == "tiny":
    return tiny_random.materialize_tiny_random()
  folder = tiny_random.cache_root() / f"bench-{name}-{CHECKPOINT_VERSION}"
  if (folder / "model_index.json").is_file():
    return folder
  print(f"writing the random {name} model to {folder} (once)", file=sys.stderr, flush=True)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".bench-{name}-", dir=folder.parent))
  configs = {k: FIT_MODELS[name][k] for k in ("unet", "vae", "text_encoder")}
  configs["scheduler"] = tiny_random.SCHEDULER_CONFIG
  tiny_random.write_random_checkpoint(tmp, configs, seed=1234)
  try:
    os.rename(tmp, folder)
  except OSError:  # another process wrote it first
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


def fit_config(name: str, folder: Path, dtype: str) -> config_lib.FitConfig:
  overrides = dict(model=str(folder), dtype=dtype)
  if name == "tiny":
    root = Path(__file__).resolve().parent.parent
    return config_lib.load_config(root / "configs" / "tiny.yaml", [overrides])
  return config_lib.load_config(None, [dict(FIT_MODELS[name]["overrides"], **overrides)])
