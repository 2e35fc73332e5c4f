"""The SDS update step: one pure function, jit-compiled, vmapped over prompts, sharded over devices.

Reading `make_fit_step` top to bottom gives the whole method:
  sample views and t -> render -> resize -> VAE encode (kept for the backward pass) -> noise ->
  UNet on [uncond, cond] (no gradient) -> CFG -> w(t)·(ε̂ − ε) -> back through VAE and renderer ->
  optax: clip_by_global_norm -> priors (Gaussian on every weight group, fold-overs, texture
  smoothness) -> Adam, skipping (and counting) any step whose gradient is not finite.

The denoiser and the encoder are plain functions passed in, so tests and the quality benchmark
can plug in analytic denoisers ("teachers") and a cheap encoder. Their parameters travel as jit
arguments (`frozen`), never as constants baked into the compiled program.
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
from sdsjax import config as config_lib
from sdsjax import morphable
from sdsjax import priors
from sdsjax import sds
from sdsjax import shading
from sdsjax import texture_pyramid
from sdsjax.config import FitConfig

# encode_fn(vae_params, images (N, H, W, 3) in [0, 1]) -> latents (N, H/8, W/8, 4).
EncodeFn = Callable[[Any, jax.Array], jax.Array]

# Row 0 of a prompt's embeddings is the unconditional (or negative) prompt; rows 1..4 are the
# prompt with camera_lib.VIEW_SUFFIXES appended (all equal when view prompts are off).
NUM_EMBEDDING_ROWS = 1 + len(camera_lib.VIEW_SUFFIXES)

# Parameter name -> optimiser group (each group has its own lr, clip, prior and start step).
PARAM_GROUPS = {
  "weights": "identity",
  "expression": "expression",
  "pose": "pose",
  "texture_logits": "texture",
}
GEOMETRY_PARAMS = ("weights", "expression", "pose")
# apply_if_finite never lets a non-finite update through by itself: the run loop stops after
# cfg.max_bad_steps consecutive bad steps instead.
_NEVER = 2**30


@struct.dataclass
class FitState:
  """One prompt's optimisation state. Batched over prompts, every leaf gains a leading (P,).

  Attributes:
    step: () int32 steps taken (skipped ones included).
    params: {"weights": (K,), optional "expression": (E,), "pose": (J_fit, 3) axis-angle of
      cfg.pose_joints, "texture_logits": (Ht, Wt, 3)}.
    opt_state: the optax state; `bad_steps(opt_state)` reads its skip counters.
  """

  step: jax.Array
  params: dict
  opt_state: Any


@struct.dataclass
class Frozen:
  """What the step reads but never changes; replicated over devices."""

  vae_params: Any
  unet_params: Any
  alphas_cumprod: jax.Array  # (T,)


@struct.dataclass
class View:
  """One random view: camera and light (the light carries the shading mode)."""

  camera: camera_lib.Camera
  light: camera_lib.Light
  azimuth: jax.Array  # () degrees
  elevation: jax.Array  # () degrees


@struct.dataclass
class DenoiserContext:
  """What a denoiser may know about the latents it is asked about; leading (N,) like them.

  `eps_fn(params, z_t, t, text_embeddings, context)` receives it, so a denoiser can condition
  on the sampled view (a view-aware teacher, or a ControlNet fed the head's projected
  landmarks: project the head's vertices at `geometry` through `view.camera`).

  Attributes:
    view: the views the latents were rendered from.
    geometry: the head's current geometry parameters ("weights" (N, K), optional "expression",
      "pose"), without gradient.
  """

  view: View
  geometry: dict


def texture_from_logits(logits):
  """The texture in [0, 1] from its unconstrained parameters (Ht, Wt, 3)."""
  return jax.nn.sigmoid(logits)


# ----------------------------------------------------------------------------------------------
# Parameters and the optimiser.


def pose_joint_indices(cfg: FitConfig, head: morphable.MorphableModel) -> tuple[int, ...]:
  """Indices of cfg.pose_joints in the head's skeleton (checked by `check_head`)."""
  if not cfg.pose_joints:
    return ()
  names = head.skeleton.joint_names
  return tuple(names.index(j) for j in cfg.pose_joints)


def resolve_closeup_target(cfg: FitConfig, mean_vertices) -> FitConfig:
  """The config with an empty `camera.closeup_target` filled from the head's (V, 3) mean
  vertices (`morphable.face_target`); unchanged when it is set."""
  if cfg.camera.closeup_target:
    return cfg
  target = morphable.face_target(np.asarray(mean_vertices))
  return dataclasses.replace(cfg, camera=dataclasses.replace(cfg.camera, closeup_target=target))


def check_head(cfg: FitConfig, head: morphable.MorphableModel) -> None:
  """Raises ConfigError when the config asks for parameters the head model does not have."""
  from sdsjax.errors import ConfigError

  if cfg.pose_joints:
    if head.skeleton is None:
      raise ConfigError(
        f"pose_joints={list(cfg.pose_joints)} but the head model '{cfg.head}' has no skeleton "
        "(only FLAME has joints); set pose_joints=[]"
      )
    unknown = [j for j in cfg.pose_joints if j not in head.skeleton.joint_names]
    if unknown:
      raise ConfigError(
        f"pose_joints: unknown joint {unknown[0]!r}; the head has "
        f"{', '.join(head.skeleton.joint_names)}"
      )
  if cfg.num_expressions != head.num_expressions:
    raise ConfigError(
      f"num_expressions={cfg.num_expressions} but the head model was loaded with "
      f"{head.num_expressions}"
    )


def full_pose(cfg: FitConfig, head: morphable.MorphableModel, params: dict) -> jax.Array | None:
  """(J, 3) axis-angles for every joint: the fitted ones from params, the rest at rest."""
  if "pose" not in params:
    return None
  index = jnp.asarray(pose_joint_indices(cfg, head), jnp.int32)
  return jnp.zeros((head.num_joints, 3), params["pose"].dtype).at[index].set(params["pose"])


def head_vertices(cfg: FitConfig, head: morphable.MorphableModel, params: dict) -> jax.Array:
  """(V, 3) world vertices of the head at `params`."""
  return morphable.vertices(
    head, params["weights"], params.get("expression"), full_pose(cfg, head, params)
  )


def init_params(cfg: FitConfig, head: morphable.MorphableModel) -> dict:
  """The mean head (every weight 0, rest pose); texture logits at a neutral skin tone."""
  params = {"weights": jnp.zeros((head.num_components,), jnp.float32)}
  if cfg.num_expressions:
    params["expression"] = jnp.zeros((cfg.num_expressions,), jnp.float32)
  if cfg.pose_joints:
    params["pose"] = jnp.zeros((len(cfg.pose_joints), 3), jnp.float32)
  if cfg.texture:
    skin = jnp.array([0.78, 0.62, 0.52], jnp.float32)
    logit = jnp.log(skin / (1.0 - skin))
    params["texture_logits"] = jnp.broadcast_to(
      logit, (cfg.texture_resolution, cfg.texture_resolution, 3)
    ).astype(jnp.float32)
  return params


EXPONENTIAL_LR_END = 0.1  # the exponential schedule's last lr, as a fraction of the peak


def learning_rate(cfg: FitConfig, group: str):
  """The lr schedule of one parameter group (warmup + exponential or cosine decay, or constant;
  delayed starts)."""
  peak = {
    "identity": cfg.lr,
    "expression": cfg.expression_lr,
    "pose": cfg.pose_lr,
    "texture": cfg.texture_lr,
  }[group]
  start = {"expression": cfg.expression_start_step, "texture": cfg.texture_start_step}.get(group, 0)
  if cfg.lr_schedule == "cosine":
    warmup = max(cfg.warmup_steps, 1)
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, max(cfg.steps - start, warmup + 1)
    )
  elif cfg.lr_schedule == "exponential":
    # TADA's decay: peak · 0.1^(progress), to a tenth of the peak at the last step.
    warmup = max(cfg.warmup_steps, 1)
    schedule = optax.warmup_exponential_decay_schedule(
      0.0,
      peak,
      warmup,
      max(cfg.steps - start - warmup, 1),
      EXPONENTIAL_LR_END,
      end_value=peak * EXPONENTIAL_LR_END,
    )
  elif cfg.warmup_steps > 0:
    schedule = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  else:
    schedule = optax.constant_schedule(peak)
  if not start:
    return schedule
  # The count is Adam's (applied steps): the group waits, then runs its own schedule.
  return lambda count: jnp.where(count < start, 0.0, schedule(jnp.maximum(count - start, 0)))


def add_gradient_of(penalty: Callable[[Any], jax.Array]) -> optax.GradientTransformation:
  """Adds ∇penalty(params) to the updates: a regulariser at its place in an optax chain."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("add_gradient_of needs the params")
    grads = jax.grad(penalty)(params)
    return jax.tree.map(jnp.add, updates, grads), state

  return optax.GradientTransformation(init, update)


def nan_if_norm_overflows() -> optax.GradientTransformation:
  """Makes every update NaN when their global norm is not finite, so `apply_if_finite` skips it.

  Finite elements can still overflow the norm (e.g. guidance 1e30): clipping would then turn
  the step into a silent zero update instead of a counted bad step.
  """

  def update(updates, state, params=None):
    del params
    bad = ~jnp.isfinite(optax.tree.norm(updates))
    return jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def keep_within(lo: float, hi: float) -> optax.GradientTransformation:
  """Shortens each update so that params + update stays in [lo, hi]: projected Adam, last in
  a chain."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("keep_within needs the params")
    return jax.tree.map(lambda u, p: jnp.clip(p + u, lo, hi) - p, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_box(cfg: FitConfig, head: morphable.MorphableModel, group: str):
  """(lo, hi) that a group's weights are kept in: ±prior.bound σ, intersected for expressions
  with the head's own range (ICT's ARKit blendshapes live in [0, 1]); None: unbounded."""
  lo, hi = -np.inf, np.inf
  if group in ("identity", "expression") and cfg.prior.bound > 0:
    lo, hi = -cfg.prior.bound, cfg.prior.bound
  if group == "expression" and head.expression_range is not None:
    lo, hi = max(lo, head.expression_range[0]), min(hi, head.expression_range[1])
  return None if np.isinf(lo) and np.isinf(hi) else (float(lo), float(hi))


def make_optimizer(cfg: FitConfig, head: morphable.MorphableModel) -> optax.GradientTransformation:
  """Per group: clip_by_global_norm -> Gaussian prior (L2) -> fold/texture priors -> Adam ->
  the group's box (`weight_box`).

  The priors act on the clipped SDS gradient (norm ≤ grad_clip), so their weights do not depend
  on the scale of the SDS signal. Non-finite gradients (or norms) skip the step.
  """
  labels = lambda params: {name: PARAM_GROUPS[name] for name in params}
  groups = ("identity", "expression", "pose", "texture")
  prior = {
    "identity": cfg.prior.identity,
    "expression": cfg.prior.expression,
    "pose": cfg.prior.pose,
    "texture": 0.0,
  }
  rest_normals = shading.face_normals(head.mean, head.faces)

  def shape_and_texture_penalty(params):
    total = jnp.zeros((), jnp.float32)
    if cfg.prior.fold > 0:
      verts = head_vertices(cfg, head, params)
      fold = priors.fold_penalty(verts, head.faces, rest_normals, cfg.prior.fold_cos)
      total += cfg.prior.fold * fold
    if "texture_logits" in params and cfg.texture_smoothness > 0:
      texture = texture_from_logits(params["texture_logits"])
      total += cfg.texture_smoothness * priors.texture_smoothness(texture)
    return total

  clip_and_prior = {
    g: optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.add_decayed_weights(prior[g]))
    for g in groups
  }
  # One level is the plain texture: then Adam's state keeps its per-texel layout.
  pyramid = len(texture_pyramid.level_sizes(cfg.texture_resolution, cfg.texture_coarsest)) > 1
  adam = {}
  for g in groups:
    adam[g] = optax.adam(learning_rate(cfg, g), b1=cfg.adam_b1, b2=cfg.adam_b2)
    if g == "texture" and pyramid:
      adam[g] = texture_pyramid.in_pyramid(adam[g], cfg.texture_coarsest)
    box = weight_box(cfg, head, g)
    if box is not None:
      adam[g] = optax.chain(adam[g], keep_within(*box))
  # Only Adam (and the box) sit inside apply_if_finite: it is a lax.cond, which under vmap
  # over prompts selects every operand of both branches, and the penalty's closed-over head
  # basis (K × V × 3) would be broadcast to every prompt and selected in each step. A
  # non-finite gradient stays non-finite through clipping and the priors, so it is still skipped.
  return optax.chain(
    nan_if_norm_overflows(),
    optax.partition(clip_and_prior, labels),
    add_gradient_of(shape_and_texture_penalty),
    optax.apply_if_finite(optax.partition(adam, labels), _NEVER),
  )


def bad_steps(opt_state) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(consecutive, total, last_finite) counters of skipped steps, read from apply_if_finite."""
  get = lambda name: optax.tree_utils.tree_get(opt_state, name)
  return get("notfinite_count"), get("total_notfinite"), get("last_finite")


def init_state(cfg: FitConfig, head: morphable.MorphableModel) -> FitState:
  params = init_params(cfg, head)
  return FitState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=make_optimizer(cfg, head).init(params),
  )


# ----------------------------------------------------------------------------------------------
# Views, timesteps, rendering.


def sample_view(key, step, cfg: FitConfig) -> View:
  """A DreamFusion-style random camera and light for one render.

  Shape-only fits always shade a grey head. Texture fits also draw albedo-only renders
  (which teach colour) and textureless ones (which teach shape), and may start albedo-only.
  """
  k_cam, k_light = jax.random.split(key)
  cam, azimuth, elevation = camera_lib.sample_camera(k_cam, cfg.camera)
  settings = cfg.light
  if not cfg.texture:
    settings = camera_lib.LightSettings(
      ambient=settings.ambient,
      diffuse=settings.diffuse,
      shading_prob=1.0,
      textureless_prob=0.0,
      position_std=settings.position_std,
    )
  light = camera_lib.sample_light(k_light, cam, settings)
  if cfg.texture and cfg.light.ambient_only_steps:
    early = step < cfg.light.ambient_only_steps
    light = light.replace(
      ambient=jnp.where(early, 1.0, light.ambient),
      diffuse=jnp.where(early, 0.0, light.diffuse),
      textureless=jnp.where(early, 0.0, light.textureless),
    )
  return View(camera=cam, light=light, azimuth=azimuth, elevation=elevation)


def render_view(
  cfg: FitConfig,
  head: morphable.MorphableModel,
  params: dict,
  view: View,
  settings,
  background=(1.0, 1.0, 1.0),
):
  """Renders the head at `params` from `view`: ((R, R, 3) in [0, 1], () int32 overflow)."""
  verts = head_vertices(cfg, head, params)
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
  noise: jax.Array  # (n, h, w, c) with h = w = sd_resolution / 8


def timestep_sampler(cfg: FitConfig):
  """`draw(key, step, num_timesteps) -> (sds_samples,) int32`: the fit's t schedule."""
  anneal = sds.anneal_steps(cfg.steps, cfg.t_anneal_fraction)

  def draw(key, step, num_timesteps: int):
    return sds.schedule_timesteps(
      key,
      (cfg.sds_samples,),
      step,
      anneal,
      cfg.t_range,
      cfg.t_max_end,
      cfg.t_schedule,
      num_timesteps,
    )

  return draw


def make_sampler(cfg: FitConfig, view_sampler=None, latent_channels: int = 4):
  """`sample_inputs(key, step, num_timesteps) -> StepInputs`, all from one key."""
  view_sampler = view_sampler or (lambda key, step: sample_view(key, step, cfg))
  n = cfg.sds_samples
  h = cfg.sd_resolution // 8
  draw_timesteps = timestep_sampler(cfg)

  def sample_inputs(key, step, num_timesteps: int) -> StepInputs:
    k_view, k_t, k_noise = jax.random.split(key, 3)
    views = jax.vmap(lambda k: view_sampler(k, step))(jax.random.split(k_view, n))
    t = draw_timesteps(k_t, step, num_timesteps)
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
  settings = config_lib.raster_settings(cfg, cfg.render_resolution)

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
      images, overflow = jax.vmap(lambda v: render_view(cfg, head, p, v, settings))(views)
      images = jax.image.resize(
        images, (n, cfg.sd_resolution, cfg.sd_resolution, 3), method="bilinear"
      )
      return encode_fn(frozen.vae_params, images), overflow

    latents, backward, overflow = jax.vjp(render_and_encode, params, has_aux=True)

    # 4-7. Noise, the denoiser on [uncond, cond] without its Jacobian, CFG, w(t)·(ε̂ − ε).
    geometry = {k: v for k, v in params.items() if k in GEOMETRY_PARAMS}
    geometry = jax.tree.map(
      lambda x: jnp.broadcast_to(jax.lax.stop_gradient(x), (n, *x.shape)), geometry
    )
    context = DenoiserContext(view=views, geometry=geometry)
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
      context=context,
    )

    # 8. Back through the encoder and the renderer (mean over the n samples).
    (grads,) = backward(grad_z / n)
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

  `eps_fn(params, z_t, t, text_embeddings, context)` is the denoiser (see `DenoiserContext`);
  `view_sampler(key, step) -> View` replaces the random DreamFusion views (e.g. fixed cameras).
  """
  check_head(cfg, head)
  cfg = resolve_closeup_target(cfg, head.mean)
  optimizer = make_optimizer(cfg, head)
  sample_inputs = make_sampler(cfg, view_sampler)
  compute_gradients = make_gradient_fn(cfg, head, encode_fn, eps_fn)

  def step(state: FitState, key, embeddings, frozen: Frozen):
    # 1. Views, timesteps and noise, reproducible from (key, step).
    inputs = sample_inputs(
      jax.random.fold_in(key, state.step), state.step, frozen.alphas_cumprod.shape[0]
    )
    # 2-8. Render, encode, noise, denoise, guide, weight, back-propagate.
    grads, aux = compute_gradients(state.params, inputs, embeddings, frozen)
    # 9. optax; a non-finite gradient (or norm) is skipped and counted instead of applied.
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    consecutive, total, finite = bad_steps(opt_state)
    new_state = FitState(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {
      **aux,
      "grad_norm": optax.tree.norm(grads),
      "t": jnp.mean(inputs.t.astype(jnp.float32)),
      "finite": finite,
      "bad_in_a_row": consecutive,
      "skipped": total,
      "max_abs_weight": jnp.max(jnp.abs(params["weights"])),
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
