"""Stable Diffusion as pure JAX functions of explicit parameters.

`load_stable_diffusion(path_or_hub_id)` reads a diffusers-format checkpoint (a folder, a Hugging
Face Hub id, or the built-in `"tiny-random"`) into a `StableDiffusion` bundle. The bundle holds
the Flax modules (static structure) apart from their parameters, so a training step can jit the
model functions with the parameters as ordinary arguments:

    sd = load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")
    emb = sd.encode_text(["a photo of an old man"])              # (1, 77, 768), host-side
    z = sd.encode_image(sd.params["vae"], images)                 # (B, H/8, W/8, 4)
    eps = sd.predict_noise(sd.params["unet"], z_t, t, emb)        # (B, H/8, W/8, 4)

For a fit, `sd.prepare_params(sd.params, resolution)` computes once what depends on the frozen
weights only (Winograd kernel transforms on CPU); the model functions take either tree.

Weights are read with `safetensors.numpy` (never torch), their shapes checked against
`jax.eval_shape` of the module's init, and mapped onto the Flax tree by `sdsjax.models.convert`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers the numpy dtype "bfloat16" safetensors reads BF16 as
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

    Differentiable in `images`; H and W must be multiples of 8. Returns float32. `vae_params`:
    `params["vae"]`, or the same prepared by `prepare_params`.
    """
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, -1, 3)
    return self._encode_fn(vae_params, images)

  def decode_latents(self, vae_params: Params, latents: Array) -> Array:
    """Latents (B, h, w, C) -> images (B, 8h, 8w, 3) float32 in [0, 1] (clipped)."""
    chex.assert_rank(latents, 4)
    return self._decode_fn(vae_params, latents)

  def predict_noise(
    self,
    unet_params: Params,
    latents: Array,
    t: Array,
    text_embeddings: Array,
    context: Any = None,
  ) -> Array:
    """The UNet's noise prediction ε(z_t, t, text), converted to ε whatever the UNet predicts.

    Args:
      unet_params: `params["unet"]`, or the same prepared by `prepare_params`.
      latents: (B, h, w, C) noisy latents z_t.
      t: (B,) or () integer timesteps in [0, num_train_timesteps).
      text_embeddings: (B, L, D) from `encode_text`.
      context: ignored. Other denoisers may use what the fit step passes here (the sampled
        view); Stable Diffusion is conditioned on the text only.

    Returns:
      (B, h, w, C) float32 ε. For v-prediction, ε = √ᾱ_t·v + √(1−ᾱ_t)·z_t; for sample
      prediction, ε = (z_t − √ᾱ_t·x̂_0) / √(1−ᾱ_t).
    """
    chex.assert_rank([latents, text_embeddings], [4, 3])
    chex.assert_equal_shape_prefix([latents, text_embeddings], 1)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), latents.shape[:1])
    return self._noise_fn(unet_params, latents, t, text_embeddings)

  def prepare_params(self, params: Mapping[str, Params], resolution: int) -> dict[str, Params]:
    """`params` (`{"unet": ..., "vae": ..., ...}`) with what the fit step's model calls can
    compute once for frozen weights, for images of `resolution`² (latents of (resolution/8)²).

    On CPU in float32 that is the Winograd kernel transforms (`resnet.prepare_winograd`) of the
    3×3 convolutions that run as Winograd: in the UNet for `predict_noise`, and in the VAE encoder
    for `encode_image` and its gradient w.r.t. the images. The plain weights stay as they are and
    the results are the same; other backends and dtypes get `params` back unchanged. Extra
    memory: 4× each such kernel (8× in the encoder). Other components are passed through.
    """
    from sdsjax.models import resnet

    if resolution % 8:
      raise ValueError(f"resolution {resolution} is not a multiple of 8")
    side = resolution // 8
    unet_inputs = (
      jnp.zeros((1, side, side, self.configs["unet"].get("in_channels", 4)), self.dtype),
      jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, self.text_length, self.text_dim), self.dtype),
    )
    images = jnp.zeros((1, resolution, resolution, 3), self.dtype)
    out = dict(params)
    out["unet"] = resnet.prepare_winograd(self.unet, params["unet"], unet_inputs)
    out["vae"] = resnet.prepare_winograd(
      self.vae, params["vae"], (images,), method=self.vae.encode, input_gradients=True
    )
    return out

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
  try:
    num_steps = int(config.get("num_train_timesteps", 1000))
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    trained = config.get("trained_betas")
    trained = None if trained is None else np.asarray(trained, np.float64).reshape(-1)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"scheduler config has a value of the wrong type ({e})") from None
  if not 2 <= num_steps <= 100_000:
    raise CheckpointError(f"scheduler num_train_timesteps={num_steps} must be in [2, 100000]")
  schedule = config.get("beta_schedule", "linear")
  if trained is not None:
    betas = trained
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
  if not (len(betas) >= 2 and np.all(np.isfinite(betas)) and np.all((betas > 0) & (betas < 1))):
    raise CheckpointError(
      f"scheduler betas must lie in (0, 1) (got beta_start={beta_start}, beta_end={beta_end}"
      f"{', trained_betas' if trained is not None else ''}): the scheduler config is corrupt"
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


def read_safetensors(files: Sequence[Path]) -> dict[str, np.ndarray]:
  """Reads one safetensors file or the shards of one checkpoint into a single state dict."""
  from safetensors.numpy import load_file

  state: dict[str, np.ndarray] = {}
  for path in files:
    try:
      tensors = load_file(str(path))  # bfloat16 as ml_dtypes.bfloat16 (imported above)
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


def build_component(
  component: str, config: Mapping[str, Any], dtype=jnp.float32, **module_args
) -> tuple[Any, Any]:
  """The Flax module of `component` ("unet", "vae" or "text_encoder") built from its config, and
  its parameter tree as ShapeDtypeStructs (from `jax.eval_shape` of its init: nothing runs)."""
  module = _module_classes()[component].from_config(config, dtype=dtype, **module_args)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *_init_inputs(component, config))
  return module, shapes["params"]


def _load_component(
  folder: Path, component: str, config: dict, dtype, **module_args
) -> tuple[Any, Any]:
  """Builds one module from its config and loads its weights; returns (module, params)."""
  from sdsjax.models import convert

  where = folder / component
  try:
    module, target = build_component(component, config, dtype, **module_args)
  except CheckpointError as e:
    raise CheckpointError(f"{where}/config.json: {e}") from None
  except Exception as e:  # a hostile or broken config fails in any way (IndexError, ZeroDivision)
    cls = _module_classes()[component]
    raise CheckpointError(
      f"{where}/config.json is not a supported {cls.__name__} config ({type(e).__name__}: {e})"
    ) from None
  state = read_safetensors(hub.weight_files(where))
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
  try:
    alphas_cumprod = alphas_cumprod_from_config(scheduler)
  except CheckpointError as e:
    raise CheckpointError(f"{folder}/scheduler/scheduler_config.json: {e}") from None
  tokenizer = _load_tokenizer(folder)
  vae_config = configs["vae"]
  factors = {}
  for name, default in (("scaling_factor", DEFAULT_SCALING_FACTOR), ("shift_factor", 0.0)):
    try:
      factors[name] = float(vae_config.get(name) or default)
    except (TypeError, ValueError):
      factors[name] = math.nan
    if not math.isfinite(factors[name]) or (name == "scaling_factor" and factors[name] <= 0):
      raise CheckpointError(
        f"{folder}/vae/config.json: {name}={vae_config.get(name)!r} must be a finite number"
        + (" > 0" if name == "scaling_factor" else "")
      )
  # The VAE rematerialises its encoder blocks itself (finer-grained than one jax.checkpoint).
  module_args = {"unet": {}, "vae": {"remat": bool(remat_vae)}, "text_encoder": {}}
  modules, params = {}, {}
  for component in ("unet", "vae", "text_encoder"):
    modules[component], params[component] = _load_component(
      folder, component, configs[component], dtype, **module_args[component]
    )
  return StableDiffusion(
    unet=modules["unet"],
    vae=modules["vae"],
    text_encoder=modules["text_encoder"],
    tokenizer=tokenizer,
    params=params,
    alphas_cumprod=alphas_cumprod,
    scaling_factor=factors["scaling_factor"],
    shift_factor=factors["shift_factor"],
    prediction_type=prediction_type,
    dtype=dtype,
    folder=folder,
    configs=configs,
    remat_vae=remat_vae,
  )
