"""Loading Stable Diffusion: tiny-random, folders, offline hub ids, bad checkpoints, schedules."""

import json
import shutil
from pathlib import Path

import flax.traverse_util
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from sdsjax.errors import CheckpointError
from sdsjax.models import hub
from sdsjax.models import stable_diffusion as sd_lib
from sdsjax.models import tiny_random

UNET_KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
  """SDSJAX_CACHE pointed at a fresh temp dir for the whole module."""
  with pytest.MonkeyPatch.context() as mp:
    root = tmp_path_factory.mktemp("sdsjax_cache")
    mp.setenv("SDSJAX_CACHE", str(root))
    yield root


@pytest.fixture(scope="module")
def sd(tiny_cache):
  return sd_lib.load_stable_diffusion("tiny-random")


@pytest.fixture
def folder_copy(sd, tmp_path):
  """A writable copy of the tiny-random folder."""
  return Path(shutil.copytree(sd.folder, tmp_path / "ckpt"))


def assert_one_line_error(excinfo, *fragments):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message
  # Raised `from None`: the user sees one error, not a chain of library tracebacks.
  error = excinfo.value
  assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
  return message


# ---------------------------------------------------------------------------------------------
# tiny-random


def test_tiny_random_loads(sd, tiny_cache):
  assert sd.folder == tiny_cache / f"tiny-random-{tiny_random.VERSION}"
  assert set(sd.params) == {"unet", "vae", "text_encoder"}
  assert sd.scaling_factor == pytest.approx(0.18215)
  assert sd.prediction_type == "epsilon"
  assert sd.alphas_cumprod.shape == (1000,) and sd.alphas_cumprod.dtype == np.float32
  emb = sd.encode_text(["a photo of an old man", "a bald pirate"])
  z = sd.encode_image(sd.params["vae"], jnp.full((2, 64, 64, 3), 0.5))
  assert z.shape == (2, 8, 8, 4) and z.dtype == jnp.float32
  eps = sd.predict_noise(sd.params["unet"], z, jnp.array([10, 900]), emb)
  assert eps.shape == z.shape and bool(jnp.all(jnp.isfinite(eps)))
  # The values are checked against diffusers in test_tiny_random_matches_pytorch.
  image = sd.decode_latents(sd.params["vae"], z)
  assert image.shape == (2, 64, 64, 3)
  assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
  # A second load reuses the cached folder.
  again = sd_lib.resolve_checkpoint("tiny-random")
  assert again == sd.folder


def test_tiny_random_is_deterministic(sd, tmp_path):
  a = tiny_random.write_tiny_random(tmp_path / "a")
  b = tiny_random.write_tiny_random(tmp_path / "b")
  for rel in (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
  ):
    assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / rel).read_bytes() == (sd.folder / rel).read_bytes(), rel
  loaded = sd_lib.load_stable_diffusion(b)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, sd.params)


def _load_in_pytorch(folder):
  """The folder's UNet, VAE and text encoder loaded by diffusers / transformers, checking that
  no key is missing, unexpected or mis-shaped."""
  import diffusers
  import transformers

  models = {}
  for cls, sub in (
    (diffusers.UNet2DConditionModel, "unet"),
    (diffusers.AutoencoderKL, "vae"),
    (transformers.CLIPTextModel, "text_encoder"),
  ):
    model, info = cls.from_pretrained(folder / sub, output_loading_info=True)
    problems = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not any(problems.values()), (sub, problems)
    models[sub] = model.eval()
  return models


def _relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return float(np.abs(ours - reference).max() / max(1.0, np.abs(reference).max()))


def test_tiny_random_matches_pytorch(sd):
  """diffusers loads the folder and computes what sdsjax computes, on the same inputs."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  models = _load_in_pytorch(sd.folder)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(sd.folder / "tokenizer")
  ids = tokenizer("a photo of an old man")["input_ids"]
  assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
  assert len(ids) == 2 + 6  # whole words are single tokens in the tiny vocabulary

  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))
  nhwc = lambda x: np.transpose(x.detach().numpy(), (0, 2, 3, 1))
  rng = np.random.default_rng(0)
  images = rng.uniform(0.0, 1.0, (2, 64, 64, 3)).astype(np.float32)
  z_t = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([10, 900])
  emb = sd.encode_text(["a photo of an old man", "a bald pirate"])
  with torch.no_grad():
    mean = models["vae"].encode(nchw(2.0 * images - 1.0)).latent_dist.mean
    want_latents = nhwc(mean) * sd.scaling_factor
    want_images = nhwc((models["vae"].decode(mean).sample / 2 + 0.5).clamp(0, 1))
    want_eps = nhwc(
      models["unet"](nchw(z_t), torch.from_numpy(t), torch.from_numpy(np.array(emb))).sample
    )
  errors = {
    "latents": _relative_error(
      sd.encode_image(sd.params["vae"], jnp.asarray(images)), want_latents
    ),
    "decoded": _relative_error(sd.decode_latents(sd.params["vae"], want_latents), want_images),
    "eps": _relative_error(sd.predict_noise(sd.params["unet"], z_t, t, emb), want_eps),
  }
  assert all(v < 1e-4 for v in errors.values()), errors


def test_random_checkpoint_layouts_load_in_pytorch(tmp_path):
  """The state-dict layout derived from the Flax modules matches diffusers' for SD-2.x options
  too (linear projections, per-block head counts, two layers per block)."""
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  pytest.importorskip("transformers")
  configs = dict(
    tiny_random.TINY_CONFIGS,
    unet=dict(
      tiny_random.UNET_CONFIG,
      down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
      block_out_channels=[32, 32, 64],
      layers_per_block=2,
      attention_head_dim=[2, 4, 8],
      use_linear_projection=True,
      transformer_layers_per_block=[1, 2, 1],
    ),
    vae=dict(tiny_random.VAE_CONFIG, layers_per_block=2),
    text_encoder=dict(tiny_random.TEXT_ENCODER_CONFIG, hidden_act="gelu", num_hidden_layers=3),
  )
  folder = tiny_random.write_random_checkpoint(tmp_path / "ckpt", configs, seed=5)
  _load_in_pytorch(folder)
  loaded = sd_lib.load_stable_diffusion(folder)
  assert loaded.configs["unet"]["use_linear_projection"] is True


def test_encode_text_matches_transformers(sd):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  prompts = ["a photo of an old man, front view", "A bald PIRATE!", ""]
  emb = sd.encode_text(prompts)
  assert emb.shape == (3, 77, 32)
  ids = sd.tokenize(prompts)
  model = transformers.CLIPTextModel.from_pretrained(sd.folder / "text_encoder").eval()
  with torch.no_grad():
    ref = model(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  np.testing.assert_array_equal(ids[:, 0], sd.tokenizer.bos_token_id)
  assert np.abs(np.asarray(emb) - ref).max() / max(1.0, np.abs(ref).max()) < 1e-4


def _kernel_transforms(fn, *args) -> int:
  """How many Winograd kernel transforms (the (36, 9) @ (9, Cin·Cout) GEMMs) `fn` computes."""

  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        n += tuple(eqn.invars[0].aval.shape) == (36, 9)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_prepared_params_compute_the_same(sd):
  """prepare_params adds the Winograd kernel transforms once (CPU, float32); predict_noise and
  encode_image take either tree and return the same bits, without transforming kernels."""
  prepared = sd.prepare_params(sd.params, resolution=128)
  # The tiny UNet's 32-channel convs run as Winograd on 16² latents; the tiny VAE has too few
  # channels for it anywhere, and the text encoder has no convolutions.
  winograd_leaves = lambda tree: [
    "/".join(path)
    for path in flax.traverse_util.flatten_dict(tree)
    if path[-1].startswith("winograd")
  ]
  assert winograd_leaves(prepared["unet"])
  assert all(path.endswith("/winograd_kernel") for path in winograd_leaves(prepared["unet"]))
  assert (
    not winograd_leaves(prepared["vae"]) and prepared["text_encoder"] is sd.params["text_encoder"]
  )
  jax.tree.map(np.testing.assert_array_equal, prepared["vae"], sd.params["vae"])

  z_t = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 4))
  t = jnp.array([3, 801])
  emb = sd.encode_text(["an old man", "a child"])
  plain = sd.predict_noise(sd.params["unet"], z_t, t, emb)
  np.testing.assert_array_equal(sd.predict_noise(prepared["unet"], z_t, t, emb), plain)
  np.testing.assert_array_equal(sd.predict_noise(prepared["unet"], z_t, t, emb, {"view": 1}), plain)
  unet = lambda params: sd.unet.apply({"params": params}, z_t, t, emb)
  assert _kernel_transforms(unet, sd.params["unet"]) == len(winograd_leaves(prepared["unet"]))
  assert _kernel_transforms(unet, prepared["unet"]) == 0


def test_gradients_flow_through_encode_image(sd):
  images = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 32, 3), minval=0.1, maxval=0.9)
  weights = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 4, 4))

  def scalar(x):
    return jnp.sum(sd.encode_image(sd.params["vae"], x) * weights)

  grad = jax.jit(jax.grad(scalar))(images)
  assert grad.shape == images.shape and bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.abs(grad).max()) > 0.0
  direction = jax.random.normal(jax.random.PRNGKey(2), images.shape)
  direction = direction / jnp.linalg.norm(direction)
  step = 3e-2  # fp32: large enough that rounding noise stays far below 1e-2 relative
  f = jax.jit(scalar)
  finite_difference = (f(images + step * direction) - f(images - step * direction)) / (2 * step)
  analytic = jnp.vdot(grad, direction)
  assert abs(float(finite_difference - analytic)) / abs(float(analytic)) < 1e-2


# ---------------------------------------------------------------------------------------------
# Bad checkpoints.


def rewrite_unet(folder, edit):
  path = folder / "unet" / "diffusion_pytorch_model.safetensors"
  state = load_file(str(path))
  edit(state)
  save_file(state, str(path))


def test_missing_tensor_names_the_key(folder_copy):
  rewrite_unet(folder_copy, lambda state: state.pop(UNET_KEY))
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion(folder_copy)
  assert_one_line_error(excinfo, UNET_KEY, "unet")


def test_misshaped_tensor_names_the_key(folder_copy):
  def edit(state):
    state[UNET_KEY] = np.zeros((32, 31), np.float32)

  rewrite_unet(folder_copy, edit)
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion(folder_copy)
  assert_one_line_error(excinfo, UNET_KEY, "unet")


@pytest.mark.parametrize(
  "remove, named",
  [
    ("vae", "vae/"),
    ("tokenizer", "tokenizer/"),
    ("unet/config.json", "unet/config.json"),
    ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
    ("text_encoder/model.safetensors", "model.safetensors"),
    ("tokenizer/merges.txt", "tokenizer/merges.txt"),
  ],
)
def test_incomplete_folder_names_what_is_missing(folder_copy, remove, named):
  target = folder_copy / remove
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion(folder_copy)
  assert_one_line_error(excinfo, named)


def test_pickled_weights_only_and_bad_specs(folder_copy, tmp_path):
  weights = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
  weights.rename(weights.with_suffix(".bin"))
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion(folder_copy)
  assert_one_line_error(excinfo, "diffusion_pytorch_model.bin", "safetensors")
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion(tmp_path / "does-not-exist")
  assert_one_line_error(excinfo, "does-not-exist")
  (tmp_path / "model.ckpt").write_bytes(b"x")
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion(tmp_path / "model.ckpt")
  assert_one_line_error(excinfo, "diffusers-format folder")


def test_truncated_safetensors(folder_copy):
  path = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion(folder_copy)
  assert_one_line_error(excinfo, "download it again")


# ---------------------------------------------------------------------------------------------
# Weight file variants: fp16 only, sharded, bfloat16.


def test_fp16_variant_sharded_and_bfloat16(sd, folder_copy):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file as save_torch

  # unet: only the fp16 variant file.
  unet_path = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
  state = load_file(str(unet_path))
  save_file(
    {k: v.astype(np.float16) for k, v in state.items()},
    str(folder_copy / "unet" / "diffusion_pytorch_model.fp16.safetensors"),
  )
  unet_path.unlink()
  # text_encoder: two shards and an index.
  te_path = folder_copy / "text_encoder" / "model.safetensors"
  state = load_file(str(te_path))
  keys = sorted(state)
  shards = {
    "model-00001-of-00002.safetensors": keys[::2],
    "model-00002-of-00002.safetensors": keys[1::2],
  }
  for name, shard_keys in shards.items():
    save_file({k: state[k] for k in shard_keys}, str(folder_copy / "text_encoder" / name))
  weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
  (folder_copy / "text_encoder" / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {}, "weight_map": weight_map})
  )
  te_path.unlink()
  # vae: bfloat16, which numpy cannot read natively.
  vae_path = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
  state = load_file(str(vae_path))
  save_torch({k: torch.from_numpy(v).bfloat16() for k, v in state.items()}, str(vae_path))

  loaded = sd_lib.load_stable_diffusion(folder_copy)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3),
    loaded.params["unet"],
    sd.params["unet"],
  )
  jax.tree.map(
    np.testing.assert_array_equal, loaded.params["text_encoder"], sd.params["text_encoder"]
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2),
    loaded.params["vae"],
    sd.params["vae"],
  )

  # A shard the index names but that is missing.
  (folder_copy / "text_encoder" / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion(folder_copy)
  assert_one_line_error(excinfo, "model-00002-of-00002.safetensors")


# ---------------------------------------------------------------------------------------------
# Hub ids, without any network.


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
  """An empty Hugging Face cache; the network is off and every attempt to use it fails loudly."""
  import huggingface_hub.constants

  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  real_snapshot = hub._snapshot

  def local_only_snapshot(repo_id, local_only, fp16=False):
    if not local_only:
      raise AssertionError("a test tried to reach the Hugging Face Hub")
    return real_snapshot(repo_id, local_only=True, fp16=fp16)

  monkeypatch.setattr(hub, "_snapshot", local_only_snapshot)
  return tmp_path / "hf" / "hub"


def test_offline_without_cache_says_what_to_download(empty_hub):
  repo = "stabilityai/stable-diffusion-2-1-base"
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion(repo)
  message = assert_one_line_error(
    excinfo, f"hf download {repo}", "--model /path/to/folder", "text_encoder/model.safetensors"
  )
  assert ".bin" not in message


def test_unreachable_hub_says_what_to_download(empty_hub, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")

  def no_network(repo_id, local_only, fp16=False):
    raise ConnectionError("[Errno 101] Network is unreachable")

  monkeypatch.setattr(hub, "_snapshot", no_network)
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")
  assert_one_line_error(
    excinfo,
    "cannot reach the Hugging Face Hub",
    "hf download stable-diffusion-v1-5/stable-diffusion-v1-5",
  )


def test_hub_id_found_in_cache(sd, empty_hub):
  """A repo already in the HF cache loads offline, by id."""
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo_dir = empty_hub / "models--someone--tiny-sd"
  (repo_dir / "refs").mkdir(parents=True)
  (repo_dir / "refs" / "main").write_text(commit)
  shutil.copytree(sd.folder, repo_dir / "snapshots" / commit)
  loaded = sd_lib.load_stable_diffusion("someone/tiny-sd")
  assert loaded.folder == repo_dir / "snapshots" / commit
  np.testing.assert_array_equal(loaded.encode_text(["a head"]), sd.encode_text(["a head"]))
  # An incomplete cached copy: the message says what is missing from it.
  (repo_dir / "snapshots" / commit / "vae" / "config.json").unlink()
  with pytest.raises(CheckpointError) as excinfo:
    sd_lib.load_stable_diffusion("someone/tiny-sd")
  assert_one_line_error(excinfo, "hf download someone/tiny-sd", "incomplete", "vae/config.json")


def test_download_patterns_skip_pickles_and_extras():
  import fnmatch

  patterns = hub.download_patterns()

  def allowed(path):
    return any(fnmatch.fnmatch(path, p) for p in patterns)

  for path in (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
  ):
    assert allowed(path), path
  for path in (
    "unet/diffusion_pytorch_model.bin",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "safety_checker/model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "text_encoder/pytorch_model.bin",
  ):
    assert not allowed(path), path
  assert any(
    fnmatch.fnmatch("unet/diffusion_pytorch_model.fp16.safetensors", p)
    for p in hub.download_patterns(fp16=True)
  )


# ---------------------------------------------------------------------------------------------
# Noise schedule and prediction types.


@pytest.mark.parametrize(
  "config",
  [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(
      beta_schedule="scaled_linear",
      beta_start=0.00085,
      beta_end=0.012,
      rescale_betas_zero_snr=True,
      num_train_timesteps=500,
    ),
  ],
)
def test_alphas_cumprod_match_diffusers(config):
  diffusers = pytest.importorskip("diffusers")
  reference = diffusers.DDPMScheduler(**config).alphas_cumprod.numpy()
  ours = sd_lib.alphas_cumprod_from_config(config)
  assert ours.shape == reference.shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, reference, rtol=2e-5, atol=1e-7)


def test_unknown_schedule_is_a_checkpoint_error():
  with pytest.raises(CheckpointError, match="beta_schedule"):
    sd_lib.alphas_cumprod_from_config({"beta_schedule": "karras"})


def test_v_prediction_converted_to_epsilon(sd, folder_copy):
  config_path = folder_copy / "scheduler" / "scheduler_config.json"
  config = json.loads(config_path.read_text())
  config["prediction_type"] = "v_prediction"
  config_path.write_text(json.dumps(config))
  sd_v = sd_lib.load_stable_diffusion(folder_copy)
  assert sd_v.prediction_type == "v_prediction"
  z_t = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  t = jnp.array([3, 801])
  emb = sd.encode_text(["an old man", "a child"])
  eps = np.asarray(sd_v.predict_noise(sd_v.params["unet"], z_t, t, emb))
  # Same weights, epsilon bundle: the raw UNet output, here v.
  v = np.asarray(sd.predict_noise(sd.params["unet"], z_t, t, emb), np.float64)
  abar = sd.alphas_cumprod.astype(np.float64)[np.asarray(t)][:, None, None, None]
  expected = np.sqrt(abar) * v + np.sqrt(1.0 - abar) * np.asarray(z_t, np.float64)
  np.testing.assert_allclose(eps, expected, rtol=1e-5, atol=1e-5)
  assert np.abs(eps - v).max() > 1e-2  # the conversion did something

  # The formula recovers the ε that made z_t from a clean x_0.
  x0, noise = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 8, 8, 4))
  a = jnp.asarray(sd_v.alphas_cumprod)[t][:, None, None, None]
  z_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
  v_true = jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0
  np.testing.assert_allclose(sd_v.epsilon_from_output(v_true, z_t, t), noise, atol=1e-5)
