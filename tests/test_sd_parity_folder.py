"""Acceptance: a diffusers-format folder written by PyTorch loads and matches PyTorch.

Small random diffusers `UNet2DConditionModel` / `AutoencoderKL` and transformers `CLIPTextModel`
with SD-1.5-shaped and SD-2.1-shaped configs (SD-2.1: linear projections, per-block head counts,
upcast attention, a wider cross-attention, GELU CLIP, v-prediction, "!" padding, legacy VAE
attention names) are saved with `save_pretrained`, loaded with `load_stable_diffusion`, and their
outputs compared with max|a − b| / max(1, max|b|) < 1e-4 in float32.
"""

import json
import time

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from sdsjax.models import stable_diffusion as sd_lib  # noqa: E402
from sdsjax.models import tiny_random  # noqa: E402

TOLERANCE = 1e-4

BLOCKS = dict(
  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
  block_out_channels=(32, 32, 64, 64),
  layers_per_block=2,
  norm_num_groups=16,
)
SD15 = dict(
  unet=dict(BLOCKS, sample_size=16, cross_attention_dim=48, attention_head_dim=8),
  text=dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    hidden_act="quick_gelu",
  ),
  scheduler=dict(prediction_type="epsilon"),
  pad_token=None,
  legacy_vae_names=False,
)
SD21 = dict(
  # One layer per block (SD-1.5 above has SD's two) keeps the compile, and the test, short.
  unet=dict(
    BLOCKS,
    sample_size=16,
    cross_attention_dim=64,
    attention_head_dim=(2, 4, 4, 8),
    use_linear_projection=True,
    upcast_attention=True,
    layers_per_block=1,
  ),
  text=dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    hidden_act="gelu",
  ),
  scheduler=dict(prediction_type="v_prediction"),
  pad_token="!",
  legacy_vae_names=True,
)
VAE = dict(
  down_block_types=("DownEncoderBlock2D",) * 4,
  up_block_types=("UpDecoderBlock2D",) * 4,
  block_out_channels=(16, 32, 32, 32),
  layers_per_block=2,
  norm_num_groups=8,
  latent_channels=4,
  sample_size=64,
)
SCHEDULER = dict(
  _class_name="DDIMScheduler",
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  num_train_timesteps=1000,
  clip_sample=False,
  set_alpha_to_one=False,
  steps_offset=1,
)
LEGACY_VAE_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def randomize(model, seed):
  """Deterministic O(1) weights for every parameter (norm scales and biases not 1 and 0)."""
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  state = tiny_random.random_state(shapes, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  return model.eval()


def write_folder(root, spec, seed):
  """Saves random PyTorch models with `spec`'s shapes as a diffusers-format folder."""
  torch.manual_seed(seed)
  folder = root / "checkpoint"
  tiny_random.write_tokenizer(folder / "tokenizer")
  vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
  if spec["pad_token"]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      config = json.loads((folder / "tokenizer" / name).read_text())
      config["pad_token"] = spec["pad_token"]
      (folder / "tokenizer" / name).write_text(json.dumps(config))
  unet = randomize(diffusers.UNet2DConditionModel(**spec["unet"]), seed)
  vae = randomize(diffusers.AutoencoderKL(**VAE), seed + 1)
  text_config = transformers.CLIPTextConfig(
    vocab_size=len(vocab),
    max_position_embeddings=77,
    bos_token_id=vocab["<|startoftext|>"],
    eos_token_id=vocab["<|endoftext|>"],
    pad_token_id=vocab["<|endoftext|>"],
    **spec["text"],
  )
  text_encoder = randomize(transformers.CLIPTextModel(text_config), seed + 2)
  unet.save_pretrained(folder / "unet")
  vae.save_pretrained(folder / "vae")
  text_encoder.save_pretrained(folder / "text_encoder")
  (folder / "scheduler").mkdir()
  (folder / "scheduler" / "scheduler_config.json").write_text(
    json.dumps(dict(SCHEDULER, **spec["scheduler"]))
  )
  if spec["legacy_vae_names"]:
    # Checkpoints saved by older diffusers name the VAE attention query/key/value/proj_attn.
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    renamed = {}
    for key, value in state.items():
      for new, old in LEGACY_VAE_NAMES.items():
        key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
      renamed[key] = value
    assert renamed.keys() != state.keys()
    save_file(renamed, str(path))
  return folder, unet, vae, text_encoder


def relative_error(ours, reference):
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return np.abs(ours - reference).max() / max(1.0, np.abs(reference).max())


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def nhwc(x):
  return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("name, spec", [("sd15", SD15), ("sd21", SD21)])
def test_folder_matches_pytorch(name, spec, tmp_path):
  torch.set_num_threads(2)
  start = time.perf_counter()
  folder, unet, vae, text_encoder = write_folder(tmp_path, spec, seed=11 if name == "sd15" else 21)
  sd = sd_lib.load_stable_diffusion(folder)
  print(f"{name}: written and loaded in {time.perf_counter() - start:.1f} s")
  errors = {}
  rng = np.random.default_rng(0)

  # Text embeddings.
  prompts = ["a photo of an old man, front view", "a bald pirate with a beard"]
  ids = sd.tokenize(prompts)
  if spec["pad_token"]:
    assert ids[0, -1] == sd.tokenizer.convert_tokens_to_ids(spec["pad_token"])
  with torch.no_grad():
    ref = text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
  errors["text"] = relative_error(sd.encode_text(prompts), ref)

  # VAE: latents = posterior mean × scaling factor; decoding back to [0, 1].
  images = rng.uniform(0.0, 1.0, (2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    mean = vae.encode(nchw(2.0 * images - 1.0)).latent_dist.mean
    ref_latents = nhwc(mean * vae.config.scaling_factor)
    ref_images = nhwc((vae.decode(mean).sample / 2 + 0.5).clamp(0, 1))
  latents = sd.encode_image(sd.params["vae"], jnp.asarray(images))
  errors["vae_latents"] = relative_error(latents, ref_latents)
  errors["vae_decoded"] = relative_error(
    sd.decode_latents(sd.params["vae"], ref_latents), ref_images
  )

  # UNet: ε after the prediction-type conversion (v -> ε with diffusers' ᾱ for SD-2.1).
  z_t = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  t = np.array([17, 733])
  emb = rng.standard_normal((2, 77, spec["unet"]["cross_attention_dim"])).astype(np.float32)
  with torch.no_grad():
    raw = unet(nchw(z_t), torch.from_numpy(t), torch.from_numpy(emb)).sample
  scheduler = diffusers.DDIMScheduler(**{k: v for k, v in SCHEDULER.items() if k[0] != "_"})
  abar = scheduler.alphas_cumprod[torch.from_numpy(t)].reshape(2, 1, 1, 1)
  if spec["scheduler"]["prediction_type"] == "v_prediction":
    ref_eps = abar.sqrt() * raw + (1 - abar).sqrt() * nchw(z_t)
  else:
    ref_eps = raw
  errors["unet_eps"] = relative_error(
    sd.predict_noise(sd.params["unet"], jnp.asarray(z_t), jnp.asarray(t), jnp.asarray(emb)),
    nhwc(ref_eps),
  )
  print(f"{name}: {time.perf_counter() - start:.1f} s,", {k: f"{v:.2e}" for k, v in errors.items()})
  assert all(v < TOLERANCE for v in errors.values()), errors
