"""The SDS fitting step in PyTorch, written the way the article's pseudocode does it.

diffusers `UNet2DConditionModel` and `AutoencoderKL`, transformers `CLIPTextModel` and
`CLIPTokenizer`, all loaded with `from_pretrained` from the same diffusers-format folder that
sdsjax loads; the soft rasterizer of `raster.py`; `torch.optim.Adam`. One step per prompt:

  render -> F.interpolate (bilinear) to the SD resolution -> VAE encode (posterior mean ×
  scaling_factor) -> noise -> UNet on [uncond, cond] under no_grad -> CFG -> w(t)·(ε̂ − ε)
  -> latents.backward(gradient) -> clip_grad_norm_ -> + the fold prior's gradient -> Adam with
  the Gaussian prior as L2 (weight_decay = cfg.prior.identity) -> the ±prior.bound projection,
  as sdsjax's optax chain and step.

Two drivers: `LoopBaseline` processes prompts one after another (the article's way) and
`BatchedBaseline` runs P prompts as one batch (what a strong PyTorch user would do).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import raster

VIEW_SUFFIXES = ("front view", "side view", "back view", "overhead view")
NUM_EMBEDDING_ROWS = 1 + len(VIEW_SUFFIXES)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def configure_threads(num_threads: int = 0) -> None:
  """Intra-op threads: every core by default, as a tuned PyTorch CPU run would use."""
  torch.set_num_threads(num_threads or os.cpu_count() or 1)


def default_device() -> torch.device:
  """CUDA where available: the baseline runs where a PyTorch user would run it."""
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_precision(device: torch.device) -> None:
  """On CUDA, float32 matrix products and convolutions in TF32, as XLA does them by default
  (JAX's DEFAULT precision), so both sides do the same arithmetic. cuDNN convolutions
  already default to TF32 in PyTorch; cuBLAS matrix products do not."""
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


@dataclasses.dataclass
class StableDiffusionParts:
  """The pipeline parts the SDS step needs, in eval mode with frozen parameters."""

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  alphas_cumprod: torch.Tensor  # (T,) float32
  scaling_factor: float
  prediction_type: str
  dtype: torch.dtype
  device: torch.device


def load_parts(
  folder: str | os.PathLike,
  dtype: torch.dtype = torch.float32,
  compile_models: bool = False,
  device: torch.device | str | None = None,
) -> StableDiffusionParts:
  """Loads UNet, VAE, text encoder, tokenizer and scheduler from a diffusers folder.

  Args:
    folder: diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    dtype: compute dtype of the UNet and VAE (the text encoder runs once, in float32).
    compile_models: wrap the UNet and the VAE encoder in `torch.compile`.
    device: where the models live (default: CUDA where available, else CPU). The step's
      tensors follow it: the random draws use a generator on it, and the renderer makes its
      tensors on the device of its inputs.
  """
  device = torch.device(device) if device is not None else default_device()
  from diffusers import AutoencoderKL
  from diffusers import DDPMScheduler
  from diffusers import UNet2DConditionModel
  from transformers import CLIPTextModel
  from transformers import CLIPTokenizer

  folder = Path(folder)
  unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
  vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
  text_encoder = CLIPTextModel.from_pretrained(
    folder, subfolder="text_encoder", torch_dtype=torch.float32
  )
  tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
  scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
  for model in (unet, vae, text_encoder):
    model.to(device)
    model.eval()
    model.requires_grad_(False)  # gradients go to the render only, never to the weights
  if compile_models:
    unet = torch.compile(unet)
    vae.encoder = torch.compile(vae.encoder)
  return StableDiffusionParts(
    unet=unet,
    vae=vae,
    text_encoder=text_encoder,
    tokenizer=tokenizer,
    alphas_cumprod=scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
    scaling_factor=float(vae.config.scaling_factor),
    prediction_type=scheduler.config.prediction_type,
    dtype=dtype,
    device=device,
  )


@torch.no_grad()
def encode_text(parts: StableDiffusionParts, prompts: list[str]) -> torch.Tensor:
  """(N, L, D) CLIP last_hidden_state (after the final layer norm), padded to max length."""
  tokens = parts.tokenizer(
    prompts,
    padding="max_length",
    truncation=True,
    max_length=parts.tokenizer.model_max_length,
    return_tensors="pt",
  )
  return parts.text_encoder(tokens.input_ids.to(parts.device))[0]


def embedding_table(
  parts: StableDiffusionParts, prompts: list[str], negative: str = "", with_views: bool = True
) -> torch.Tensor:
  """(P, 5, L, D): per prompt [negative, prompt + each view suffix] (sdsjax's layout)."""
  texts = []
  for p in prompts:
    texts.append(negative)
    texts += [f"{p}, {s}" if with_views else p for s in VIEW_SUFFIXES]
  emb = encode_text(parts, texts)
  return emb.reshape(len(prompts), NUM_EMBEDDING_ROWS, *emb.shape[1:])


@dataclasses.dataclass
class Head:
  """A linear morphable model: vertices = mean + Σ_k w_k basis_k."""

  mean: torch.Tensor  # (V, 3)
  basis: torch.Tensor  # (K, V, 3)
  faces: torch.Tensor  # (F, 3) int64

  @classmethod
  def from_arrays(cls, mean, basis, faces, device: torch.device | str = "cpu") -> Head:
    return cls(
      mean=torch.tensor(np.asarray(mean, np.float32), device=device),
      basis=torch.tensor(np.asarray(basis, np.float32), device=device),
      faces=torch.tensor(np.asarray(faces, np.int64), device=device),
    )

  def vertices(self, weights: torch.Tensor) -> torch.Tensor:
    """(P, K) weights -> (P, V, 3)."""
    num_k = self.basis.shape[0]
    flat = weights @ self.basis.reshape(num_k, -1)
    return self.mean + flat.reshape(weights.shape[0], *self.mean.shape)


@dataclasses.dataclass
class SdsInputs:
  """The random draws of one step for P prompts × n samples (prompt-major, N = P·n)."""

  cameras: raster.Cameras  # N cameras
  lights: raster.Lights  # N lights
  azimuth: torch.Tensor  # (N,) degrees
  elevation: torch.Tensor  # (N,) degrees
  t: torch.Tensor  # (N,) int64
  noise: torch.Tensor  # (N, 4, h, w)


def raster_settings(cfg, resolution: int) -> raster.RasterSettings:
  """The port's settings from cfg.raster: every field the port has (it leaves out chunking)."""
  ported = {f.name for f in dataclasses.fields(raster.RasterSettings)}
  values = {k: v for k, v in dataclasses.asdict(cfg.raster).items() if k in ported}
  return raster.RasterSettings(**dict(values, image_size=resolution))


def sample_inputs(
  generator: torch.Generator,
  cfg,
  num_prompts: int,
  step: int,
  num_timesteps: int,
  latent_channels: int = 4,
) -> SdsInputs:
  """DreamFusion-style random views, t and noise with sdsjax's distributions (shape fits).

  Azimuth: face-biased truncated normal, uniform with probability back_view_prob; uniform
  elevation, distance and fov; a share closeup_prob of face close-ups; light from N(eye, I);
  t ~ U(t_min, annealed t_max)·T.
  """
  n = num_prompts * cfg.sds_samples
  cam = cfg.camera
  g = generator
  dev = g.device

  def uniform(lo, hi, size=(n,)):
    return lo + (hi - lo) * torch.rand(size, generator=g, device=dev)

  spread = max(float(cam.azimuth_spread), 1e-6)
  normal = torch.empty(n, device=dev)
  torch.nn.init.trunc_normal_(normal, 0.0, spread, -180.0, 180.0, generator=g)
  azimuth = torch.where(
    torch.rand(n, generator=g, device=dev) < cam.back_view_prob, uniform(-180.0, 180.0), normal
  )
  azimuth = 180.0 - torch.remainder(180.0 - azimuth, 360.0)
  elevation = uniform(*cam.elevation_range)
  distance = uniform(*cam.distance_range)
  fov = uniform(*cam.fov_range)
  # Face close-ups: from the front half, looking at closeup_target, the fov narrowed.
  closeup = torch.rand(n, generator=g, device=dev) < cam.closeup_prob
  front = torch.empty(n, device=dev)
  torch.nn.init.trunc_normal_(front, 0.0, spread, -90.0, 90.0, generator=g)
  azimuth = torch.where(closeup, front, azimuth)
  fov = torch.where(closeup, fov / cam.closeup_zoom, fov)
  target = torch.tensor(cam.closeup_target, device=dev).expand(n, 3) * closeup[:, None]
  eye = raster.orbit_cameras(azimuth, elevation, distance, fov).eye
  cameras = raster.look_at(eye, fov, target)
  position = cameras.eye + cfg.light.position_std * torch.randn(n, 3, generator=g, device=dev)
  direction = position / position.norm(dim=-1, keepdim=True).clamp(min=1e-6)
  lights = raster.Lights(
    direction=direction,
    ambient=torch.full((n,), cfg.light.ambient, device=dev),
    diffuse=torch.full((n,), cfg.light.diffuse, device=dev),
  )
  t = sample_timesteps(g, cfg, n, step, num_timesteps)
  h = cfg.sd_resolution // 8
  noise = torch.randn(n, latent_channels, h, h, generator=g, device=dev)
  return SdsInputs(
    cameras=cameras, lights=lights, azimuth=azimuth, elevation=elevation, t=t, noise=noise
  )


def sample_timesteps(
  generator: torch.Generator, cfg, n: int, step: int, num_timesteps: int
) -> torch.Tensor:
  """(n,) int64 timesteps by cfg.t_schedule, as `sdsjax.sds.schedule_timesteps` draws them:
  "random" U(t_min, t_max)·T, "anneal" with t_max falling linearly to t_max_end over the first
  t_anneal_fraction of the steps, "dreamtime" a square-root anneal over the same steps jittered
  by ±2.5% of [t_min, t_max]."""
  g, dev = generator, generator.device
  t_min, t_max = cfg.t_range
  anneal_steps = max(round(cfg.t_anneal_fraction * cfg.steps), 1)
  frac = min(max(step / max(anneal_steps - 1, 1), 0.0), 1.0)
  if cfg.t_schedule == "dreamtime":
    centre = t_max - (t_max - cfg.t_max_end) * math.sqrt(frac)
    jitter = 0.025 * (t_max - t_min) * (2.0 * torch.rand(n, generator=g, device=dev) - 1.0)
    t = (centre + jitter).clamp(t_min, t_max) * num_timesteps
    return t.long().clamp(0, num_timesteps - 1)
  if cfg.t_schedule not in ("random", "anneal"):
    raise ValueError(f"unknown t schedule '{cfg.t_schedule}'")
  t_hi = t_max + (cfg.t_max_end - t_max) * frac if cfg.t_schedule == "anneal" else t_max
  lo, hi = math.floor(t_min * num_timesteps), math.ceil(t_hi * num_timesteps)
  t = lo + (hi - lo) * torch.rand(n, generator=g, device=dev)
  return t.long().clamp(0, num_timesteps - 1)


def sds_weight(alpha_bar: torch.Tensor, weighting: str) -> torch.Tensor:
  if weighting == "sds":
    return 1.0 - alpha_bar
  if weighting == "uniform":
    return torch.ones_like(alpha_bar)
  if weighting == "fantasia3d":
    return alpha_bar.sqrt() * (1.0 - alpha_bar)
  raise ValueError(f"unknown SDS weighting '{weighting}'")


class SdsGradient:
  """Accumulates the SDS gradient into `weights.grad` for P prompts in one batch."""

  def __init__(self, cfg, head: Head, parts: StableDiffusionParts, compile_render: bool = False):
    self.cfg = cfg
    self.head = head
    self.parts = parts
    self.settings = raster_settings(cfg, cfg.render_resolution)
    # Eager, the rasterizer is a long chain of memory-bound element-wise ops; inductor fuses
    # them (about 10× faster at 128² on CPU), at a compile per batch size.
    self._render = torch.compile(raster.render, dynamic=False) if compile_render else raster.render

  def render(self, weights: torch.Tensor, inputs: SdsInputs) -> torch.Tensor:
    """(P, K) weights -> (N, R, R, 3) renders, each prompt repeated for its n samples."""
    verts = self.head.vertices(weights).repeat_interleave(self.cfg.sds_samples, dim=0)
    rgb, _, self.overflow = self._render(
      verts, self.head.faces, inputs.cameras, inputs.lights, self.settings
    )
    return rgb

  def encode(self, images: torch.Tensor) -> torch.Tensor:
    """(N, R, R, 3) in [0, 1] -> (N, 4, h, w) latents: upsample, posterior mean × scale."""
    size = self.cfg.sd_resolution
    x = images.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (2.0 * x - 1.0).to(self.parts.dtype)
    return self.parts.vae.encode(x).latent_dist.mean * self.parts.scaling_factor

  @torch.no_grad()
  def latent_gradient(
    self, latents: torch.Tensor, inputs: SdsInputs, embeddings: torch.Tensor
  ) -> tuple[torch.Tensor, torch.Tensor]:
    """w(t)·(ε̂ − ε) on (N, 4, h, w) latents, and ε̂ − ε. embeddings: (P, 5, L, D)."""
    cfg, parts = self.cfg, self.parts
    n = cfg.sds_samples
    if cfg.view_prompts:
      rows = 1 + raster.view_index(inputs.azimuth, inputs.elevation)
    else:
      rows = torch.ones_like(inputs.t)
    prompt = torch.arange(embeddings.shape[0], device=embeddings.device).repeat_interleave(n)
    cond = embeddings[prompt, rows]
    uncond = embeddings[prompt, 0]
    latents = latents.detach().float()
    noise = inputs.noise.to(latents.dtype)
    alpha_bar = parts.alphas_cumprod[inputs.t].reshape(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise
    model_in = torch.cat([noisy, noisy]).to(parts.dtype)
    t2 = torch.cat([inputs.t, inputs.t])
    eps = parts.unet(
      model_in, t2, encoder_hidden_states=torch.cat([uncond, cond]).to(parts.dtype)
    ).sample.float()
    if parts.prediction_type != "epsilon":  # convert v or x0 predictions to ε
      a2, z2 = torch.cat([alpha_bar, alpha_bar]), torch.cat([noisy, noisy])
      if parts.prediction_type == "v_prediction":
        eps = a2.sqrt() * eps + (1.0 - a2).sqrt() * z2
      else:
        eps = (z2 - a2.sqrt() * eps) / (1.0 - a2).sqrt()
    eps_uncond, eps_text = eps.chunk(2)
    residual = eps_uncond + cfg.guidance_scale * (eps_text - eps_uncond) - noise
    return sds_weight(alpha_bar, cfg.weighting) * residual, residual

  def __call__(self, weights: torch.Tensor, inputs: SdsInputs, embeddings: torch.Tensor) -> dict:
    """Back-propagates the SDS gradient (mean over the n samples) into `weights.grad`."""
    latents = self.encode(self.render(weights, inputs))
    grad, residual = self.latent_gradient(latents, inputs, embeddings)
    latents.backward(gradient=(grad / self.cfg.sds_samples).to(latents.dtype))
    return {"loss": residual.pow(2).mean(), "overflow": self.overflow.sum()}


def lr_lambda(cfg):
  """The multiplier of cfg.lr at update `count` (optax's schedules in make_optimizer)."""
  warmup = cfg.warmup_steps
  if cfg.lr_schedule == "cosine":
    warmup = max(warmup, 1)
    decay = max(cfg.steps, warmup + 1) - warmup

    def cosine(count):
      if count < warmup:
        return count / warmup
      frac = min(count - warmup, decay) / decay
      return 0.5 * (1.0 + math.cos(math.pi * frac))

    return cosine
  if cfg.lr_schedule == "exponential":
    warmup = max(warmup, 1)
    decay = max(cfg.steps - warmup, 1)
    end = 0.1  # sdsjax.fit_step.EXPONENTIAL_LR_END

    def exponential(count):
      if count < warmup:
        return count / warmup
      return end ** (min(count - warmup, decay) / decay)

    return exponential
  if warmup > 0:
    return lambda count: min(count, warmup) / warmup
  return lambda count: 1.0


def _generator(seed: int, device: torch.device) -> torch.Generator:
  """A seeded generator on the step's device, so the random draws are made there."""
  return torch.Generator(device=device).manual_seed(int(seed))


def make_optimizer(cfg, params: torch.Tensor):
  """Adam with the Gaussian prior's gradient λw added before the moments (torch's L2
  weight_decay, sdsjax's add_decayed_weights after the clip)."""
  opt = torch.optim.Adam(
    [params],
    lr=cfg.lr,
    betas=(cfg.adam_b1, cfg.adam_b2),
    eps=1e-8,
    weight_decay=cfg.prior.identity,
  )
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
  """(B, F, 3) unit normals of the counter-clockwise faces of (B, V, 3) vertices."""
  tri = verts[:, faces]  # (B, F, 3, 3)
  n = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
  return n / n.pow(2).sum(-1, keepdim=True).clamp(min=1e-20).sqrt()


class FoldPrior:
  """sdsjax's fold-over prior (`priors.fold_penalty`): fold · mean over faces of
  relu(fold_cos − n·n_rest)², n_rest the mean shape's normals. Its gradient is added to the
  clipped SDS gradient, before Adam."""

  def __init__(self, cfg, head: Head):
    self.head, self.weight, self.cos_min = head, cfg.prior.fold, cfg.prior.fold_cos
    self.rest = face_normals(head.mean[None], head.faces)

  def gradient(self, weights: torch.Tensor) -> torch.Tensor:
    """(P, K) weights -> (P, K) gradient of each prompt's penalty (zeros with fold = 0)."""
    if self.weight <= 0:
      return torch.zeros_like(weights)
    with torch.enable_grad():
      w = weights.detach().requires_grad_(True)
      cos = (face_normals(self.head.vertices(w), self.head.faces) * self.rest).sum(-1)
      penalty = torch.relu(self.cos_min - cos).pow(2).mean(-1).sum()  # prompts are independent
      (grad,) = torch.autograd.grad(self.weight * penalty, w)
    return grad


class LoopBaseline:
  """The article's way: every prompt has its own weights and Adam, stepped one at a time."""

  def __init__(
    self,
    cfg,
    head: Head,
    parts: StableDiffusionParts,
    embeddings: torch.Tensor,
    seeds: list[int],
    compile_render: bool = False,
  ):
    self.cfg = cfg
    self.sds = SdsGradient(cfg, head, parts, compile_render)
    self.fold = FoldPrior(cfg, head)
    self.embeddings = embeddings
    self.num_timesteps = parts.alphas_cumprod.shape[0]
    self.weights, self.optimizers, self.generators = [], [], []
    for seed in seeds:
      w = torch.zeros(1, head.basis.shape[0], device=parts.device, requires_grad=True)
      self.weights.append(w)
      self.optimizers.append(make_optimizer(cfg, w))
      self.generators.append(_generator(seed, parts.device))
    self.step_count = 0
    self.skipped = [0] * len(seeds)

  def step(self) -> list[dict]:
    metrics = []
    for i, w in enumerate(self.weights):
      opt, sched = self.optimizers[i]
      inputs = sample_inputs(self.generators[i], self.cfg, 1, self.step_count, self.num_timesteps)
      opt.zero_grad(set_to_none=True)
      aux = self.sds(w, inputs, self.embeddings[i : i + 1])
      if torch.isfinite(w.grad).all():
        aux["grad_norm"] = torch.nn.utils.clip_grad_norm_([w], self.cfg.grad_clip)
        w.grad.add_(self.fold.gradient(w))
        opt.step()
        sched.step()
        bound_weights(self.cfg, w)
      else:
        self.skipped[i] += 1  # a non-finite gradient must not poison Adam's moments
      metrics.append(aux)
    self.step_count += 1
    return metrics


def bound_weights(cfg, weights: torch.Tensor) -> None:
  """Projects the weights into ±cfg.prior.bound σ in place, as sdsjax's step does."""
  if cfg.prior.bound > 0:
    with torch.no_grad():
      weights.clamp_(-cfg.prior.bound, cfg.prior.bound)


class BatchedBaseline:
  """P prompts in one batch: one render/VAE/UNet call, one backward, one Adam over (P, K).

  Adam with L2 is element-wise, so one optimizer over the (P, K) tensor equals P optimizers;
  the clipping is per prompt (row), as in sdsjax, and done in place without a Python loop, and
  the fold prior's gradient is per row too.
  """

  def __init__(
    self,
    cfg,
    head: Head,
    parts: StableDiffusionParts,
    embeddings: torch.Tensor,
    seed: int,
    compile_render: bool = False,
  ):
    self.cfg = cfg
    self.sds = SdsGradient(cfg, head, parts, compile_render)
    self.fold = FoldPrior(cfg, head)
    self.embeddings = embeddings
    self.num_timesteps = parts.alphas_cumprod.shape[0]
    self.num_prompts = embeddings.shape[0]
    self.weights = torch.zeros(
      self.num_prompts, head.basis.shape[0], device=parts.device, requires_grad=True
    )
    self.optimizer, self.scheduler = make_optimizer(cfg, self.weights)
    self.generator = _generator(seed, parts.device)
    self.step_count = 0
    self.skipped = torch.zeros(self.num_prompts, dtype=torch.int64, device=parts.device)

  def step(self) -> dict:
    inputs = sample_inputs(
      self.generator, self.cfg, self.num_prompts, self.step_count, self.num_timesteps
    )
    self.optimizer.zero_grad(set_to_none=True)
    aux = self.sds(self.weights, inputs, self.embeddings)
    grad = self.weights.grad
    finite = torch.isfinite(grad).all(dim=1)
    grad.nan_to_num_(0.0, 0.0, 0.0)
    norms = grad.norm(dim=1, keepdim=True)
    grad.mul_(torch.clamp(self.cfg.grad_clip / (norms + 1e-6), max=1.0))
    grad.add_(self.fold.gradient(self.weights))
    aux["grad_norm"] = norms[:, 0]
    if bool(finite.all()):
      self.optimizer.step()
    else:
      # Rare: keep the parameters and moments of the prompts whose gradient was not finite.
      state = self.optimizer.state.get(self.weights, {})
      saved = {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.dim() == 2}
      before = self.weights.detach().clone()
      self.optimizer.step()
      with torch.no_grad():
        bad = ~finite
        self.weights[bad] = before[bad]
        for k, v in saved.items():
          self.optimizer.state[self.weights][k][bad] = v[bad]
      self.skipped += bad.long()
    bound_weights(self.cfg, self.weights)
    self.scheduler.step()
    self.step_count += 1
    return aux
