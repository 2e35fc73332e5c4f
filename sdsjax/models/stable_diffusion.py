"""Stable Diffusion as pure JAX functions of explicit parameters.

`load_stable_diffusion(path_or_hub_id)` reads a diffusers-format checkpoint (a folder, a Hugging
Face Hub id, or the built-in `"tiny-random"`) into a `StableDiffusion` bundle. The bundle holds
the Flax modules (static structure) apart from their parameters, so a training step can jit the
model functions with the parameters as ordinary arguments:

    sd = load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")
    emb = sd.encode_text(["a photo of an old man"])              # (1, 77, 768), host-side
    z = sd.encode_image(sd.params["vae"], images)                 # (B, H/8, W/8, 4)
    eps = sd.predict_noise(sd.params["unet"], z_t, t, emb)        # (B, H/8, W/8, 4)

Weights are read with `safetensors.numpy` (never torch), their shapes checked against
`jax.eval_shape` of the module's init, and mapped onto the Flax tree by `sdsjax.models.convert`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct as struct_lib
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sdsjax.errors import CheckpointError
from sdsjax.models import hub
from sdsjax.models import tiny_random

Array = jax.Array
Params = Mapping[str, Any]

DEFAULT_SCALING_FACTOR = 0.18215


# ----------------------------------------------------------------------------------------------
# The bundle.


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, never by params.
class StableDiffusion:
  """A loaded Stable Diffusion: static modules, their parameters and the noise schedule.

  The model functions are pure in their explicit `*_params` argument: pass `params["vae"]` or
  `params["unet"]` through `jax.jit` as arguments rather than closing over them.

  Attributes:
    unet: the Flax `UNet2DConditionModel` (structure only).
    vae: the Flax `AutoencoderKL`.
    text_encoder: the Flax `CLIPTextModel`.
    tokenizer: the transformers `CLIPTokenizer` of the checkpoint.
    params: `{"unet": ..., "vae": ..., "text_encoder": ...}` Flax parameter trees, in `dtype`.
    alphas_cumprod: (num_train_timesteps,) float32 ᾱ_t of the training noise schedule.
    scaling_factor: latents = posterior mean × scaling_factor.
    shift_factor: subtracted from the posterior mean before scaling (0 for SD 1.x / 2.x).
    prediction_type: "epsilon", "v_prediction" or "sample": what the UNet outputs.
    dtype: the compute and parameter dtype; the model functions return float32.
    folder: the diffusers-format folder the weights came from.
    configs: the raw configs, keyed "unet", "vae", "text_encoder", "scheduler".
    remat_vae: whether the VAE encoder blocks are (partly) recomputed in the backward pass of
      `encode_image` (less memory when differentiating through it at 512²; what is kept
      depends on the backend, see autoencoder_kl.remat_policy).
  """

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  params: dict[str, Any]
  alphas_cumprod: np.ndarray
  scaling_factor: float
  shift_factor: float
  prediction_type: str
  dtype: Any
  folder: Path
  configs: dict[str, dict]
  remat_vae: bool = True

  def __post_init__(self):
    # Jitted pure functions of (params, inputs), made once per bundle so repeated calls reuse the
    # compilation. Called inside a user's jit they are simply inlined.
    set_attr = functools.partial(object.__setattr__, self)
    set_attr("_text_fn", jax.jit(self._text_impl))
    set_attr("_encode_fn", jax.jit(self._encode_impl))
    set_attr("_decode_fn", jax.jit(self._decode_impl))
    set_attr("_noise_fn", jax.jit(self._noise_impl))

  @property
  def text_length(self) -> int:
    """Tokens per prompt (77 for CLIP)."""
    return int(self.configs["text_encoder"].get("max_position_embeddings", 77))

  @property
  def text_dim(self) -> int:
    """D of the text embeddings, the UNet's cross-attention width."""
    return int(self.configs["text_encoder"]["hidden_size"])

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> (B, 77) int32 token ids, padded and truncated like the diffusers pipelines."""
    if isinstance(prompts, str):
      raise TypeError("tokenize takes a list of prompts, not one string")
    ids = self.tokenizer(
      list(prompts),
      padding="max_length",
      max_length=self.text_length,
      truncation=True,
      return_tensors="np",
    )["input_ids"]
    return np.asarray(ids, np.int32)

  def encode_text(self, prompts: Sequence[str]) -> Array:
    """Prompts -> (B, 77, D) float32 CLIP last hidden states (after the final layer norm).

    Host-side: tokenizes in Python, then runs the jitted text encoder once.
    """
    ids = self.tokenize(prompts)
    out = self._text_fn(self.params["text_encoder"], jnp.asarray(ids))
    chex.assert_shape(out, (len(ids), self.text_length, self.text_dim))
    return out

  def encode_image(self, vae_params: Params, images: Array) -> Array:
    """Images (B, H, W, 3) in [0, 1] -> latents (B, H/8, W/8, C) = posterior mean × scaling.

    Differentiable in `images`; H and W must be multiples of 8. Returns float32.
    """
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, -1, 3)
    return self._encode_fn(vae_params, images)

  def decode_latents(self, vae_params: Params, latents: Array) -> Array:
    """Latents (B, h, w, C) -> images (B, 8h, 8w, 3) float32 in [0, 1] (clipped)."""
    chex.assert_rank(latents, 4)
    return self._decode_fn(vae_params, latents)

  def predict_noise(
    self, unet_params: Params, latents: Array, t: Array, text_embeddings: Array
  ) -> Array:
    """The UNet's noise prediction ε(z_t, t, text), converted to ε whatever the UNet predicts.

    Args:
      unet_params: `params["unet"]`.
      latents: (B, h, w, C) noisy latents z_t.
      t: (B,) or () integer timesteps in [0, num_train_timesteps).
      text_embeddings: (B, L, D) from `encode_text`.

    Returns:
      (B, h, w, C) float32 ε. For v-prediction, ε = √ᾱ_t·v + √(1−ᾱ_t)·z_t; for sample
      prediction, ε = (z_t − √ᾱ_t·x̂_0) / √(1−ᾱ_t).
    """
    chex.assert_rank([latents, text_embeddings], [4, 3])
    chex.assert_equal_shape_prefix([latents, text_embeddings], 1)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), latents.shape[:1])
    return self._noise_fn(unet_params, latents, t, text_embeddings)

  def epsilon_from_output(self, output: Array, latents: Array, t: Array) -> Array:
    """Converts a raw UNet output (ε, v or x̂_0 per `prediction_type`) to ε; all (B, h, w, C)."""
    output = output.astype(jnp.float32)
    if self.prediction_type == "epsilon":
      return output
    z_t = latents.astype(jnp.float32)
    alpha_bar = jnp.asarray(self.alphas_cumprod, jnp.float32)[t][:, None, None, None]
    if self.prediction_type == "v_prediction":
      return jnp.sqrt(alpha_bar) * output + jnp.sqrt(1.0 - alpha_bar) * z_t
    return (z_t - jnp.sqrt(alpha_bar) * output) / jnp.sqrt(1.0 - alpha_bar)

  # Pure implementations (jitted in __post_init__).

  def _text_impl(self, params, input_ids):
    return self.text_encoder.apply({"params": params}, input_ids).astype(jnp.float32)

  def _encode_impl(self, params, images):
    # With remat_vae the module recomputes parts of its encoder blocks in the backward pass.
    mean, _ = self.vae.apply(
      {"params": params}, (2.0 * images - 1.0).astype(self.dtype), method=self.vae.encode
    )
    return (mean.astype(jnp.float32) - self.shift_factor) * self.scaling_factor

  def _decode_impl(self, params, latents):
    z = latents.astype(jnp.float32) / self.scaling_factor + self.shift_factor
    images = self.vae.apply({"params": params}, z.astype(self.dtype), method=self.vae.decode)
    return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)

  def _noise_impl(self, params, latents, t, text_embeddings):
    output = self.unet.apply(
      {"params": params}, latents.astype(self.dtype), t, text_embeddings.astype(self.dtype)
    )
    return self.epsilon_from_output(output, latents, t)


# ----------------------------------------------------------------------------------------------
# Noise schedule.


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> np.ndarray:
  """ᾱ_t = Π_{s≤t} (1 − β_s) from a diffusers scheduler config, as float32 (T,).

  Supports beta_schedule "linear", "scaled_linear" (SD), "squaredcos_cap_v2" and "sigmoid",
  `trained_betas` and `rescale_betas_zero_snr`. Computed in float64.
  """
  num_steps = int(config.get("num_train_timesteps", 1000))
  beta_start = float(config.get("beta_start", 0.0001))
  beta_end = float(config.get("beta_end", 0.02))
  schedule = config.get("beta_schedule", "linear")
  if config.get("trained_betas") is not None:
    betas = np.asarray(config["trained_betas"], np.float64)
  elif schedule == "linear":
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  elif schedule == "scaled_linear":
    betas = (
      np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_steps, dtype=np.float64) ** 2
    )
  elif schedule == "squaredcos_cap_v2":

    def alpha_bar(s):
      return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array(
      [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
        for i in range(num_steps)
      ]
    )
  elif schedule == "sigmoid":
    x = np.linspace(-6.0, 6.0, num_steps, dtype=np.float64)
    betas = (beta_end - beta_start) / (1.0 + np.exp(-x)) + beta_start
  else:
    raise CheckpointError(
      f"scheduler beta_schedule {schedule!r} is not supported (use linear, "
      "scaled_linear, squaredcos_cap_v2 or sigmoid)"
    )
  if config.get("rescale_betas_zero_snr", False):
    betas = _rescale_zero_terminal_snr(betas)
  alphas_cumprod = np.cumprod(1.0 - betas)
  if config.get("rescale_betas_zero_snr", False):
    alphas_cumprod[-1] = 2.0**-24  # As diffusers: avoids an infinite SNR weight at t = T-1.
  return alphas_cumprod.astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023: shifts and scales √ᾱ so that ᾱ_{T-1} = 0, keeping ᾱ_0."""
  sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * first / (first - last)
  alphas_cumprod = sqrt_ab**2
  alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
  return 1.0 - alphas


# ----------------------------------------------------------------------------------------------
# Reading weights.


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
  """Reads a safetensors file with dtypes numpy lacks (bfloat16), via ml_dtypes."""
  import ml_dtypes

  dtypes = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
  }
  with open(path, "rb") as f:
    (header_len,) = struct_lib.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    data = f.read()
  tensors = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    tensors[key] = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(
      info["shape"]
    )
  return tensors


def read_safetensors(files: Sequence[Path]) -> dict[str, np.ndarray]:
  """Reads one safetensors file or the shards of one checkpoint into a single state dict."""
  from safetensors.numpy import load_file

  state: dict[str, np.ndarray] = {}
  for path in files:
    try:
      tensors = load_file(str(path))
    except TypeError:  # numpy has no bfloat16: read the raw bytes.
      tensors = _read_safetensors_raw(Path(path))
    except Exception as e:
      raise CheckpointError(
        f"cannot read {path} as safetensors ({type(e).__name__}: {e}); "
        "the file is corrupt or incomplete: download it again"
      ) from None
    duplicated = state.keys() & tensors.keys()
    if duplicated:
      raise CheckpointError(f"{path} repeats tensor {sorted(duplicated)[0]} from another shard")
    state.update(tensors)
  return state


def _read_json(path: Path) -> dict:
  try:
    config = json.loads(Path(path).read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{path} is not a JSON object")
  return config


# ----------------------------------------------------------------------------------------------
# Loading.


def _module_classes():
  from sdsjax.models import autoencoder_kl
  from sdsjax.models import clip_text_model
  from sdsjax.models import unet_2d_condition

  return {
    "unet": unet_2d_condition.UNet2DConditionModel,
    "vae": autoencoder_kl.AutoencoderKL,
    "text_encoder": clip_text_model.CLIPTextModel,
  }


def _init_inputs(component: str, config: Mapping[str, Any]) -> tuple:
  """Small dummy inputs for `jax.eval_shape(module.init, ...)` (shapes only, nothing runs)."""
  if component == "unet":
    side = 2 ** len(config["block_out_channels"])
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    return (
      jnp.zeros((1, side, side, config.get("in_channels", 4)), jnp.float32),
      jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, 77, cross), jnp.float32),
    )
  if component == "vae":
    side = 2 ** len(config["block_out_channels"])
    return (jnp.zeros((1, side, side, config.get("in_channels", 3)), jnp.float32),)
  return (jnp.zeros((1, config.get("max_position_embeddings", 77)), jnp.int32),)


def _adapt_text_encoder_keys(state: dict[str, np.ndarray], target: Mapping) -> dict:
  """transformers ≥ 5 saves CLIPTextModel without the `text_model.` prefix SD checkpoints have."""
  prefix = "text_model."
  wants_prefix = "text_model" in target
  has_prefix = any(k.startswith(prefix) for k in state)
  if wants_prefix and not has_prefix:
    return {prefix + k: v for k, v in state.items()}
  if has_prefix and not wants_prefix:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
  return state


_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _adapt_vae_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """VAEs saved by older diffusers name the mid-block attention query/key/value/proj_attn."""
  renamed = {}
  for key, value in state.items():
    parts = key.split(".")
    # e.g. encoder.mid_block.attentions.0.query.weight -> ...attentions.0.to_q.weight
    if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _LEGACY_VAE_ATTENTION:
      key = ".".join([*parts[:-2], _LEGACY_VAE_ATTENTION[parts[-2]], parts[-1]])
    renamed[key] = value
  return renamed


def _load_component(
  folder: Path, component: str, config: dict, dtype, **module_args
) -> tuple[Any, Any]:
  """Builds one module from its config and loads its weights; returns (module, params)."""
  from sdsjax.models import convert

  where = folder / component
  cls = _module_classes()[component]
  try:
    module = cls.from_config(config, dtype=dtype, **module_args)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *_init_inputs(component, config))
  except CheckpointError as e:
    raise CheckpointError(f"{where}/config.json: {e}") from None
  except (KeyError, ValueError, TypeError, NotImplementedError, AssertionError) as e:
    raise CheckpointError(
      f"{where}/config.json is not a supported {cls.__name__} config ({type(e).__name__}: {e})"
    ) from None
  target = shapes["params"]
  state = read_safetensors(hub.weight_files(where))
  if component == "text_encoder":
    state = _adapt_text_encoder_keys(state, target)
  elif component == "vae":
    state = _adapt_vae_keys(state)
  try:
    params = convert.convert_state_dict(state, target)
  except CheckpointError as e:
    raise CheckpointError(f"{where}: {e}") from None
  del state
  params = jax.tree.map(
    lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x),
    params,
  )
  return module, params


def _load_tokenizer(folder: Path):
  from transformers import CLIPTokenizer

  try:
    return CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
  except Exception as e:
    raise CheckpointError(
      f"cannot load the CLIP tokenizer from {folder / 'tokenizer'} ({type(e).__name__}: {e})"
    ) from None


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
  """`"tiny-random"`, a folder or a hub id -> a checked local diffusers-format folder."""
  if os.fspath(path_or_hub_id) == tiny_random.NAME:
    try:
      return hub.check_folder(tiny_random.materialize_tiny_random())
    except OSError as e:
      raise CheckpointError(
        f"cannot write the tiny-random model under {tiny_random.cache_root()} "
        f"({e.strerror or e}): set SDSJAX_CACHE to a writable folder"
      ) from None
  return hub.resolve(path_or_hub_id)


def load_stable_diffusion(
  path_or_hub_id: str | os.PathLike, dtype=jnp.float32, remat_vae: bool = True
) -> StableDiffusion:
  """Loads a Stable Diffusion checkpoint into a `StableDiffusion` bundle.

  Args:
    path_or_hub_id: `"tiny-random"` (built-in, random weights, for tests), a diffusers-format
      folder, or a Hugging Face Hub id such as `stabilityai/stable-diffusion-2-1-base` (read from
      the local cache first, then downloaded: configs, tokenizer and safetensors only).
    dtype: parameter and compute dtype (float32 or bfloat16); outputs are float32.
    remat_vae: recompute (parts of) the VAE encoder in the backward pass of `encode_image`
      (saves memory; autoencoder_kl.remat_policy).

  Returns:
    The bundle; see `StableDiffusion`.

  Raises:
    CheckpointError: a missing or incomplete checkpoint, unreadable or mis-shaped weights, an
      unsupported config, or no network and no cached copy. The message is one line.
  """
  folder = resolve_checkpoint(path_or_hub_id)
  configs = {c: _read_json(folder / c / name) for c, name in hub.CONFIG_FILES.items()}
  # The cheap checks first, so a bad scheduler or tokenizer fails before gigabytes are read.
  scheduler = configs["scheduler"]
  prediction_type = scheduler.get("prediction_type", "epsilon")
  if prediction_type not in ("epsilon", "v_prediction", "sample"):
    raise CheckpointError(
      f"{folder}/scheduler/scheduler_config.json: prediction_type "
      f"{prediction_type!r} is not supported (epsilon, v_prediction, sample)"
    )
  alphas_cumprod = alphas_cumprod_from_config(scheduler)
  tokenizer = _load_tokenizer(folder)
  # The VAE rematerialises its encoder blocks itself (finer-grained than one jax.checkpoint).
  module_args = {"unet": {}, "vae": {"remat": bool(remat_vae)}, "text_encoder": {}}
  modules, params = {}, {}
  for component in ("unet", "vae", "text_encoder"):
    modules[component], params[component] = _load_component(
      folder, component, configs[component], dtype, **module_args[component]
    )
  vae_config = configs["vae"]
  return StableDiffusion(
    unet=modules["unet"],
    vae=modules["vae"],
    text_encoder=modules["text_encoder"],
    tokenizer=tokenizer,
    params=params,
    alphas_cumprod=alphas_cumprod,
    scaling_factor=float(vae_config.get("scaling_factor") or DEFAULT_SCALING_FACTOR),
    shift_factor=float(vae_config.get("shift_factor") or 0.0),
    prediction_type=prediction_type,
    dtype=dtype,
    folder=folder,
    configs=configs,
    remat_vae=remat_vae,
  )
