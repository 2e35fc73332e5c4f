"""Where a fit step's time goes: its three heavy stages timed alone, sdsjax against the baseline.

Used by `python -m benchmarks.bench_fit --breakdown` (the default), with the models bench_fit
has loaded: render fwd+bwd, VAE encode fwd+bwd (with the bilinear upsampling) and the UNet on
[uncond, cond], for N = P·sds_samples views, on the same random inputs on both sides.
"""

from __future__ import annotations

from . import common

STAGES = ("render fwd+bwd", "VAE encode fwd+bwd", "UNet [uncond, cond]")


def breakdown(cfg, shared: dict, num_prompts: int, repeats: int = 3) -> dict:
  """{stage: {"flops", "sdsjax_s", "torch_s"}}: seconds are the best of `repeats`, FLOPs XLA's
  count of the sdsjax stage (`common.xla_flops`)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from sdsjax import config as config_lib
  from sdsjax import fit_step

  from .torch_baseline import raster as torch_raster
  from .torch_baseline import sds_step

  sd, head, parts = shared["sd"], shared["head"], shared["parts"]
  cfg = fit_step.resolve_closeup_target(cfg, head.mean)
  n = num_prompts * cfg.sds_samples
  res, size, h = cfg.render_resolution, cfg.sd_resolution, cfg.sd_resolution // 8
  rng = np.random.default_rng(0)
  inputs = jax.vmap(lambda k: fit_step.make_sampler(cfg)(k, 0, len(sd.alphas_cumprod)))(
    jax.random.split(jax.random.PRNGKey(0), num_prompts)
  )
  views = jax.tree.map(lambda x: x.reshape((n, *x.shape[2:])), inputs.views)
  settings = config_lib.raster_settings(cfg, res)
  weights = jnp.asarray(0.3 * rng.standard_normal((n, cfg.num_components)), jnp.float32)
  cot_img = jnp.asarray(rng.standard_normal((n, res, res, 3)), jnp.float32)
  images = jnp.asarray(rng.random((n, res, res, 3)), jnp.float32)
  cot_z = jnp.asarray(rng.standard_normal((n, h, h, 4)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((2 * n, h, h, 4)), jnp.float32)
  t = jnp.asarray(rng.integers(20, 980, 2 * n), jnp.int32)
  emb = jnp.asarray(rng.standard_normal((2 * n, sd.text_length, sd.text_dim)), jnp.float32)

  def render_loss(w):
    render = lambda wi, v: fit_step.render_view(cfg, head, {"weights": wi}, v, settings)[0]
    rgb = jax.vmap(render)(w, views)
    return jnp.sum(rgb * cot_img)

  def encode_loss(x, vae):
    x = jax.image.resize(x, (n, size, size, 3), method="bilinear")
    return jnp.sum(sd.encode_image(vae, x) * cot_z)

  jax_stages = (
    (jax.grad(render_loss), (weights,)),
    (jax.grad(encode_loss), (images, sd.params["vae"])),
    (sd.predict_noise, (sd.params["unet"], z, t, emb)),
  )
  out = {}
  for name, (fn, args) in zip(STAGES, jax_stages):
    lowered = jax.jit(fn).lower(*args)
    compiled = lowered.compile()
    out[name] = {
      "flops": common.xla_flops(lowered, compiled),
      "sdsjax_s": common.best_time(lambda: jax.block_until_ready(compiled(*args)), repeats),
    }

  thead = shared["torch_head"]
  grad = sds_step.SdsGradient(cfg, thead, parts, shared["torch_compile"])
  dev = parts.device
  to_t = lambda x: torch.from_numpy(np.array(x)).to(dev)
  cameras, lights = torch_raster.cameras_and_lights(views.camera, views.light, to_t)
  tw = to_t(weights).requires_grad_(True)
  t_cot_img, t_images = to_t(cot_img), to_t(images).requires_grad_(True)
  t_cot_z = to_t(cot_z).permute(0, 3, 1, 2)
  t_z, t_t, t_emb = to_t(z).permute(0, 3, 1, 2).contiguous(), to_t(t).long(), to_t(emb)

  def torch_render():
    tw.grad = None
    rgb, _, _ = grad._render(thead.vertices(tw), thead.faces, cameras, lights, grad.settings)
    (rgb * t_cot_img).sum().backward()

  def torch_encode():
    t_images.grad = None
    grad.encode(t_images).backward(t_cot_z)

  @torch.no_grad()
  def torch_unet():
    parts.unet(t_z.to(parts.dtype), t_t, encoder_hidden_states=t_emb.to(parts.dtype))

  for name, fn in zip(STAGES, (torch_render, torch_encode, torch_unet)):
    out[name]["torch_s"] = common.best_time(lambda fn=fn: common.on_torch_device(dev, fn), repeats)
  return out


def markdown(num_prompts, stages: dict, repeats: int = 3) -> str:
  title = f"Stages alone, P={num_prompts} (best of {repeats}; GFLOP: XLA's count, sdsjax side):"
  table = common.markdown_table(
    ["stage", "GFLOP", "sdsjax s", "torch s", "torch / sdsjax"],
    [
      [
        name,
        common.fmt(st["flops"] and st["flops"] / 1e9, ".2f"),
        f"{st['sdsjax_s']:.4f}",
        f"{st['torch_s']:.4f}",
        f"{st['torch_s'] / st['sdsjax_s']:.2f}",
      ]
      for name, st in stages.items()
    ],
  )
  return f"{title}\n\n{table}"
