"""The SDS update step: one pure function, jit-compiled, vmapped over prompts, sharded over devices.

Reading `make_fit_step` top to bottom gives the whole method:
  sample views and t -> render -> resize -> VAE encode (kept for the backward pass) -> noise ->
  UNet on [uncond, cond] (no gradient) -> CFG -> w(t)·(ε̂ − ε) -> back through VAE and renderer ->
  optax: clip_by_global_norm -> L2 towards 0 -> Adam.

The denoiser and the encoder are plain functions passed in, so tests can plug in an analytic
denoiser and a cheap encoder. Their parameters travel as jit arguments (`frozen`), never as
constants baked into the compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sdsjax import camera as camera_lib
from sdsjax import morphable
from sdsjax import raster
from sdsjax import sds
from sdsjax import shading
from sdsjax.config import FitConfig

# encode_fn(vae_params, images (N, H, W, 3) in [0, 1]) -> latents (N, H/8, W/8, 4).
EncodeFn = Callable[[Any, jax.Array], jax.Array]

# Row 0 of a prompt's embeddings is the unconditional (or negative) prompt; rows 1..4 are the
# prompt with camera_lib.VIEW_SUFFIXES appended (all equal when view prompts are off).
NUM_EMBEDDING_ROWS = 1 + len(camera_lib.VIEW_SUFFIXES)


@struct.dataclass
class FitState:
  """One prompt's optimisation state. Batched over prompts, every leaf gains a leading (P,)."""

  step: jax.Array  # () int32
  params: dict  # {"weights": (K,), optional "texture_logits": (Ht, Wt, 3)}
  opt_state: Any
  skipped: jax.Array  # () int32: steps whose gradient was not finite, so not applied


@struct.dataclass
class Frozen:
  """What the step reads but never changes; replicated over devices."""

  vae_params: Any
  unet_params: Any
  alphas_cumprod: jax.Array  # (T,)


def texture_from_logits(logits):
  """The texture in [0, 1] from its unconstrained parameters (Ht, Wt, 3)."""
  return jax.nn.sigmoid(logits)


def texture_smoothness(texture):
  """Mean squared difference between neighbouring texels of (Ht, Wt, 3): a Laplacian prior."""
  dy = texture[1:] - texture[:-1]
  dx = texture[:, 1:] - texture[:, :-1]
  return jnp.mean(dy**2) + jnp.mean(dx**2)


def make_optimizer(cfg: FitConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> L2 towards 0 -> Adam for the weights; the texture has its own lr."""
  if cfg.lr_schedule == "cosine":
    warmup = max(cfg.warmup_steps, 1)
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1))
  elif cfg.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  else:
    lr = cfg.lr
  shape_opt = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.add_decayed_weights(cfg.weight_decay),
    optax.adam(lr, b1=cfg.adam_b1, b2=cfg.adam_b2),
  )
  if not cfg.texture:
    return optax.multi_transform({"shape": shape_opt}, {"weights": "shape"})
  texture_lr = lambda count: jnp.where(count < cfg.texture_start_step, 0.0, cfg.texture_lr)
  texture_opt = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adam(texture_lr, b1=cfg.adam_b1, b2=cfg.adam_b2),
  )
  return optax.multi_transform(
    {"shape": shape_opt, "texture": texture_opt}, {"weights": "shape", "texture_logits": "texture"}
  )


def init_params(cfg: FitConfig, num_components: int) -> dict:
  """Weights at 0 (the mean head); texture logits at a neutral skin tone."""
  params = {"weights": jnp.zeros((num_components,), jnp.float32)}
  if cfg.texture:
    skin = jnp.array([0.78, 0.62, 0.52], jnp.float32)
    logit = jnp.log(skin / (1.0 - skin))
    params["texture_logits"] = jnp.broadcast_to(
      logit, (cfg.texture_resolution, cfg.texture_resolution, 3)
    ).astype(jnp.float32)
  return params


def init_state(cfg: FitConfig, num_components: int) -> FitState:
  params = init_params(cfg, num_components)
  return FitState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=make_optimizer(cfg).init(params),
    skipped=jnp.zeros((), jnp.int32),
  )


def camera_ranges(cfg: FitConfig) -> camera_lib.CameraRanges:
  return camera_lib.CameraRanges(**dataclasses.asdict(cfg.camera))


def raster_settings(cfg: FitConfig, resolution: int) -> raster.RasterSettings:
  return raster.RasterSettings(
    image_size=resolution,
    sigma=cfg.raster.sigma,
    gamma=cfg.raster.gamma,
    faces_per_pixel=cfg.raster.faces_per_pixel,
  )


@struct.dataclass
class View:
  """One random view: camera and light (the light carries the shading mode)."""

  camera: camera_lib.Camera
  light: camera_lib.Light
  azimuth: jax.Array  # () degrees
  elevation: jax.Array  # () degrees


def sample_view(key, step, cfg: FitConfig) -> View:
  """A DreamFusion-style random camera and light for one render.

  Shape-only fits always shade a grey head. Texture fits also draw albedo-only renders
  (which teach colour) and textureless ones (which teach shape), and start albedo-only.
  """
  k_cam, k_light = jax.random.split(key)
  cam, azimuth, elevation = camera_lib.sample_camera(k_cam, camera_ranges(cfg))
  if cfg.texture:
    light = camera_lib.sample_light(
      k_light,
      cam,
      ambient=cfg.light.ambient,
      diffuse=cfg.light.diffuse,
      shading_prob=cfg.light.shading_prob,
      textureless_prob=cfg.light.textureless_prob,
    )
    early = step < cfg.light.ambient_only_steps
    light = light.replace(
      ambient=jnp.where(early, 1.0, light.ambient),
      diffuse=jnp.where(early, 0.0, light.diffuse),
      textureless=jnp.where(early, 0.0, light.textureless),
    )
  else:
    light = camera_lib.sample_light(
      k_light, cam, ambient=cfg.light.ambient, diffuse=cfg.light.diffuse
    )
  return View(camera=cam, light=light, azimuth=azimuth, elevation=elevation)


def render_view(
  head: morphable.MorphableModel, params: dict, view: View, settings, background=(1.0, 1.0, 1.0)
):
  """Renders the head at `params` from `view`: (R, R, 3) in [0, 1]."""
  verts = morphable.vertices(head, params["weights"])
  texture = None
  if "texture_logits" in params:
    texture = texture_from_logits(params["texture_logits"])
  out = shading.render_soft(
    verts,
    head.faces,
    view.camera,
    view.light,
    settings,
    texture=texture,
    uvs=head.uvs,
    uv_faces=head.uv_faces,
    background=background,
  )
  return out.rgb, out.overflow


@struct.dataclass
class StepInputs:
  """The random draws of one step for one prompt: n views, their timesteps and noise."""

  views: View  # leaves have a leading (n,)
  t: jax.Array  # (n,) int32
  noise: jax.Array  # (n, h, w, 4) with h = w = sd_resolution / 8


def make_sampler(cfg: FitConfig, view_sampler=None, latent_channels: int = 4):
  """`sample_inputs(key, step, num_timesteps) -> StepInputs`, all from one key."""
  view_sampler = view_sampler or (lambda key, step: sample_view(key, step, cfg))
  n = cfg.sds_samples
  h = cfg.sd_resolution // 8
  t_min, t_max = cfg.t_range

  def sample_inputs(key, step, num_timesteps: int) -> StepInputs:
    k_view, k_t, k_noise = jax.random.split(key, 3)
    views = jax.vmap(lambda k: view_sampler(k, step))(jax.random.split(k_view, n))
    t_hi = sds.annealed_t_max(step, cfg.steps, t_max, cfg.t_max_end)
    t = sds.sample_timesteps(k_t, (n,), t_min, t_hi, num_timesteps)
    noise = jax.random.normal(k_noise, (n, h, h, latent_channels), jnp.float32)
    return StepInputs(views=views, t=t, noise=noise)

  return sample_inputs


def make_gradient_fn(
  cfg: FitConfig, head: morphable.MorphableModel, encode_fn: EncodeFn, eps_fn: sds.EpsFn
):
  """`compute_gradients(params, inputs, embeddings, frozen) -> (grads, aux)`: steps 2-8.

  This is the SDS gradient on the head parameters for given random draws, the quantity the
  PyTorch baseline is checked against.
  """
  settings = raster_settings(cfg, cfg.render_resolution)

  def compute_gradients(params: dict, inputs: StepInputs, embeddings, frozen: Frozen):
    chex.assert_rank(embeddings, 3)
    views, t, noise = inputs.views, inputs.t, inputs.noise
    n = t.shape[0]
    # 2. View-dependent prompts: row 1 + view index, or row 1 for every view.
    if cfg.view_prompts:
      rows = 1 + camera_lib.view_index(views.azimuth, views.elevation)
    else:
      rows = jnp.ones((n,), jnp.int32)
    text_emb = embeddings[rows]
    uncond_emb = jnp.broadcast_to(embeddings[0], text_emb.shape)

    # 3. Render, resize to the SD resolution, encode; keep the VJP for step 8.
    def render_and_encode(p):
      images, overflow = jax.vmap(lambda v: render_view(head, p, v, settings))(views)
      images = jax.image.resize(
        images, (n, cfg.sd_resolution, cfg.sd_resolution, 3), method="bilinear"
      )
      return encode_fn(frozen.vae_params, images), overflow

    latents, backward, overflow = jax.vjp(render_and_encode, params, has_aux=True)

    # 4-7. Noise, UNet on [uncond, cond] without its Jacobian, CFG, w(t)·(ε̂ − ε).
    grad_z, residual = sds.sds_gradient(
      eps_fn,
      frozen.unet_params,
      latents,
      t,
      noise.astype(latents.dtype),
      text_emb,
      uncond_emb,
      frozen.alphas_cumprod,
      cfg.guidance_scale,
      cfg.weighting,
    )

    # 8. Back through the VAE encoder and the renderer (mean over the n samples).
    (grads,) = backward(grad_z / n)
    if "texture_logits" in params:
      prior = jax.grad(
        lambda p: (
          cfg.texture_smoothness * texture_smoothness(texture_from_logits(p["texture_logits"]))
        )
      )(params)
      grads = jax.tree.map(jnp.add, grads, prior)
    aux = {"loss": jnp.mean(residual**2), "overflow": jnp.sum(overflow)}
    return grads, aux

  return compute_gradients


def make_fit_step(
  cfg: FitConfig,
  head: morphable.MorphableModel,
  encode_fn: EncodeFn,
  eps_fn: sds.EpsFn,
  view_sampler=None,
):
  """Builds `step(state, key, embeddings, frozen) -> (state, metrics)` for ONE prompt.

  Args (of the returned step):
    state: FitState.
    key: this prompt's base PRNG key; the step folds in `state.step`, so a resumed run draws
      the same cameras, t and noise as an uninterrupted one.
    embeddings: (NUM_EMBEDDING_ROWS, L, D) text embeddings; row 0 unconditional/negative.
    frozen: Frozen (VAE and UNet params, ᾱ).

  `view_sampler(key, step) -> View` replaces the random DreamFusion views (e.g. a fixed camera).
  """
  optimizer = make_optimizer(cfg)
  sample_inputs = make_sampler(cfg, view_sampler)
  compute_gradients = make_gradient_fn(cfg, head, encode_fn, eps_fn)

  def step(state: FitState, key, embeddings, frozen: Frozen):
    # 1. Views, timesteps and noise, reproducible from (key, step).
    inputs = sample_inputs(
      jax.random.fold_in(key, state.step), state.step, frozen.alphas_cumprod.shape[0]
    )
    # 2-8. Render, encode, noise, denoise, guide, weight, back-propagate.
    grads, aux = compute_gradients(state.params, inputs, embeddings, frozen)
    # 9. optax; a non-finite gradient is skipped and counted instead of applied.
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = FitState(
      step=state.step + 1,
      params=jax.tree.map(keep, params, state.params),
      opt_state=jax.tree.map(keep, opt_state, state.opt_state),
      skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    metrics = {
      **aux,
      "grad_norm": optax.tree.norm(grads),
      "t": jnp.mean(inputs.t.astype(jnp.float32)),
      "finite": finite,
    }
    return new_state, metrics

  return step


def prompt_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over every device (all hosts) with the axis 'prompts'."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devices.reshape(-1), ("prompts",))


def make_batched_step(step, mesh: jax.sharding.Mesh | None = None, donate: bool = True):
  """vmaps a one-prompt step over prompts and jits it, sharding prompts over `mesh`.

  The returned function has the same signature as `step` with a leading (P,) on state, key and
  embeddings; `frozen` is shared (replicated). P must be a multiple of the mesh size.
  """
  batched = jax.vmap(step, in_axes=(0, 0, 0, None))
  if mesh is None:
    return jax.jit(batched, donate_argnums=(0,) if donate else ())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("prompts"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    batched,
    in_shardings=(split, split, split, replicated),
    out_shardings=(split, split),
    donate_argnums=(0,) if donate else (),
  )


def prompt_keys(seeds) -> jax.Array:
  """Per-prompt base keys (P, 2): prompt i with seed s draws like a single-prompt run of seed s."""
  return jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])


def batch_states(states: list[FitState]) -> FitState:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)
