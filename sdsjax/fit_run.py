"""One fitting run: load models, shard prompts over devices, loop with checkpoints, export.

`fit(cfg, prompts, out)` is what `python -m sdsjax.fit` calls after parsing. Multi-host: every
process runs this same function after `jax.distributed.initialize()`; prompts are sharded over
all devices of all hosts, and process 0 writes the outputs.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sdsjax import camera as camera_lib
from sdsjax import config as config_lib
from sdsjax import export
from sdsjax import fit_step
from sdsjax import morphable
from sdsjax.config import FitConfig

PREVIEW_AZIMUTHS = tuple(float(a) for a in np.arange(8) * 45.0)
EVOLUTION_VIEW = (25.0, 10.0)  # azimuth, elevation of the evolution GIF's camera


def view_prompts(prompt: str, negative: str, with_views: bool) -> list[str]:
  """The rows of a prompt's embedding table: [negative, prompt + each view suffix]."""
  if not with_views:
    return [negative] + [prompt] * len(camera_lib.VIEW_SUFFIXES)
  return [negative] + [f"{prompt}, {s}" for s in camera_lib.VIEW_SUFFIXES]


def embedding_table(encode_text, prompts, cfg: FitConfig) -> np.ndarray:
  """(P, 5, L, D): each prompt's negative and view-suffixed embeddings, encoded once."""
  texts = [t for p in prompts for t in view_prompts(p, cfg.negative_prompt, cfg.view_prompts)]
  emb = np.asarray(encode_text(texts))
  return emb.reshape(len(prompts), fit_step.NUM_EMBEDDING_ROWS, *emb.shape[1:])


def global_array(x, sharding):
  """A global jax.Array from a host value every process holds in full (single or multi-host)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def make_preview_renderer(cfg: FitConfig, head: morphable.MorphableModel):
  """jit: (weights (K,), texture (Ht,Wt,3) | None, azimuth, elevation) -> (R, R, 3)."""
  settings = fit_step.raster_settings(cfg, cfg.preview_resolution)
  distance = float(np.mean(cfg.camera.distance_range))
  fov = float(np.mean(cfg.camera.fov_range))

  @jax.jit
  def render(weights, texture, azimuth, elevation):
    cam = camera_lib.orbit_camera(azimuth, elevation, distance, fov)
    # Key light from the camera's upper left: a head-on light flattens the face.
    key_light = cam.world_to_view[:3, :3].T @ jnp.array([-0.45, 0.5, 1.0])
    light = camera_lib.default_light(
      direction=key_light, ambient=cfg.light.ambient, diffuse=cfg.light.diffuse
    )
    params = {"weights": weights}
    view = fit_step.View(camera=cam, light=light, azimuth=azimuth, elevation=elevation)
    if texture is not None:
      params["texture_logits"] = jnp.log(texture / (1.0 - texture))
    return fit_step.render_view(head, params, view, settings)[0]

  return render


def slugify(prompts: list[str]) -> list[str]:
  """Folder names for prompts: lowercase words joined by '-', made unique."""
  slugs, seen = [], {}
  for p in prompts:
    s = re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-")[:60].strip("-") or "prompt"
    seen[s] = seen.get(s, 0) + 1
    slugs.append(s if seen[s] == 1 else f"{s}-{seen[s]}")
  return slugs


class History:
  """Weight (and texture) snapshots every `evolution_every` steps, for evolution.gif."""

  def __init__(self):
    self.steps: list[int] = []
    self.weights: list[np.ndarray] = []  # each (P, K)
    self.textures: list[np.ndarray] = []  # each (P, Ht, Wt, 3) uint8

  def add(self, step: int, params: dict) -> None:
    self.steps.append(step)
    self.weights.append(np.asarray(params["weights"], np.float32))
    if "texture_logits" in params:
      tex = 1.0 / (1.0 + np.exp(-np.asarray(params["texture_logits"], np.float32)))
      self.textures.append(export.to_uint8(tex))

  def save(self, path: Path) -> None:
    arrays = {"steps": np.array(self.steps, np.int64), "weights": np.stack(self.weights)}
    if self.textures:
      arrays["textures"] = np.stack(self.textures)
    with export.atomic_write(path) as f:
      np.savez(f, **arrays)

  @classmethod
  def load(cls, path: Path, up_to_step: int) -> History:
    h = cls()
    if path.exists():
      with np.load(path) as data:
        keep = data["steps"] <= up_to_step
        h.steps = [int(s) for s in data["steps"][keep]]
        h.weights = list(data["weights"][keep])
        if "textures" in data:
          h.textures = list(data["textures"][keep])
    return h


def fit(
  cfg: FitConfig,
  prompts: list[str],
  out: Path,
  resume: bool = False,
  overwrite: bool = False,
  progress: bool = True,
) -> int:
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils

  from sdsjax.models.stable_diffusion import load_stable_diffusion

  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  # Everything that can fail on user input is loaded before --out is touched.
  head = morphable.load_model(cfg.head, cfg.num_components)
  sd = load_stable_diffusion(
    cfg.model, dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
  )
  embeddings = embedding_table(sd.encode_text, prompts, cfg)
  timings["load_s"] = time.perf_counter() - t0
  is_writer = jax.process_index() == 0
  if jax.process_count() > 1:
    # Every process has checked --out before any process writes to it.
    multihost_utils.sync_global_devices("sdsjax: inputs checked")

  if overwrite and is_writer and out.exists():
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "run.json").unlink(missing_ok=True)
  out.mkdir(parents=True, exist_ok=True)
  ckpt_dir = (out / "checkpoints").absolute()
  ckpt_dir.mkdir(exist_ok=True)
  spec = {"prompts": prompts, "config": config_lib.to_dict(cfg)}
  if is_writer and not resume:
    with export.atomic_write(ckpt_dir / "run_spec.json", "w") as f:
      json.dump(spec, f, indent=2)

  # Prompts over devices: pad P up to a multiple of the device count with copies of the last.
  mesh = fit_step.prompt_mesh()
  num_prompts = len(prompts)
  padded = math.ceil(num_prompts / mesh.size) * mesh.size
  order = list(range(num_prompts)) + [num_prompts - 1] * (padded - num_prompts)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("prompts"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  # Prompt i uses seed + i, so it matches a single-prompt run with that seed.
  seeds = [cfg.seed + i for i in order]
  keys = global_array(np.asarray(fit_step.prompt_keys(seeds)), split)
  emb = global_array(embeddings[order], split)
  host_state = fit_step.batch_states([fit_step.init_state(cfg, head.basis.shape[0])] * padded)
  state = jax.tree.map(lambda x: global_array(x, split), host_state)
  frozen = fit_step.Frozen(
    vae_params=sd.params["vae"],
    unet_params=sd.params["unet"],
    alphas_cumprod=jnp.asarray(sd.alphas_cumprod, jnp.float32),
  )
  frozen = jax.tree.map(lambda x: global_array(x, replicated), frozen)

  manager = ocp.CheckpointManager(
    ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  )
  history_path = ckpt_dir / "history.npz"
  start = 0
  if resume and manager.latest_step() is not None:
    start = manager.latest_step()
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
    history = History.load(history_path, start)
  else:
    history = History()

  slugs = slugify(prompts)
  metric_files = []
  if is_writer:
    for slug in slugs:
      path = out / slug / "metrics.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      # Drop lines past the checkpoint so a resumed log reads like an uninterrupted one.
      lines = path.read_text().splitlines() if (resume and path.exists()) else []
      lines = [l for l in lines if json.loads(l)["step"] <= start]
      path.write_text("".join(l + "\n" for l in lines))
      metric_files.append(path.open("a"))

  step_fn = fit_step.make_batched_step(
    fit_step.make_fit_step(cfg, head, sd.encode_image, sd.predict_noise), mesh
  )
  t_compile = time.perf_counter()
  compiled = step_fn.lower(state, keys, emb, frozen).compile()
  timings["compile_s"] = time.perf_counter() - t_compile

  def host(tree):
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

  if start == 0:
    history.add(0, host(state.params))
  bar = tqdm(
    total=cfg.steps,
    initial=start,
    disable=not (progress and is_writer),
    desc=f"fitting {num_prompts} prompt{'s' * (num_prompts > 1)}",
    unit="step",
    dynamic_ncols=True,
  )
  t_fit = time.perf_counter()
  skipped_total = 0
  for step in range(start, cfg.steps):
    state, metrics = compiled(state, keys, emb, frozen)
    done = step + 1
    m = host(metrics)
    if is_writer:
      for i, f in enumerate(metric_files):
        row = {"step": done, **{k: float(v[i]) for k, v in m.items()}}
        f.write(json.dumps(row) + "\n")
      loss = float(np.mean(m["loss"][:num_prompts]))
      skipped_total += int(np.sum(~m["finite"][:num_prompts]))
      bar.set_postfix(loss=f"{loss:.4g}", skipped=skipped_total, refresh=False)
      bar.update(1)
    if done % cfg.evolution_every == 0 or done == cfg.steps:
      history.add(done, host(state.params))
    if done % cfg.checkpoint_every == 0 and done < cfg.steps:
      for f in metric_files:
        f.flush()
      manager.save(done, args=ocp.args.StandardSave(state))
      manager.wait_until_finished()
      if is_writer:
        history.save(history_path)
  bar.close()
  for f in metric_files:
    f.close()
  jax.block_until_ready(state)
  elapsed = time.perf_counter() - t_fit
  timings["fit_s"] = elapsed
  ran = cfg.steps - start
  timings["steps_per_s"] = ran / elapsed if ran else 0.0
  timings["prompt_steps_per_s"] = ran * num_prompts / elapsed if ran else 0.0

  final = host(state)
  if is_writer:
    t_export = time.perf_counter()
    render = make_preview_renderer(cfg, head)
    for i, (_prompt, slug) in enumerate(zip(prompts, slugs)):
      export_prompt(out / slug, head, render, final, history, i)
    timings["export_s"] = time.perf_counter() - t_export
    run_info = {
      "prompts": prompts,
      "slugs": slugs,
      "seeds": seeds[:num_prompts],
      "config": config_lib.to_dict(cfg),
      "timings": timings,
      "skipped_steps": [int(s) for s in final.skipped[:num_prompts]],
      "devices": [str(d) for d in jax.devices()],
      "process_count": jax.process_count(),
      "jax_version": jax.__version__,
      "resumed_from_step": start,
    }
    with export.atomic_write(out / "run.json", "w") as f:
      json.dump(run_info, f, indent=2)
  return 0


def export_prompt(folder: Path, head, render, final, history: History, i: int) -> None:
  """Writes one prompt's params, meshes, turntable and evolution GIF."""
  weights = final.params["weights"][i]
  texture = None
  arrays = {"weights": weights, "names": np.array(head.names)}
  if "texture_logits" in final.params:
    texture = 1.0 / (1.0 + np.exp(-final.params["texture_logits"][i]))
    arrays["texture"] = texture.astype(np.float32)
  with export.atomic_write(folder / "params.npz") as f:
    np.savez(f, **arrays)
  verts = np.asarray(morphable.vertices(head, jnp.asarray(weights)))
  export.write_obj(folder / "head.obj", verts, head.faces, head.uvs, head.uv_faces, texture)
  export.write_glb(folder / "head.glb", verts, head.faces, head.uvs, head.uv_faces, texture)
  tex = None if texture is None else jnp.asarray(np.clip(texture, 1e-4, 1 - 1e-4))
  views = [
    render(jnp.asarray(weights), tex, jnp.float32(a), jnp.float32(0.0)) for a in PREVIEW_AZIMUTHS
  ]
  export.write_png(folder / "turntable.png", export.image_grid(np.stack(views), columns=4))
  frames = []
  for k, w in enumerate(history.weights):
    tk = None
    if history.textures:
      tk = jnp.asarray(np.clip(history.textures[k][i] / 255.0, 1e-3, 1 - 1e-3), jnp.float32)
    frames.append(np.asarray(render(jnp.asarray(w[i]), tk, *map(jnp.float32, EVOLUTION_VIEW))))
  export.write_gif(folder / "evolution.gif", np.stack(frames))
