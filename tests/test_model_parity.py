"""Parity of the Flax UNet, VAE and CLIP text encoder with diffusers / transformers (PyTorch).

Small random PyTorch models with SD-1.5-shaped and SD-2.1-shaped configs (same block types and
attention options, small channel counts); their state dicts go through
`sdsjax.models.convert` as numpy arrays and both sides run on the same inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sdsjax.errors import CheckpointError  # noqa: E402
from sdsjax.models import convert  # noqa: E402
from sdsjax.models.autoencoder_kl import AutoencoderKL  # noqa: E402
from sdsjax.models.clip_text_model import CLIPTextModel  # noqa: E402
from sdsjax.models.unet_2d_condition import UNet2DConditionModel  # noqa: E402

TOL = 1e-4

# SD 1.5: conv projections, 8 heads everywhere, 768-d context (shrunk).
UNET_SD15 = dict(
  sample_size=8,
  in_channels=4,
  out_channels=4,
  layers_per_block=2,
  block_out_channels=(32, 64, 64),
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  cross_attention_dim=48,
  attention_head_dim=8,
  norm_num_groups=32,
  flip_sin_to_cos=True,
  freq_shift=0,
)
# SD 2.1: linear projections, per-block head COUNTS in attention_head_dim, upcast attention,
# 1024-d context (shrunk).
UNET_SD21 = dict(
  UNET_SD15,
  cross_attention_dim=64,
  attention_head_dim=(2, 4, 8),
  use_linear_projection=True,
  upcast_attention=True,
)
VAE = dict(
  in_channels=3,
  out_channels=3,
  latent_channels=4,
  layers_per_block=2,
  block_out_channels=(32, 32, 64),
  norm_num_groups=32,
  down_block_types=("DownEncoderBlock2D",) * 3,
  up_block_types=("UpDecoderBlock2D",) * 3,
)
CLIP_SD15 = dict(
  vocab_size=1000,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
)
CLIP_SD21 = dict(CLIP_SD15, hidden_act="gelu")


def _numpy_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _randomise(model, seed):
  """Random weights everywhere (diffusers zero-initialises some output layers)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(
        torch.randn(p.shape, generator=gen)
        * (1.0 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1)
      )
  return model.eval()


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


def _flax_params(module, state, *example):
  target = jax.eval_shape(module.init, jax.random.PRNGKey(0), *example)
  return convert.convert_state_dict(state, target["params"])


@pytest.mark.parametrize("config", [UNET_SD15, UNET_SD21], ids=["sd15", "sd21"])
def test_unet_parity(config):
  torch.manual_seed(0)
  pt = _randomise(diffusers.UNet2DConditionModel(**config), 1)
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)  # NCHW for torch
  t = np.array([10, 700], np.int64)
  context = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
  with torch.no_grad():
    want = pt(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context)).sample
  want = want.numpy().transpose(0, 2, 3, 1)

  full_config = dict(pt.config, _class_name="UNet2DConditionModel", _diffusers_version="x")
  model = UNet2DConditionModel.from_config(full_config)
  x = jnp.asarray(sample.transpose(0, 2, 3, 1))
  params = _flax_params(model, _numpy_state(pt), x, jnp.asarray(t), jnp.asarray(context))
  got = jax.jit(model.apply)({"params": params}, x, jnp.asarray(t), jnp.asarray(context))
  assert got.shape == want.shape
  assert _rel_err(got, want) < TOL


def _old_attention_names(state):
  """The VAE state dict as diffusers < 0.14 named its attention (query/key/value/proj_attn)."""
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for k, v in state.items():
    for new, name in renames.items():
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
    old[k] = v
  assert sum(".query." in k for k in old) == 4  # weight, bias; encoder, decoder
  return old


def test_vae_parity():
  torch.manual_seed(0)
  pt = _randomise(diffusers.AutoencoderKL(**VAE), 2)
  rng = np.random.default_rng(1)
  images = np.tanh(rng.standard_normal((1, 3, 32, 32))).astype(np.float32)
  with torch.no_grad():
    posterior = pt.encode(torch.from_numpy(images)).latent_dist
    want_mean = posterior.mean.numpy().transpose(0, 2, 3, 1)
    want_logvar = posterior.logvar.numpy().transpose(0, 2, 3, 1)
    want_image = pt.decode(posterior.mean).sample.numpy().transpose(0, 2, 3, 1)

  model = AutoencoderKL.from_config(dict(pt.config, _class_name="AutoencoderKL"), remat=True)
  x = jnp.asarray(images.transpose(0, 2, 3, 1))
  state = _numpy_state(pt)
  params = _flax_params(model, state, x)
  # Old attention names convert to the same tree.
  old_params = _flax_params(model, _old_attention_names(state), x)
  jax.tree.map(np.testing.assert_array_equal, params, old_params)

  encode = lambda p, x: model.apply({"params": p}, x, method=model.encode)
  mean, logvar = jax.jit(encode)(params, x)
  decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, mean)
  assert mean.shape == (1, 8, 8, 4) and decoded.shape == (1, 32, 32, 3)
  assert _rel_err(mean, want_mean) < TOL
  assert _rel_err(logvar, want_logvar) < TOL
  assert _rel_err(decoded, want_image) < TOL
  # The encoder's gradient w.r.t. the image, with every remat policy and without remat.
  xt = torch.from_numpy(images).requires_grad_(True)
  pt.encode(xt).latent_dist.mean.sum().backward()
  want_grad = xt.grad.numpy().transpose(0, 2, 3, 1)

  def encode_grad(module, params):  # params as a jit argument, as in a fit (not folded)
    mean = lambda x, p: module.apply({"params": p}, x, method=module.encode)[0].sum()
    return jax.jit(jax.grad(mean))(x, params)

  grads = {}
  for remat, policy in ((True, "convs"), (True, "blocks"), (False, "auto")):
    grads[policy] = encode_grad(model.clone(remat=remat, remat_policy=policy), params)
    assert _rel_err(grads[policy], want_grad) < TOL, policy
  # Winograd kernel transforms prepared once (CPU): found inside the remat blocks, same bits.
  from sdsjax.models import resnet

  prepared = resnet.prepare_winograd(model, params, (x,), method=model.encode, input_gradients=True)
  if jax.default_backend() == "cpu":
    assert "winograd_kernel" in prepared["encoder"]["down_blocks_0"]["resnets_0"]["conv1"]
  grad = encode_grad(model.clone(remat=True, remat_policy="convs"), prepared)
  np.testing.assert_array_equal(grad, grads["convs"])
  with pytest.raises(ValueError, match="remat_policy"):
    model.clone(remat_policy="everything").apply({"params": params}, x, method="encode")


@pytest.mark.parametrize("config", [CLIP_SD15, CLIP_SD21], ids=["sd15", "sd21"])
def test_clip_text_parity(config):
  torch.manual_seed(0)
  pt = _randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)), 3)
  ids = np.random.default_rng(2).integers(0, config["vocab_size"], (2, 77)).astype(np.int64)
  with torch.no_grad():
    want = pt(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
  model = CLIPTextModel.from_config(dict(pt.config.to_dict()))
  x = jnp.asarray(ids, jnp.int32)
  params = _flax_params(model, _numpy_state(pt), x)
  got = jax.jit(model.apply)({"params": params}, x)
  assert got.shape == (2, 77, config["hidden_size"])
  assert _rel_err(got, want) < TOL


def _small_unet_target():
  model = UNet2DConditionModel.from_config(UNET_SD15)
  pt = diffusers.UNet2DConditionModel(**UNET_SD15)
  target = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(0),
    jnp.zeros((1, 8, 8, 4)),
    jnp.zeros((1,)),
    jnp.zeros((1, 7, 48)),
  )["params"]
  return _numpy_state(pt), target


@pytest.mark.parametrize(
  "component, config",
  [("unet", UNET_SD15), ("unet", UNET_SD21), ("vae", VAE), ("text_encoder", CLIP_SD21)],
  ids=["unet_sd15", "unet_sd21", "vae", "clip"],
)
def test_state_dict_layout_is_the_pytorch_one(component, config):
  """convert.torch_state_shapes of the Flax tree gives exactly the PyTorch model's state dict
  (what tiny_random.write_random_checkpoint writes)."""
  from sdsjax.models import stable_diffusion

  if component == "unet":
    pt = diffusers.UNet2DConditionModel(**config)
  elif component == "vae":
    pt = diffusers.AutoencoderKL(**config)
  else:
    pt = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
  pt_config = pt.config.to_dict() if component == "text_encoder" else dict(pt.config)
  _, target = stable_diffusion.build_component(component, pt_config)
  want = {k: tuple(v.shape) for k, v in pt.state_dict().items() if not k.endswith("position_ids")}
  # transformers >= 5 drops CLIP's `text_model.` root from state dicts; SD checkpoints have it.
  unrooted = lambda shapes: {k.removeprefix("text_model."): v for k, v in shapes.items()}
  assert unrooted(convert.torch_state_shapes(target)) == unrooted(want)


def test_checkpoint_errors_name_the_key():
  state, target = _small_unet_target()
  convert.convert_state_dict(state, target)  # matches

  missing = dict(state)
  del missing["down_blocks.0.resnets.0.conv1.weight"]
  with pytest.raises(CheckpointError, match=r"missing down_blocks\.0\.resnets\.0\.conv1\.weight"):
    convert.convert_state_dict(missing, target)

  bad = dict(state, **{"conv_in.weight": np.zeros((16, 4, 3, 3), np.float32)})
  with pytest.raises(
    CheckpointError,
    match=r"shape mismatch conv_in\.weight \(16, 4, 3, 3\) vs expected "
    r"\(32, 4, 3, 3\)",
  ):
    convert.convert_state_dict(bad, target)

  extra = dict(state, **{"down_blocks.9.foo.weight": np.zeros((3,), np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected down_blocks\.9\.foo\.weight"):
    convert.convert_state_dict(extra, target)


def test_conversion_rules():
  assert convert.flax_path(
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight"
  ) == ("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn1", "to_out_0", "weight")
  assert convert.flax_path("encoder.mid_block.attentions.0.query.bias") == (
    "encoder",
    "mid_block",
    "attentions_0",
    "to_q",
    "bias",
  )
  # The inverse: numbered children of ModuleLists only (TimestepEmbedding's linear_1 is not one).
  assert (
    convert.torch_key(("time_embedding", "linear_1", "kernel")) == "time_embedding.linear_1.weight"
  )
  assert (
    convert.torch_key(
      ("up_blocks_1", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "bias")
    )
    == "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.bias"
  )
  assert (
    convert.torch_key(("text_model", "final_layer_norm", "scale"))
    == "text_model.final_layer_norm.weight"
  )
  conv_w = np.arange(2 * 3 * 3 * 5, dtype=np.float32).reshape(2, 3, 3, 5)  # O, I, kh, kw
  name, k = convert.convert_leaf(conv_w, "weight", {"kernel": np.zeros((3, 5, 3, 2))})
  assert name == "kernel" and k.shape == (3, 5, 3, 2) and k[1, 4, 2, 0] == conv_w[0, 2, 1, 4]
  lin = np.arange(6, dtype=np.float32).reshape(2, 3)  # out, in
  name, k = convert.convert_leaf(lin, "weight", {"kernel": np.zeros((3, 2)), "bias": None})
  assert name == "kernel" and np.array_equal(k, lin.T)
  assert convert.convert_leaf(lin[0], "weight", {"scale": None, "bias": None})[0] == "scale"
  assert convert.convert_leaf(lin, "weight", {"embedding": None})[0] == "embedding"
  assert convert.convert_leaf(lin[0], "bias", {"kernel": None, "bias": None})[0] == "bias"


@pytest.mark.parametrize(
  "shape,kernel,stride,padding,out,algorithm",
  [
    ((2, 8, 8, 5), 3, 1, 1, 7, "im2col"),  # ≤ IM2COL_MAX_PIXELS
    ((2, 22, 26, 32), 3, 1, 1, 40, "winograd"),  # H, W not multiples of the 4×4 tile
    ((1, 16, 16, 48), 3, 1, 1, 32, "winograd"),
    ((2, 24, 24, 5), 3, 1, 1, 7, "xla"),  # too few channels for Winograd
    ((2, 8, 8, 5), 1, 1, 0, 7, "matmul"),  # 1×1
    ((2, 9, 9, 5), 3, 2, 0, 7, "xla"),  # stride 2, no padding (VAE downsampler)
  ],
)
def test_conv2d_matches_torch(shape, kernel, stride, padding, out, algorithm):
  """Every CPU path of Conv2D, forward and both gradients, against torch's conv2d."""
  from sdsjax.models.resnet import Conv2D
  from sdsjax.models.resnet import conv_algorithm

  assert conv_algorithm(jnp.zeros(shape), kernel, out, stride, padding) == algorithm
  rng = np.random.default_rng(shape[1] + kernel)
  x = rng.standard_normal(shape).astype(np.float32)
  w = rng.standard_normal((out, shape[-1], kernel, kernel)).astype(np.float32)  # torch OIHW
  b = rng.standard_normal((out,)).astype(np.float32)
  conv = Conv2D(out, kernel, stride=stride, padding=padding)
  params = {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)), "bias": jnp.asarray(b)}
  got, vjp = jax.vjp(lambda p, x: conv.apply({"params": p}, x), params, jnp.asarray(x))

  xt, wt = (torch.from_numpy(a).requires_grad_(True) for a in (x.transpose(0, 3, 1, 2), w))
  want = torch.nn.functional.conv2d(xt, wt, torch.from_numpy(b), stride=stride, padding=padding)
  dy = rng.standard_normal(want.shape).astype(np.float32)
  want.backward(torch.from_numpy(dy))
  dparams, dx = vjp(jnp.asarray(dy.transpose(0, 2, 3, 1)))

  def close(a, b):  # Winograd's error is ~2e-5 of the output's scale
    a, b = np.asarray(a), b.detach().numpy()
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)), np.max(np.abs(a - b))

  close(got, want.permute(0, 2, 3, 1))
  close(dx, xt.grad.permute(0, 2, 3, 1))
  close(dparams["kernel"], wt.grad.permute(2, 3, 1, 0))

  # With the kernel transforms prepared once: the same bits, forward and backward.
  from sdsjax.models import resnet

  prepared = resnet.prepare_winograd(conv, params, (jnp.asarray(x),), input_gradients=True)
  extra = set(prepared) - set(params)
  assert extra == (
    {resnet.WINOGRAD_KERNEL, resnet.WINOGRAD_INPUT_GRADIENT_KERNEL}
    if algorithm == "winograd"
    else set()
  )
  got_p, vjp_p = jax.vjp(lambda p, x: conv.apply({"params": p}, x), prepared, jnp.asarray(x))
  dparams_p, dx_p = vjp_p(jnp.asarray(dy.transpose(0, 2, 3, 1)))
  np.testing.assert_array_equal(got_p, got)
  np.testing.assert_array_equal(dx_p, dx)
  np.testing.assert_array_equal(dparams_p["kernel"], dparams["kernel"])
