"""`tiny-random`: a built-in tiny Stable Diffusion with deterministic random weights.

This is NOT a real model: its weights are random, so its noise predictions and decoded images mean
nothing. It exists so that tests, CI and quick experiments can run the whole pipeline (tokenizer,
text encoder, VAE, UNet, scheduler) on a laptop CPU in seconds, through exactly the same loading
code as a real checkpoint.

`write_tiny_random(folder)` writes a complete diffusers-format folder

    model_index.json
    unet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}
    text_encoder/{config.json, model.safetensors}
    tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
    scheduler/scheduler_config.json

with numpy and safetensors only. The keys and configs follow diffusers / transformers, so the
PyTorch `UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel` and `CLIPTokenizer` load the same
folder with `from_pretrained`. The shapes come from the `*_state_shapes(config)` functions below,
which spell out the diffusers / transformers parameter layout for the SD-1.x / SD-2.x block types.

`materialize_tiny_random()` writes the folder once into `$SDSJAX_CACHE` (default
`~/.cache/sdsjax`) under `tiny-random-v1/`, atomically (temp dir + rename), and returns its path.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

NAME = "tiny-random"
VERSION = "v1"  # Bump whenever anything written below changes, so stale caches are not reused.
SEED = 20240601

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77

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
  "max_position_embeddings": MAX_LENGTH,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-5,
  "attention_dropout": 0.0,
  "initializer_range": 0.02,
  "initializer_factor": 1.0,
  "dtype": "float32",
  # vocab_size, bos/eos/pad ids are filled in from the generated vocabulary.
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

MODEL_INDEX: dict[str, Any] = {
  "_class_name": "StableDiffusionPipeline",
  "_diffusers_version": "0.42.1",
  "feature_extractor": [None, None],
  "requires_safety_checker": False,
  "safety_checker": [None, None],
  "scheduler": ["diffusers", "PNDMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"],
}

# Words the tiny BPE is trained on, most frequent first: enough that prompts like "a photo of an
# old man, front view" split into a few tokens rather than single bytes.
_CORPUS = [
  "a",
  "the",
  "of",
  "and",
  "in",
  "to",
  "with",
  "an",
  "is",
  "on",
  "for",
  "at",
  "by",
  "from",
  "as",
  "or",
  "his",
  "her",
  "man",
  "woman",
  "photo",
  "portrait",
  "face",
  "head",
  "view",
  "front",
  "side",
  "back",
  "overhead",
  "old",
  "young",
  "person",
  "hair",
  "eyes",
  "smiling",
  "realistic",
  "detailed",
  "high",
  "quality",
  "beautiful",
  "bald",
  "beard",
  "child",
  "boy",
  "girl",
  "pirate",
  "painted",
  "skin",
  "light",
  "dark",
  "white",
  "black",
  "red",
  "blue",
  "green",
  "brown",
  "grey",
  "gray",
  "yellow",
  "orange",
  "pink",
  "purple",
  "golden",
  "silver",
  "short",
  "long",
  "curly",
  "straight",
  "wearing",
  "hat",
  "glasses",
  "smile",
  "happy",
  "sad",
  "angry",
  "serious",
  "looking",
  "camera",
  "studio",
  "lighting",
  "render",
  "3d",
  "model",
  "sculpture",
  "statue",
  "bust",
  "marble",
  "bronze",
  "clay",
  "cartoon",
  "anime",
  "style",
  "character",
  "closeup",
  "close",
  "up",
  "shot",
  "picture",
  "image",
  "drawing",
  "painting",
  "oil",
  "digital",
  "art",
  "artist",
  "sharp",
  "focus",
  "soft",
  "natural",
  "sunlight",
  "shadow",
  "background",
  "simple",
  "plain",
  "gray",
  "neutral",
  "expression",
  "mouth",
  "nose",
  "ear",
  "ears",
  "lips",
  "teeth",
  "forehead",
  "cheeks",
  "chin",
  "jaw",
  "neck",
  "shoulders",
  "elderly",
  "middle",
  "aged",
  "teenager",
  "baby",
  "adult",
  "male",
  "female",
  "king",
  "queen",
  "soldier",
  "knight",
  "wizard",
  "witch",
  "monster",
  "zombie",
  "robot",
  "alien",
  "elf",
  "dwarf",
  "orc",
  "viking",
  "samurai",
  "clown",
  "doctor",
  "nurse",
  "chef",
  "farmer",
  "sailor",
  "astronaut",
  "famous",
  "actor",
  "singer",
  "president",
  "scientist",
  "teacher",
  "student",
  "man's",
  "woman's",
  "very",
  "highly",
  "ultra",
  "4k",
  "8k",
  "hd",
  "trending",
  "photorealistic",
  "hyperrealistic",
  "cinematic",
  "dramatic",
  "volumetric",
  "octane",
  "unreal",
  "engine",
  "number",
  "head",
  "number",
  "one",
  "two",
  "three",
  "four",
  "five",
  "six",
  "seven",
  "eight",
  "nine",
  "ten",
  "and",
  "then",
  "this",
  "that",
  "these",
  "those",
  "it",
  "its",
]


def _bytes_to_unicode() -> dict[int, str]:
  """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP)."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  order = printable + [b for b in range(256) if b not in printable]
  return {b: table[b] for b in order}


def _train_bpe(words: list[str], num_merges: int) -> list[tuple[str, str]]:
  """A minimal BPE trainer: repeatedly merges the most frequent adjacent pair (ties: first seen)."""
  byte_chars = _bytes_to_unicode()
  # Zipf-like frequencies from the corpus order, so common words merge first.
  freqs: dict[tuple[str, ...], float] = collections.OrderedDict()
  for rank, word in enumerate(words):
    chars = [byte_chars[b] for b in word.encode("utf-8")]
    symbols = tuple([*chars[:-1], chars[-1] + "</w>"])
    freqs[symbols] = freqs.get(symbols, 0.0) + 1.0 / (rank + 10)
  merges = []
  for _ in range(num_merges):
    pair_counts: dict[tuple[str, str], float] = collections.OrderedDict()
    for symbols, f in freqs.items():
      for pair in itertools.pairwise(symbols):
        pair_counts[pair] = pair_counts.get(pair, 0.0) + f
    if not pair_counts:
      break
    best = max(pair_counts, key=lambda p: pair_counts[p])  # max keeps the first of equal counts
    merges.append(best)
    merged: dict[tuple[str, ...], float] = collections.OrderedDict()
    for symbols, f in freqs.items():
      out, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          out.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      merged[tuple(out)] = merged.get(tuple(out), 0.0) + f
    freqs = merged
  return merges


def tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Returns the tiny CLIP vocabulary and merges, laid out like OpenAI CLIP's.

  Vocabulary order: the 256 byte characters, the same with `</w>`, one token per merge, then
  `<|startoftext|>` and `<|endoftext|>`.
  """
  byte_chars = list(_bytes_to_unicode().values())
  merges = _train_bpe(_CORPUS, num_merges=1000)
  tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
  tokens += [BOS_TOKEN, EOS_TOKEN]
  vocab: dict[str, int] = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  return vocab, merges


# ----------------------------------------------------------------------------------------------
# Parameter layouts (PyTorch state-dict keys and shapes) of the diffusers / transformers models.


def _as_list(value, n: int) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _norm(shapes: dict, prefix: str, channels: int) -> None:
  shapes[f"{prefix}.weight"] = (channels,)
  shapes[f"{prefix}.bias"] = (channels,)


def _linear(shapes: dict, prefix: str, d_in: int, d_out: int, bias: bool = True) -> None:
  shapes[f"{prefix}.weight"] = (d_out, d_in)
  if bias:
    shapes[f"{prefix}.bias"] = (d_out,)


def _conv(shapes: dict, prefix: str, c_in: int, c_out: int, k: int) -> None:
  shapes[f"{prefix}.weight"] = (c_out, c_in, k, k)
  shapes[f"{prefix}.bias"] = (c_out,)


def _resnet(shapes: dict, prefix: str, c_in: int, c_out: int, temb: int | None) -> None:
  _norm(shapes, f"{prefix}.norm1", c_in)
  _conv(shapes, f"{prefix}.conv1", c_in, c_out, 3)
  if temb is not None:
    _linear(shapes, f"{prefix}.time_emb_proj", temb, c_out)
  _norm(shapes, f"{prefix}.norm2", c_out)
  _conv(shapes, f"{prefix}.conv2", c_out, c_out, 3)
  if c_in != c_out:
    _conv(shapes, f"{prefix}.conv_shortcut", c_in, c_out, 1)


def _transformer_2d(
  shapes: dict, prefix: str, channels: int, cross_dim: int, linear_proj: bool, num_layers: int
) -> None:
  _norm(shapes, f"{prefix}.norm", channels)
  if linear_proj:
    _linear(shapes, f"{prefix}.proj_in", channels, channels)
  else:
    _conv(shapes, f"{prefix}.proj_in", channels, channels, 1)
  for layer in range(num_layers):
    block = f"{prefix}.transformer_blocks.{layer}"
    for name, kv_dim in (("attn1", channels), ("attn2", cross_dim)):
      _linear(shapes, f"{block}.{name}.to_q", channels, channels, bias=False)
      _linear(shapes, f"{block}.{name}.to_k", kv_dim, channels, bias=False)
      _linear(shapes, f"{block}.{name}.to_v", kv_dim, channels, bias=False)
      _linear(shapes, f"{block}.{name}.to_out.0", channels, channels)
    for i in (1, 2, 3):
      _norm(shapes, f"{block}.norm{i}", channels)
    _linear(shapes, f"{block}.ff.net.0.proj", channels, 8 * channels)  # GEGLU: 2 x (4 x dim)
    _linear(shapes, f"{block}.ff.net.2", 4 * channels, channels)
  if linear_proj:
    _linear(shapes, f"{prefix}.proj_out", channels, channels)
  else:
    _conv(shapes, f"{prefix}.proj_out", channels, channels, 1)


def unet_state_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """State-dict shapes of a diffusers `UNet2DConditionModel` with SD-1.x / SD-2.x block types."""
  channels = list(config["block_out_channels"])
  n = len(channels)
  layers = _as_list(config.get("layers_per_block", 2), n)
  tf_layers = _as_list(config.get("transformer_layers_per_block", 1), n)
  cross = config["cross_attention_dim"]
  linear_proj = bool(config.get("use_linear_projection", False))
  temb = 4 * channels[0]
  shapes: dict[str, tuple[int, ...]] = {}
  _conv(shapes, "conv_in", config.get("in_channels", 4), channels[0], 3)
  _linear(shapes, "time_embedding.linear_1", channels[0], temb)
  _linear(shapes, "time_embedding.linear_2", temb, temb)
  skips = [channels[0]]
  c_out = channels[0]
  for i, block_type in enumerate(config["down_block_types"]):
    c_in, c_out = c_out, channels[i]
    for j in range(layers[i]):
      _resnet(shapes, f"down_blocks.{i}.resnets.{j}", c_in if j == 0 else c_out, c_out, temb)
      if block_type == "CrossAttnDownBlock2D":
        _transformer_2d(
          shapes, f"down_blocks.{i}.attentions.{j}", c_out, cross, linear_proj, tf_layers[i]
        )
      elif block_type != "DownBlock2D":
        raise ValueError(f"unsupported down block type {block_type!r}")
      skips.append(c_out)
    if i < n - 1:
      _conv(shapes, f"down_blocks.{i}.downsamplers.0.conv", c_out, c_out, 3)
      skips.append(c_out)
  mid = channels[-1]
  _resnet(shapes, "mid_block.resnets.0", mid, mid, temb)
  _transformer_2d(shapes, "mid_block.attentions.0", mid, cross, linear_proj, tf_layers[-1])
  _resnet(shapes, "mid_block.resnets.1", mid, mid, temb)
  reversed_channels = channels[::-1]
  reversed_layers = layers[::-1]
  reversed_tf = tf_layers[::-1]
  c_out = reversed_channels[0]
  for i, block_type in enumerate(config["up_block_types"]):
    prev, c_out = c_out, reversed_channels[i]
    for j in range(reversed_layers[i] + 1):
      skip = skips.pop()
      _resnet(shapes, f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else c_out) + skip, c_out, temb)
      if block_type == "CrossAttnUpBlock2D":
        _transformer_2d(
          shapes, f"up_blocks.{i}.attentions.{j}", c_out, cross, linear_proj, reversed_tf[i]
        )
      elif block_type != "UpBlock2D":
        raise ValueError(f"unsupported up block type {block_type!r}")
    if i < n - 1:
      _conv(shapes, f"up_blocks.{i}.upsamplers.0.conv", c_out, c_out, 3)
  _norm(shapes, "conv_norm_out", channels[0])
  _conv(shapes, "conv_out", channels[0], config.get("out_channels", 4), 3)
  return shapes


def _vae_mid_block(shapes: dict, prefix: str, channels: int) -> None:
  _resnet(shapes, f"{prefix}.resnets.0", channels, channels, None)
  _norm(shapes, f"{prefix}.attentions.0.group_norm", channels)
  for name in ("to_q", "to_k", "to_v", "to_out.0"):
    _linear(shapes, f"{prefix}.attentions.0.{name}", channels, channels)
  _resnet(shapes, f"{prefix}.resnets.1", channels, channels, None)


def vae_state_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """State-dict shapes of a diffusers `AutoencoderKL` (DownEncoderBlock2D / UpDecoderBlock2D)."""
  channels = list(config["block_out_channels"])
  n = len(channels)
  layers = config.get("layers_per_block", 1)
  latent = config.get("latent_channels", 4)
  shapes: dict[str, tuple[int, ...]] = {}
  _conv(shapes, "encoder.conv_in", config.get("in_channels", 3), channels[0], 3)
  c_out = channels[0]
  for i in range(n):
    c_in, c_out = c_out, channels[i]
    for j in range(layers):
      _resnet(
        shapes, f"encoder.down_blocks.{i}.resnets.{j}", c_in if j == 0 else c_out, c_out, None
      )
    if i < n - 1:
      _conv(shapes, f"encoder.down_blocks.{i}.downsamplers.0.conv", c_out, c_out, 3)
  _vae_mid_block(shapes, "encoder.mid_block", channels[-1])
  _norm(shapes, "encoder.conv_norm_out", channels[-1])
  _conv(shapes, "encoder.conv_out", channels[-1], 2 * latent, 3)
  _conv(shapes, "quant_conv", 2 * latent, 2 * latent, 1)
  _conv(shapes, "post_quant_conv", latent, latent, 1)
  _conv(shapes, "decoder.conv_in", latent, channels[-1], 3)
  _vae_mid_block(shapes, "decoder.mid_block", channels[-1])
  reversed_channels = channels[::-1]
  c_out = reversed_channels[0]
  for i in range(n):
    prev, c_out = c_out, reversed_channels[i]
    for j in range(layers + 1):
      _resnet(shapes, f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else c_out, c_out, None)
    if i < n - 1:
      _conv(shapes, f"decoder.up_blocks.{i}.upsamplers.0.conv", c_out, c_out, 3)
  _norm(shapes, "decoder.conv_norm_out", channels[0])
  _conv(shapes, "decoder.conv_out", channels[0], config.get("out_channels", 3), 3)
  return shapes


def clip_text_state_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """State-dict shapes of a transformers `CLIPTextModel`, with the `text_model.` prefix of SD."""
  d = config["hidden_size"]
  shapes: dict[str, tuple[int, ...]] = {
    "text_model.embeddings.token_embedding.weight": (config["vocab_size"], d),
    "text_model.embeddings.position_embedding.weight": (config["max_position_embeddings"], d),
  }
  for layer in range(config["num_hidden_layers"]):
    prefix = f"text_model.encoder.layers.{layer}"
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      _linear(shapes, f"{prefix}.self_attn.{name}", d, d)
    _norm(shapes, f"{prefix}.layer_norm1", d)
    _linear(shapes, f"{prefix}.mlp.fc1", d, config["intermediate_size"])
    _linear(shapes, f"{prefix}.mlp.fc2", config["intermediate_size"], d)
    _norm(shapes, f"{prefix}.layer_norm2", d)
  _norm(shapes, "text_model.final_layer_norm", d)
  return shapes


# ----------------------------------------------------------------------------------------------
# Deterministic random weights.


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


def write_tokenizer(
  folder: str | os.PathLike,
  vocab: dict[str, int] | None = None,
  merges: list[tuple[str, str]] | None = None,
) -> Path:
  """Writes the tiny CLIP tokenizer (vocab.json, merges.txt and its configs) into `folder`."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if vocab is None or merges is None:
    vocab, merges = tokenizer_files()
  _write_json(folder / "vocab.json", vocab)
  with open(folder / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2 (sdsjax tiny-random)\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
  specials = {
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
  }
  _write_json(folder / "special_tokens_map.json", specials)
  _write_json(
    folder / "tokenizer_config.json",
    dict(
      specials,
      tokenizer_class="CLIPTokenizer",
      model_max_length=MAX_LENGTH,
      do_lower_case=True,
      clean_up_tokenization_spaces=True,
    ),
  )
  return folder


def write_tiny_random(folder: str | os.PathLike) -> Path:
  """Writes the tiny-random diffusers-format folder (see the module docstring) and returns it.

  Args:
    folder: the folder to write; created if missing, files in it are overwritten.

  Returns:
    The folder as a `Path`.
  """
  folder = Path(folder)
  for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    (folder / sub).mkdir(parents=True, exist_ok=True)
  vocab, merges = tokenizer_files()
  text_config = dict(
    TEXT_ENCODER_CONFIG,
    vocab_size=len(vocab),
    bos_token_id=vocab[BOS_TOKEN],
    eos_token_id=vocab[EOS_TOKEN],
    pad_token_id=vocab[EOS_TOKEN],
  )
  components = (
    ("unet", UNET_CONFIG, unet_state_shapes, "diffusion_pytorch_model.safetensors", 1),
    ("vae", VAE_CONFIG, vae_state_shapes, "diffusion_pytorch_model.safetensors", 2),
    ("text_encoder", text_config, clip_text_state_shapes, "model.safetensors", 3),
  )
  for sub, config, layout, filename, offset in components:
    _write_json(folder / sub / "config.json", config)
    save_file(
      random_state(layout(config), SEED + offset),
      str(folder / sub / filename),
      metadata={"format": "pt"},
    )
  write_tokenizer(folder / "tokenizer", vocab, merges)
  _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
  _write_json(folder / "model_index.json", MODEL_INDEX)
  (folder / "README.md").write_text(
    "sdsjax tiny-random: a tiny Stable Diffusion with deterministic RANDOM weights, for tests.\n"
    "It is not a real model; its outputs mean nothing.\n",
    encoding="utf-8",
  )
  return folder


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
