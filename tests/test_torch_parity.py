"""Gradient parity: the PyTorch baseline (benchmarks/torch_baseline) and sdsjax compute the same
SDS gradient on the 3DMM weights for the same weights, views, t and noise.

The stages are also compared one by one (text embeddings, ᾱ, the bilinear upsampling, the soft
render and its face selection, the VAE latents, the optimiser), so a failure points at its stage.
Settings: configs/tiny.yaml (render 32², SD 64², the tiny-random model written once and loaded by
both sides from the same diffusers folder).
"""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks.torch_baseline import raster as torch_raster  # noqa: E402
from benchmarks.torch_baseline import sds_step  # noqa: E402
from sdsjax import config as config_lib  # noqa: E402
from sdsjax import fit_step  # noqa: E402
from sdsjax import morphable  # noqa: E402
from sdsjax.fit_run import embedding_table  # noqa: E402
from sdsjax.models.stable_diffusion import load_stable_diffusion  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
PROMPT = "a portrait of an old man"
NUM_VIEWS = 2  # sds_samples: two views per step, so the mean over samples is checked too


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_torch(x) -> "torch.Tensor":
  return torch.from_numpy(np.array(x))


def torch_inputs(inputs: fit_step.StepInputs) -> sds_step.SdsInputs:
  """The same draws as sdsjax's StepInputs, in the baseline's layout (NCHW noise)."""
  views = inputs.views
  cameras, lights = torch_raster.cameras_and_lights(views.camera, views.light, to_torch)
  return sds_step.SdsInputs(
    cameras=cameras,
    lights=lights,
    azimuth=to_torch(views.azimuth),
    elevation=to_torch(views.elevation),
    t=to_torch(inputs.t).long(),
    noise=to_torch(inputs.noise).permute(0, 3, 1, 2).contiguous(),
  )


@pytest.fixture(scope="module")
def setup():
  cfg = config_lib.load_config(TINY, [dict(sds_samples=NUM_VIEWS)])
  sd = load_stable_diffusion("tiny-random")
  parts = sds_step.load_parts(sd.folder)
  head = morphable.load_model(cfg.head, cfg.num_components)
  cfg = fit_step.resolve_closeup_target(cfg, head.mean)
  torch_head = sds_step.Head.from_arrays(head.mean, head.basis, head.faces)
  # Step 7 of a run: non-zero t annealing, views drawn by sdsjax's own sampler.
  inputs = fit_step.make_sampler(cfg)(jax.random.PRNGKey(3), 7, len(sd.alphas_cumprod))
  weights = 0.7 * jax.random.normal(jax.random.PRNGKey(1), (cfg.num_components,))
  return dict(
    cfg=cfg, sd=sd, parts=parts, head=head, torch_head=torch_head, inputs=inputs, weights=weights
  )


def test_text_embeddings_match(setup):
  cfg, sd, parts = setup["cfg"], setup["sd"], setup["parts"]
  jax_emb = embedding_table(sd, [PROMPT], cfg)
  torch_emb = sds_step.embedding_table(parts, [PROMPT], cfg.negative_prompt, cfg.view_prompts)
  assert torch_emb.shape == jax_emb.shape
  np.testing.assert_allclose(torch_emb.numpy(), np.asarray(jax_emb), atol=2e-5, rtol=1e-4)


def test_alphas_cumprod_match(setup):
  np.testing.assert_allclose(
    setup["parts"].alphas_cumprod.numpy(), setup["sd"].alphas_cumprod, rtol=2e-6
  )


@pytest.mark.parametrize("src,dst", [(32, 64), (128, 512), (48, 64)])
def test_bilinear_upsampling_matches(src, dst):
  """F.interpolate(bilinear, align_corners=False) == jax.image.resize(bilinear) when upsampling."""
  image = np.random.default_rng(0).random((2, src, src, 3), np.float32)
  jax_out = jax.image.resize(jnp.asarray(image), (2, dst, dst, 3), method="bilinear")
  torch_out = torch.nn.functional.interpolate(
    torch.from_numpy(image).permute(0, 3, 1, 2),
    size=(dst, dst),
    mode="bilinear",
    align_corners=False,
  ).permute(0, 2, 3, 1)
  np.testing.assert_allclose(torch_out.numpy(), np.asarray(jax_out), atol=2e-6)


def test_renders_match(setup):
  """The ported rasterizer selects the same faces and renders the same pixels."""
  from sdsjax import raster as jax_raster

  cfg, head, inputs, weights = setup["cfg"], setup["head"], setup["inputs"], setup["weights"]
  settings = config_lib.raster_settings(cfg, cfg.render_resolution)

  @jax.jit
  def jax_render(weights, views):
    def one(view):
      rgb, _ = fit_step.render_view(cfg, head, {"weights": weights}, view, settings)
      projected = jax_raster.project_mesh(
        morphable.vertices(head, weights), head.faces, view.camera, settings
      )
      return rgb, jax_raster.select_faces(projected, settings)[0]

    return jax.vmap(one)(views)

  jax_rgb, jax_ids = jax_render(weights, inputs.views)

  grad = sds_step.SdsGradient(cfg, setup["torch_head"], setup["parts"])
  tin = torch_inputs(inputs)
  with torch.no_grad():
    w = to_torch(weights)[None]
    torch_rgb = grad.render(w, tin)
    verts = setup["torch_head"].vertices(w).repeat_interleave(NUM_VIEWS, 0)
    xy, z, valid, outline = torch_raster.project(
      verts, setup["torch_head"].faces, tin.cameras, grad.settings
    )
    torch_ids, _ = torch_raster.select_faces(xy, z, valid, outline, grad.settings)
  # Slot order may differ between exact ties; the set of faces per pixel may not (a float-level
  # near-tie at the K-th slot may flip a few pixels, hence the 0.5% allowance).
  same = np.all(np.sort(np.asarray(jax_ids), -1) == np.sort(torch_ids.numpy(), -1), -1)
  assert same.mean() > 0.995, f"{np.sum(~same)} of {same.size} pixels select other faces"
  assert float(np.asarray(jax_rgb).std()) > 0.05  # the head is in view
  np.testing.assert_allclose(torch_rgb.numpy(), np.asarray(jax_rgb), atol=1e-4)


def test_latents_match(setup):
  sd, parts = setup["sd"], setup["parts"]
  images = np.random.default_rng(1).random((2, 64, 64, 3), np.float32)
  jax_z = sd.encode_image(sd.params["vae"], jnp.asarray(images))
  grad = sds_step.SdsGradient(setup["cfg"], setup["torch_head"], parts)
  with torch.no_grad():
    torch_z = grad.encode(torch.from_numpy(images))  # 64² -> 64²: the resize is the identity
  assert rel_err(torch_z.permute(0, 2, 3, 1).numpy(), jax_z) < 1e-5


def test_sds_gradient_parity(setup):
  """The headline check: ‖g_torch − g_jax‖ / ‖g_jax‖ < 1e-3 on the 3DMM weights."""
  cfg, sd, parts = setup["cfg"], setup["sd"], setup["parts"]
  inputs, weights = setup["inputs"], setup["weights"]
  frozen = fit_step.Frozen(
    vae_params=sd.params["vae"],
    unet_params=sd.params["unet"],
    alphas_cumprod=jnp.asarray(sd.alphas_cumprod, jnp.float32),
  )
  jax_emb = jnp.asarray(embedding_table(sd, [PROMPT], cfg))[0]
  compute = jax.jit(
    fit_step.make_gradient_fn(cfg, setup["head"], sd.encode_image, sd.predict_noise)
  )
  jax_grads, aux = compute({"weights": weights}, inputs, jax_emb, frozen)
  g_jax = np.asarray(jax_grads["weights"])

  torch_emb = sds_step.embedding_table(parts, [PROMPT], cfg.negative_prompt, cfg.view_prompts)
  w = to_torch(weights)[None].requires_grad_(True)
  torch_aux = sds_step.SdsGradient(cfg, setup["torch_head"], parts)(
    w, torch_inputs(inputs), torch_emb
  )
  g_torch = w.grad[0].numpy()

  assert np.linalg.norm(g_jax) > 1e-6 and np.all(np.isfinite(g_jax))
  err = rel_err(g_torch, g_jax)
  print(f"relative gradient error {err:.2e}, |g_jax| {np.linalg.norm(g_jax):.4g}")
  assert err < 1e-3, err
  np.testing.assert_allclose(float(torch_aux["loss"]), float(aux["loss"]), rtol=1e-4)


@pytest.mark.parametrize("lr_schedule", ["cosine", "exponential"])
def test_optimizer_matches(lr_schedule):
  """clip_grad_norm_ -> Adam(weight_decay) -> clamp == optax clip -> add_decayed_weights (prior)
  -> adam -> keep_within (the ±prior.bound box), under each lr schedule."""
  cfg = config_lib.load_config(
    TINY,
    [
      dict(
        lr_schedule=lr_schedule,
        warmup_steps=3,
        steps=12,
        grad_clip=1.0,
        num_components=8,
        prior={"identity": 0.05, "fold": 0.0, "bound": 0.5},
      )
    ],
  )
  rng = np.random.default_rng(2)
  grads = [rng.normal(size=8).astype(np.float32) * s for s in (0.3, 3.0, 1.0, 10.0, 0.1) * 2]
  opt = fit_step.make_optimizer(cfg, morphable.load_model(cfg.head, cfg.num_components))
  params = {"weights": jnp.asarray(rng.normal(size=8).astype(np.float32))}
  w = torch.tensor(np.asarray(params["weights"]), requires_grad=True)
  state = opt.init(params)
  torch_opt, schedule = sds_step.make_optimizer(cfg, w)
  at_bound = 0
  for g in grads:
    updates, state = opt.update({"weights": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    w.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_([w], cfg.grad_clip)
    torch_opt.step()
    schedule.step()
    sds_step.bound_weights(cfg, w)
    np.testing.assert_allclose(w.detach().numpy(), np.asarray(params["weights"]), atol=1e-5)
    at_bound += int(np.isclose(np.abs(np.asarray(params["weights"])), 0.5).sum())
  assert at_bound > 0  # the box was reached
