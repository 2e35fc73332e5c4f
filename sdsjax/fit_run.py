"""One fitting run: check everything, plan waves, loop with checkpoints, export, gallery.

`fit(cfg, prompts, out)` is what `python -m sdsjax.fit` calls after parsing.

- **Waves.** Prompts are cut into waves of `devices × prompts_per_device` prompts (the last one
  padded with copies of its last prompt, whose results are dropped). Every wave runs through the
  same compiled program. `prompts_per_device: auto` picks the largest batch whose estimated
  memory (XLA's memory analysis of the step at two sizes) fits the device, or host RAM on CPU.
- **Determinism.** Prompt i has seed `seed + i` and its own PRNG stream, so its result depends
  only on its seed and the compiled program (the wave size and the device set), not on which
  wave or position it lands in. A run with another wave size is a different program and agrees
  only to rounding, which SDS amplifies over many steps.
- **Outputs.** A prompt's folder is written when its wave finishes; `run.json` lists every prompt
  with its wave, seed, status and folder, and `index.html` (sdsjax.gallery) shows them.
- **Checkpoints.** orbax checkpoints hold the wave's optimiser state, the GIF history and the
  run's fingerprint as one unit. `--resume` continues at the wave and step where a run stopped
  (finished waves are not redone) and equals the uninterrupted run; a damaged newest checkpoint
  falls back to the older one. SIGTERM/SIGINT finish the current step, checkpoint and exit
  (codes 143 and 130).
- **Multi-host.** Every process runs this function after `jax.distributed.initialize()`; prompts
  are sharded over all devices of all hosts, process 0 writes the outputs, and all processes stop
  at the same step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
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
from sdsjax import program_cache as program_cache_lib
from sdsjax.config import FitConfig
from sdsjax.errors import CheckpointError
from sdsjax.errors import ConfigError
from sdsjax.errors import SdsjaxError
from sdsjax.host_memory import process_rss
from sdsjax.run_folder import CHECKPOINTS
from sdsjax.run_folder import RUN_JSON
from sdsjax.run_folder import RUN_SPEC

PREVIEW_AZIMUTHS = tuple(float(a) for a in np.arange(8) * 45.0)
EVOLUTION_VIEW = (25.0, 10.0)  # azimuth, elevation of the evolution GIF's camera
RUN_FORMAT = 2
# Files a prompt folder gets; --overwrite removes exactly these (and the folder if then empty).
PROMPT_FILES = (
  "params.npz",
  "head.obj",
  "head.mtl",
  "texture.png",
  "head.glb",
  "turntable.png",
  "evolution.gif",
  "metrics.jsonl",
  "head_flame_units.obj",
  "head_ict_units.obj",
  "head_npz_units.obj",
)
HISTORY_TEXTURE_SIZE = 128  # texture frames of the GIF history are kept at most this size
TEXT_BATCH = 64  # prompts encoded per text-encoder call (bounded memory for 1000s of prompts)


class FitError(SdsjaxError):
  """A run that cannot go on (it diverged, or its checkpoints are unusable)."""


class Interrupted(Exception):
  """SIGTERM/SIGINT: the run checkpointed and stops; carries the exit code."""

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.code = code


# ----------------------------------------------------------------------------------------------
# Prompts and their embeddings.


def view_prompts(prompt: str, negative: str, with_views: bool) -> list[str]:
  """The rows of a prompt's embedding table: [negative, prompt + each view suffix]."""
  if not with_views:
    return [negative] + [prompt] * len(camera_lib.VIEW_SUFFIXES)
  return [negative] + [f"{prompt}, {s}" for s in camera_lib.VIEW_SUFFIXES]


def fit_to_tokens(tokenizer, prompt: str, max_length: int, with_views: bool) -> str:
  """`prompt`, cut so that it and its longest view suffix fit in CLIP's `max_length` tokens.

  CLIP truncates at 77 tokens; the suffix comes last, so an uncut long prompt would lose it and
  every view would get the same embedding. Returns the prompt unchanged when it fits.
  """
  if tokenizer is None:
    return prompt
  suffix = max(
    (
      len(tokenizer(f", {s}", add_special_tokens=False)["input_ids"])
      for s in camera_lib.VIEW_SUFFIXES
    ),
    default=0,
  )
  budget = max_length - 2 - (suffix if with_views else 0)  # BOS and EOS
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  if len(ids) <= budget:
    return prompt
  return tokenizer.decode(ids[:budget]).strip()


def embedding_table(sd, prompts: list[str], cfg: FitConfig, warn=None) -> np.ndarray:
  """(P, 5, L, D): each prompt's negative and view-suffixed embeddings, encoded once.

  `sd` is a StableDiffusion bundle (or anything with `encode_text` and optionally `tokenizer`
  and `text_length`). Prompts too long for CLIP are cut (with one warning line each) so that
  the view suffix stays inside the 77 tokens.
  """
  tokenizer = getattr(sd, "tokenizer", None)
  length = getattr(sd, "text_length", 77)
  texts = []
  for i, prompt in enumerate(prompts):
    kept = fit_to_tokens(tokenizer, prompt, length, cfg.view_prompts)
    if kept != prompt and warn is not None:
      warn(
        f"warning: prompt {i + 1} is longer than CLIP's {length} tokens; it is cut to "
        f"{kept!r}... so that the view suffix fits"
      )
    texts += view_prompts(kept, cfg.negative_prompt, cfg.view_prompts)
  rows = fit_step.NUM_EMBEDDING_ROWS
  chunks = [
    np.asarray(sd.encode_text(texts[i : i + TEXT_BATCH * rows]))
    for i in range(0, len(texts), TEXT_BATCH * rows)
  ]
  emb = np.concatenate(chunks)
  return emb.reshape(len(prompts), rows, *emb.shape[1:])


def slugify(prompts: list[str]) -> list[str]:
  """Folder names for prompts: lowercase words joined by '-', unique for any list of prompts."""
  slugs, used = [], {CHECKPOINTS}  # the run's own folder is no prompt's
  for p in prompts:
    base = re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-")[:60].strip("-") or "prompt"
    slug, n = base, 1
    while slug in used:
      n += 1
      slug = f"{base}-{n}"
    used.add(slug)
    slugs.append(slug)
  return slugs


# ----------------------------------------------------------------------------------------------
# Waves and their size.


def plan_waves(num_prompts: int, wave_size: int) -> list[list[int]]:
  """Prompt indices per wave; the last wave is padded with copies of its last prompt."""
  waves = []
  for start in range(0, num_prompts, wave_size):
    wave = list(range(start, min(start + wave_size, num_prompts)))
    waves.append(wave + [wave[-1]] * (wave_size - len(wave)))
  return waves


def available_memory(device) -> tuple[int, str]:
  """(bytes a program may still use on `device`, where the figure comes from)."""
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), "device memory"
  with open("/proc/meminfo") as f:
    info = dict(line.split(":", 1) for line in f)
  return int(info["MemAvailable"].split()[0]) * 1024, "available host RAM"


def step_memory(compiled) -> int:
  """Bytes a compiled step needs beyond its (already resident) arguments."""
  analysis = getattr(compiled, "memory_analysis", None)
  ma = analysis() if analysis is not None else None
  if ma is None:  # backends without the analysis: size by prompt count alone
    return 0
  return int(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)


def auto_prompts_per_device(
  compile_at, num_prompts: int, num_devices: int, safety: float = 0.75, run_at=None
) -> tuple[int, str, dict, dict]:
  """The largest per-device batch whose estimated memory fits, and one line saying why.

  `compile_at(b)` compiles the step for b prompts per device and returns the compiled program.
  Memory grows linearly with the batch, so two sizes (b = 1, 2) give the per-prompt cost; the
  budget is `safety` × what the device (or host RAM, on CPU) has left.

  On GPU/TPU, XLA's memory analysis of the two programs gives the bytes (the allocator serves
  its buffer assignment). On CPU it under-counts what the runtime allocates (3-4× at tiny size),
  so with `run_at(b, compiled)` (one step on scratch inputs, returning the process's peak
  resident bytes) the cost is measured instead: the peak after b = 2 plus the growth from b = 1
  to b = 2 for every further prompt.

  Returns (batch, reason, {batch: compiled}, estimate) so a compiled size can be reused;
  `estimate` holds the bytes the step needs and, on CPU, the expected peak resident size.
  """
  most = max(1, math.ceil(num_prompts / num_devices))
  one = compile_at(1)
  compiled = {1: one}
  two = compile_at(2) if most > 1 else None
  if two is not None:
    compiled[2] = two
  fixed = step_memory(one)
  per_prompt = max(step_memory(two) - fixed, 1) if two is not None else 0
  cpu = jax.local_devices()[0].platform == "cpu"
  measured = cpu and run_at is not None
  if measured:
    peak_one = run_at(1, one)
    peak_two = run_at(2, two) if two is not None else peak_one
    per_prompt = max(per_prompt, peak_two - peak_one) if two is not None else 0
    base, base_batch = peak_two, (2 if two is not None else 1)
  else:
    base, base_batch = fixed, 1
  free, where = available_memory(jax.local_devices()[0])
  budget = safety * free if measured else safety * free - fixed
  if per_prompt and budget > 0:
    fits = base_batch + int(budget // per_prompt)
  else:
    fits = most if per_prompt == 0 else 1
  batch = int(max(1, min(most, fits, 4096)))
  need = fixed + per_prompt * (batch - 1)
  if measured:
    peak = base + per_prompt * max(batch - base_batch, 0)
  else:
    # The program's buffers come on top of what the process already holds (the models).
    peak = (process_rss() if cpu else 0) + need
  estimate = {"prompts_per_device": batch, "step_bytes": need, "peak_bytes": peak}
  how = "measured" if measured else "from XLA's memory analysis"
  reason = (
    f"prompts_per_device=auto -> {batch}: {per_prompt / 2**30:.3f} GiB per extra prompt ({how}), "
    f"against {safety:.0%} of {free / 2**30:.1f} GiB {where}"
    + (f" (capped by the {num_prompts} prompts)" if batch == most else "")
    + (f"; estimated peak {peak / 2**30:.2f} GiB" if cpu else "")
  )
  return batch, reason, compiled, estimate


# ----------------------------------------------------------------------------------------------
# History (the evolution GIF's frames) and checkpoints.


class History:
  """Parameter snapshots of one wave every `evolution_every` steps, for evolution.gif."""

  def __init__(self):
    self.steps: list[int] = []
    self.frames: list[dict[str, np.ndarray]] = []  # each {name: (W, ...)}

  def add(self, step: int, params: dict) -> None:
    frame = {k: np.asarray(v, np.float32) for k, v in params.items() if k != "texture_logits"}
    if "texture_logits" in params:
      tex = 1.0 / (1.0 + np.exp(-np.asarray(params["texture_logits"], np.float32)))
      size = tex.shape[1]
      if size > HISTORY_TEXTURE_SIZE:
        factor = -(-size // HISTORY_TEXTURE_SIZE)
        tex = tex[:, ::factor, ::factor]
      frame["texture"] = export.to_uint8(tex)
    self.steps.append(step)
    self.frames.append(frame)

  def to_tree(self) -> dict:
    tree = {"steps": np.asarray(self.steps, np.int64)}
    for name in self.frames[0] if self.frames else ():
      tree[name] = np.stack([f[name] for f in self.frames])
    return tree

  @classmethod
  def from_tree(cls, tree: dict) -> History:
    h = cls()
    names = [k for k in tree if k != "steps"]
    for i, step in enumerate(np.asarray(tree["steps"])):
      h.steps.append(int(step))
      h.frames.append({k: np.asarray(tree[k][i]) for k in names})
    return h


def run_fingerprint(prompts, seeds, cfg: FitConfig, head, model_folder) -> str:
  """sha256 of what decides a run's result: prompts, seeds, config, head and model identity."""
  digest = hashlib.sha256()
  digest.update(json.dumps([prompts, seeds, config_lib.to_dict(cfg)], sort_keys=True).encode())
  for array in (head.mean, head.basis, head.expression_basis, head.faces):
    digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
  folder = Path(model_folder)
  for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
    if path.is_file():
      stat = path.stat()
      digest.update(f"{path.relative_to(folder)}:{stat.st_size}".encode())
  return digest.hexdigest()


def model_configs(folder) -> dict:
  """The model folder's JSON files (its configs), by relative path: what a step built from the
  model depends on besides its weights."""
  folder = Path(folder)
  return {
    str(p.relative_to(folder)): p.read_text(encoding="utf-8", errors="replace")
    for p in sorted(folder.rglob("*.json"))
    if p.is_file() and p.stat().st_size < 1 << 20
  }


def checkpoint_id(wave: int, step: int, steps: int) -> int:
  """A checkpoint's orbax step id: increasing over (wave, step), with step in 1..steps."""
  return wave * steps + step


class Checkpoints:
  """orbax checkpoints of a wave's state, its history and the run's fingerprint, as one unit."""

  def __init__(self, folder: Path, fingerprint: str):
    import orbax.checkpoint as ocp

    self.ocp = ocp
    self.fingerprint = fingerprint
    self.manager = ocp.CheckpointManager(
      folder.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )

  def save(self, cid: int, wave: int, step: int, state, history: History) -> None:
    ocp = self.ocp
    meta = {"wave": wave, "step": step, "fingerprint": self.fingerprint}
    if cid in self.manager.all_steps():
      # An unreadable checkpoint that a resume went back past: this save replaces it.
      self.manager.delete(cid)
    self.manager.save(
      cid,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        history=ocp.args.StandardSave(history.to_tree()),
        meta=ocp.args.JsonSave(meta),
      ),
      force=True,
    )
    self.manager.wait_until_finished()

  def restore_latest(self, abstract_state, warn) -> tuple[dict, object, History] | None:
    """(meta, state, history) of the newest intact checkpoint, or None when there is none.

    A checkpoint that fails to read (truncated, corrupt, metadata deleted) is reported in one
    line and the older kept one is tried; a checkpoint of another run is refused.
    """
    ocp = self.ocp
    self.manager.reload()
    steps = sorted(self.manager.all_steps(), reverse=True)
    for cid in steps:
      try:
        restored = self.manager.restore(
          cid,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            history=ocp.args.StandardRestore(),
            meta=ocp.args.JsonRestore(),
          ),
        )
        meta = dict(restored.meta)
      except Exception as e:  # any damage to files of an on-disk checkpoint
        reason = " ".join(str(e).split())[:160]
        warn(
          f"warning: checkpoint {cid} is unreadable ({type(e).__name__}: {reason}); "
          "trying an older one"
        )
        continue
      if meta.get("fingerprint") != self.fingerprint:
        raise CheckpointError(
          f"checkpoint {cid} belongs to another run (different prompts, seeds, config, model "
          "or head): resume with the same settings, or start over with --overwrite"
        )
      return meta, restored.state, History.from_tree(dict(restored.history))
    if steps:
      raise CheckpointError(
        f"none of the checkpoints {sorted(steps)} can be read: start over with --overwrite"
      )
    return None


# ----------------------------------------------------------------------------------------------
# Interruption.


@contextlib.contextmanager
def stop_requests():
  """Turns SIGTERM/SIGINT into a request to stop after the current step: yields {'signal'}."""
  requested: dict[str, int | None] = {"signal": None}

  def handler(signum, frame):
    del frame
    if requested["signal"] is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    requested["signal"] = signum

  previous = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    with contextlib.suppress(ValueError):  # not the main thread: no handlers
      previous[sig] = signal.signal(sig, handler)
  try:
    yield requested
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------
# The run.


def global_array(x, sharding):
  """A global jax.Array from a host value every process holds in full (single or multi-host)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def make_preview_renderer(cfg: FitConfig, head: morphable.MorphableModel):
  """jit: (params (one prompt), azimuth, elevation) -> (R, R, 3); the texture given directly."""
  settings = config_lib.raster_settings(cfg, cfg.preview_resolution)
  distance = float(np.mean(cfg.camera.distance_range))
  fov = float(np.mean(cfg.camera.fov_range))

  @jax.jit
  def render(params, azimuth, elevation):
    cam = camera_lib.orbit_camera(azimuth, elevation, distance, fov)
    # Key light from the camera's upper left: a head-on light flattens the face.
    key_light = cam.world_to_view[:3, :3].T @ jnp.array([-0.45, 0.5, 1.0])
    light = camera_lib.default_light(
      direction=key_light, ambient=cfg.light.ambient, diffuse=cfg.light.diffuse
    )
    view = fit_step.View(camera=cam, light=light, azimuth=azimuth, elevation=elevation)
    params = dict(params)
    if "texture" in params:
      texture = jnp.clip(params.pop("texture"), 1e-4, 1 - 1e-4)
      params["texture_logits"] = jnp.log(texture / (1.0 - texture))
    return fit_step.render_view(cfg, head, params, view, settings)[0]

  return render


def check_finite_params(tree, what: str) -> None:
  """Refuses model weights with NaN or inf (every step would be skipped)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in flat:
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating) and not bool(
      jnp.all(jnp.isfinite(leaf))
    ):
      name = "/".join(str(getattr(p, "key", p)) for p in path)
      raise CheckpointError(f"{what}: weight {name} contains NaN or inf; the checkpoint is corrupt")


def check_sd_resolution(cfg: FitConfig, sd) -> None:
  """The UNet halves the latents (levels − 1) times: sd_resolution must allow that."""
  levels = len(sd.configs["unet"].get("block_out_channels", [0]))
  multiple = 8 * 2 ** max(levels - 1, 0)
  if cfg.sd_resolution % multiple:
    raise ConfigError(
      f"sd_resolution={cfg.sd_resolution} does not suit this UNet ({levels} levels): it must "
      f"be a multiple of {multiple}, e.g. {multiple * max(1, round(cfg.sd_resolution / multiple))}"
    )


def _write_json(path: Path, data) -> None:
  with export.atomic_write(path, "w") as f:
    json.dump(data, f, indent=2, allow_nan=False)


def _metric_row(step: int, metrics: dict, i: int) -> str:
  """One JSON line; non-finite numbers become null so the file stays valid JSON Lines."""
  row = {"step": step}
  for k, v in metrics.items():
    value = v[i].item() if hasattr(v[i], "item") else v[i]
    if isinstance(value, float) and not math.isfinite(value):
      value = None
    row[k] = value
  return json.dumps(row, allow_nan=False)


def _read_metrics(path: Path, up_to: int) -> list[str]:
  """The valid lines of a metrics file up to step `up_to` (a kill can leave half a line)."""
  lines = []
  if path.exists():
    for line in path.read_text(errors="replace").splitlines():
      try:
        if json.loads(line)["step"] <= up_to:
          lines.append(line)
      except (ValueError, KeyError, TypeError):
        continue
  return lines


def create_checkpoints_folder(out: Path, spec: dict) -> None:
  """--out/checkpoints, made with its run spec inside in one rename: a run killed at any moment
  leaves either no checkpoints/ or one that names its run (never a folder --resume and
  --overwrite would both refuse as someone else's)."""
  staging = out / f".{CHECKPOINTS}.new"
  shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while making it
  staging.mkdir()
  _write_json(staging / RUN_SPEC, spec)
  os.rename(staging, out / CHECKPOINTS)


def remove_previous_run(out: Path) -> None:
  """--overwrite: removes exactly what an earlier run wrote (listed in its run.json)."""
  from sdsjax import gallery

  shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
  try:
    previous = json.loads((out / RUN_JSON).read_text())
  except (OSError, ValueError):
    previous = {}
  folders = [p.get("folder") for p in previous.get("prompts", []) if isinstance(p, dict)]
  for name in folders:
    if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
      continue
    folder = out / name
    if folder.is_symlink() or not folder.is_dir():
      continue  # a link leads out of --out: nothing there is the run's
    for file in (*PROMPT_FILES, gallery.PAGE_NAME):
      with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        (folder / file).unlink()
    with contextlib.suppress(OSError):
      folder.rmdir()  # only if nothing of the user's is left in it
  for name in previous.get("outputs", []):
    if isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
      path = out / name
      if not path.is_dir():  # folders are the prompts' (above): never removed wholesale
        with contextlib.suppress(FileNotFoundError):
          path.unlink()
  with contextlib.suppress(FileNotFoundError):
    (out / RUN_JSON).unlink()


def fit(
  cfg: FitConfig,
  prompts: list[str],
  out: Path,
  resume: bool = False,
  overwrite: bool = False,
  progress: bool = True,
  log=None,
  program_cache: Path | None = None,
) -> int:
  from jax.experimental import multihost_utils

  from sdsjax.models.stable_diffusion import load_stable_diffusion

  log = log or (lambda message: print(message, file=sys.stderr))
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  is_writer = jax.process_index() == 0
  say = log if is_writer else (lambda message: None)

  # Everything that can fail on user input is checked before --out is touched.
  seeds = [cfg.seed + i for i in range(len(prompts))]
  if seeds[-1] > 2**32 - 1:
    raise ConfigError(
      f"seed={cfg.seed} with {len(prompts)} prompts needs seeds up to {seeds[-1]}, beyond "
      f"{2**32 - 1}: lower the seed"
    )
  head = morphable.load_model(cfg.head, cfg.num_components, cfg.num_expressions)
  fit_step.check_head(cfg, head)
  cfg = fit_step.resolve_closeup_target(cfg, head.mean)
  sd = load_stable_diffusion(
    cfg.model, dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
  )
  check_sd_resolution(cfg, sd)
  for part in ("unet", "vae", "text_encoder"):
    check_finite_params(sd.params[part], f"{sd.folder}/{part}")
  fingerprint = run_fingerprint(prompts, seeds, cfg, head, sd.folder)
  spec_path = out / CHECKPOINTS / RUN_SPEC
  if resume:
    spec = json.loads(spec_path.read_text())
    if spec.get("fingerprint") != fingerprint:
      raise CheckpointError(
        f"--resume: {out} holds a run with another fingerprint (its model, head or files "
        "changed since): start over with --overwrite"
      )
  # Warnings (long prompts) only once nothing is left to refuse.
  embeddings = embedding_table(sd, prompts, cfg, warn=say)
  timings["load_s"] = time.perf_counter() - t0
  if jax.process_count() > 1:
    # Every process has checked its inputs before any process writes.
    multihost_utils.sync_global_devices("sdsjax: inputs checked")

  # Waves.
  mesh = fit_step.prompt_mesh()
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("prompts"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # The weights are frozen: what can be computed from them once (CPU Winograd kernel
  # transforms) is, rather than inside every step.
  prepared = sd.prepare_params(sd.params, cfg.sd_resolution)
  frozen = fit_step.Frozen(
    vae_params=prepared["vae"],
    unet_params=prepared["unet"],
    alphas_cumprod=jnp.asarray(sd.alphas_cumprod, jnp.float32),
  )
  del prepared
  frozen = jax.tree.map(lambda x: global_array(x, replicated), frozen)
  step_fn = fit_step.make_batched_step(
    fit_step.make_fit_step(cfg, head, sd.encode_image, sd.predict_noise), mesh
  )
  init = fit_step.init_state(cfg, head)
  # What the step's trace depends on besides its arguments' shapes (the seed enters as keys);
  # hashed only when there is a program cache to look in.
  program_identity = None
  if program_cache is not None:
    program_identity = {
      "config": {**config_lib.to_dict(cfg), "seed": None},
      "head": program_cache_lib.array_digest(head),
      "model": model_configs(sd.folder),
    }

  def wave_inputs(indices):
    keys = global_array(np.asarray(fit_step.prompt_keys([seeds[i] for i in indices])), split)
    emb = global_array(embeddings[indices], split)
    host_state = fit_step.batch_states([init] * len(indices))
    state = jax.tree.map(lambda x: global_array(x, split), host_state)
    return state, keys, emb

  def compile_at(per_device: int):
    state, keys, emb = wave_inputs([0] * (per_device * mesh.size))
    args = (state, keys, emb, frozen)
    return program_cache_lib.compile_step(step_fn, args, program_identity, program_cache)

  def run_at(per_device: int, program) -> int:
    """One step on scratch inputs; the process's peak resident bytes after it."""
    state, keys, emb = wave_inputs([0] * (per_device * mesh.size))
    jax.block_until_ready(program(state, keys, emb, frozen))
    return process_rss("VmHWM")

  t_compile = time.perf_counter()
  if cfg.prompts_per_device == "auto":
    per_device, reason, compiled_sizes, estimate = auto_prompts_per_device(
      compile_at, len(prompts), mesh.size, run_at=run_at
    )
    timings["memory_estimate"] = estimate
    if jax.process_count() > 1:  # every host must run the same program
      per_device = int(np.min(multihost_utils.process_allgather(np.int32(per_device))))
    say(reason)
  else:
    per_device, compiled_sizes = int(cfg.prompts_per_device), {}
  wave_size = per_device * mesh.size
  compiled = compiled_sizes.get(per_device) or compile_at(per_device)
  timings["compile_s"] = time.perf_counter() - t_compile
  timings["peak_rss_after_compile_bytes"] = process_rss("VmHWM")
  waves = plan_waves(len(prompts), wave_size)
  slugs = slugify(prompts)
  checkpoints, restored = None, None
  if resume:
    # Read (and refused, for another run's or unreadable checkpoints) before anything is written.
    checkpoints = Checkpoints(out / CHECKPOINTS, fingerprint)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      wave_inputs(waves[0])[0],
    )
    restored = checkpoints.restore_latest(abstract, say)

  # Outputs: nothing was written before this line.
  run_path = out / RUN_JSON
  if overwrite and is_writer and out.exists():
    remove_previous_run(out)
  if is_writer:
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
      spec = {"prompts": prompts, "config": config_lib.to_dict(cfg), "fingerprint": fingerprint}
      create_checkpoints_folder(out, spec)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sdsjax: out prepared")
  previous = {}
  if resume and run_path.exists():
    with contextlib.suppress(OSError, ValueError):
      previous = {p["index"]: p for p in json.loads(run_path.read_text()).get("prompts", [])}
  entries = [
    {
      "index": i,
      "prompt": prompts[i],
      "slug": slugs[i],
      "seed": seeds[i],
      "wave": w,
      "status": previous.get(i, {}).get("status", "pending"),
      "folder": slugs[i],
    }
    for w, wave in enumerate(waves)
    for i in sorted(set(wave))
  ]
  outputs: set[str] = set()

  def run_info(extra=None) -> dict:
    return {
      "version": RUN_FORMAT,
      "prompts": entries,
      "config": config_lib.to_dict(cfg),
      "fingerprint": fingerprint,
      "waves": len(waves),
      "prompts_per_device": per_device,
      "timings": timings,
      "devices": [str(d) for d in jax.devices()],
      "process_count": jax.process_count(),
      "jax_version": jax.__version__,
      "outputs": sorted(outputs),
      **(extra or {}),
    }

  def write_run_info(extra=None) -> None:
    if is_writer:
      _write_json(run_path, run_info(extra))

  def write_gallery() -> None:
    if not is_writer:
      return
    from sdsjax import gallery

    write_run_info(extra_info)  # the gallery reads the statuses from run.json
    before = set(os.listdir(out))
    gallery.write_gallery(out)
    outputs.update(set(os.listdir(out)) - before - {RUN_JSON})
    write_run_info(extra_info)

  write_run_info()
  if checkpoints is None:
    checkpoints = Checkpoints(out / CHECKPOINTS, fingerprint)

  def host(tree):
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

  render = make_preview_renderer(cfg, head)
  total = len(waves) * cfg.steps
  done_before = sum(cfg.steps for w, wave in enumerate(waves) if _wave_done(entries, w))
  bar = tqdm(
    total=total,
    initial=done_before,
    disable=not (progress and is_writer),
    desc=f"fitting {len(prompts)} prompt{'s' * (len(prompts) > 1)}",
    unit="step",
    dynamic_ncols=True,
  )
  extra_info = {"resumed_from": None}
  t_fit, ran, step_time = time.perf_counter(), 0, 0.0
  with stop_requests() as stop:
    for w, wave in enumerate(waves):
      if _wave_done(entries, w):
        continue
      members = sorted(set(wave))
      state, keys, emb = wave_inputs(wave)
      start, history = 0, History()
      if restored is not None and restored[0]["wave"] == w:
        meta, state, history = restored
        start = int(meta["step"])
        extra_info["resumed_from"] = {"wave": w, "step": start}
        say(f"resuming wave {w + 1}/{len(waves)} at step {start}")
      elif restored is not None:
        # The checkpoint is of another wave (run.json was lost or is older): this wave starts
        # afresh, which gives the same result, only later.
        say(f"warning: the checkpoint is of wave {restored[0]['wave'] + 1}; wave {w + 1} restarts")
      restored = None
      if start == 0:
        history.add(0, host(state.params))
      bar.set_description(f"wave {w + 1}/{len(waves)}")
      metric_files = {}
      if is_writer:
        for i in members:
          path = out / slugs[i] / "metrics.jsonl"
          path.parent.mkdir(parents=True, exist_ok=True)
          # Lines past the checkpoint go, so a resumed log reads like an uninterrupted one.
          path.write_text("".join(line + "\n" for line in _read_metrics(path, start)))
          metric_files[i] = path.open("a")
      try:
        for step in range(start, cfg.steps):
          t_step = time.perf_counter()
          state, metrics = compiled(state, keys, emb, frozen)
          done = step + 1
          ran += 1
          m = host(metrics)
          step_time += time.perf_counter() - t_step
          positions = {i: wave.index(i) for i in members}
          for i, f in metric_files.items():
            f.write(_metric_row(done, m, positions[i]) + "\n")
          bar.set_postfix(
            loss=f"{float(np.mean(m['loss'][: len(members)])):.4g}",
            skipped=int(np.sum(m["skipped"][: len(members)])),
            refresh=False,
          )
          bar.update(1)
          if done % cfg.evolution_every == 0 or done == cfg.steps:
            history.add(done, host(state.params))
          _check_health(m, cfg, done, w, [prompts[i] for i in wave])
          stop_now = stop["signal"] is not None
          if jax.process_count() > 1:  # every process stops at the same step
            stop_now = bool(np.any(multihost_utils.process_allgather(np.bool_(stop_now))))
          if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop_now:
            for f in metric_files.values():
              f.flush()
            checkpoints.save(checkpoint_id(w, done, cfg.steps), w, done, state, history)
          if stop_now and done < cfg.steps:
            code = 130 if stop["signal"] == signal.SIGINT else 143
            name = "SIGINT" if code == 130 else "SIGTERM"
            raise Interrupted(
              code,
              f"{name}: stopped at step {done} of wave {w + 1}/{len(waves)} and checkpointed; "
              f"continue with: python -m sdsjax.fit --out {out} --resume",
            )
      finally:
        for f in metric_files.values():
          f.close()
      # The wave is done: its prompts' results.
      timings["peak_rss_after_steps_bytes"] = process_rss("VmHWM")
      final = host(state)
      if is_writer:
        t_export = time.perf_counter()
        for i in members:
          export_prompt(out / slugs[i], cfg, head, render, final, history, wave.index(i))
          entries[i]["status"] = "done"
          outputs.add(slugs[i])
        timings["export_s"] = timings.get("export_s", 0.0) + time.perf_counter() - t_export
      timings["fit_s"] = time.perf_counter() - t_fit
      timings["step_s"] = step_time
      timings["steps_per_s"] = ran / step_time if ran else 0.0
      timings["prompt_steps_per_s"] = ran * wave_size / step_time if ran else 0.0
      write_gallery()
      if stop["signal"] is not None and w + 1 < len(waves):
        code = 130 if stop["signal"] == signal.SIGINT else 143
        raise Interrupted(
          code,
          f"stopped after wave {w + 1}/{len(waves)}; continue with: "
          f"python -m sdsjax.fit --out {out} --resume",
        )
  bar.close()
  timings["peak_rss_bytes"] = process_rss("VmHWM")
  write_run_info(extra_info)
  return 0


def _wave_done(entries: list[dict], wave: int) -> bool:
  members = [e for e in entries if e["wave"] == wave]
  return bool(members) and all(e["status"] == "done" for e in members)


def _check_health(m: dict, cfg: FitConfig, step: int, wave: int, wave_prompts) -> None:
  """Stops a run that only skips steps, or whose weights left every plausible range."""
  bad = np.asarray(m["bad_in_a_row"])
  if bad.max() >= cfg.max_bad_steps:
    i = int(np.argmax(bad))
    raise FitError(
      f"step {step}: {int(bad[i])} steps in a row had a non-finite gradient for prompt "
      f"{_short(wave_prompts[i])}; nothing is being learned (lower guidance_scale or lr, or "
      "check the model weights, and run again with --overwrite)"
    )
  biggest = np.asarray(m["max_abs_weight"])
  if not np.all(np.isfinite(biggest)) or biggest.max() > cfg.max_weight:
    i = int(np.argmax(np.nan_to_num(biggest, nan=np.inf)))
    raise FitError(
      f"step {step}: a weight of prompt {_short(wave_prompts[i])} reached {biggest[i]:.3g}σ, "
      f"beyond max_weight={cfg.max_weight:g}: the fit diverged (lower lr or raise "
      "prior.identity, and run again with --overwrite)"
    )


def _short(prompt: str, length: int = 60) -> str:
  """A prompt for a one-line message: quoted, and cut when long."""
  return repr(prompt) if len(prompt) <= length else repr(prompt[:length]) + "..."


def export_prompt(folder: Path, cfg: FitConfig, head, render, final, history: History, i: int):
  """Writes one prompt's params, meshes, turntable and evolution GIF."""
  params = {k: np.asarray(v[i]) for k, v in final.params.items()}
  arrays = {"weights": params["weights"].astype(np.float32), "names": np.array(head.names)}
  preview = {"weights": params["weights"]}
  if "expression" in params:
    arrays["expression"] = params["expression"].astype(np.float32)
    arrays["expression_names"] = np.array(head.expression_names)
    preview["expression"] = params["expression"]
  if "pose" in params:
    arrays["pose"] = np.asarray(fit_step.full_pose(cfg, head, params), np.float32)
    arrays["joint_names"] = np.array(head.skeleton.joint_names)
    preview["pose"] = params["pose"]
  texture = None
  if "texture_logits" in params:
    texture = (1.0 / (1.0 + np.exp(-params["texture_logits"]))).astype(np.float32)
    arrays["texture"] = texture
    preview["texture"] = texture
  with export.atomic_write(folder / "params.npz") as f:
    np.savez(f, **arrays)
  verts = np.asarray(
    fit_step.head_vertices(cfg, head, {k: jnp.asarray(v) for k, v in params.items()})
  )
  export.write_obj(folder / "head.obj", verts, head.faces, head.uvs, head.uv_faces, texture)
  export.write_glb(folder / "head.glb", verts, head.faces, head.uvs, head.uv_faces, texture)
  if head.source in ("flame", "ict", "npz"):
    # The same mesh in the model's own units and frame, so fitted parameters drop into its tools.
    export.write_obj(
      folder / f"head_{head.source}_units.obj", head.to_source_units(verts), head.faces
    )
  preview = {k: jnp.asarray(v) for k, v in preview.items()}
  views = [render(preview, jnp.float32(a), jnp.float32(0.0)) for a in PREVIEW_AZIMUTHS]
  export.write_png(folder / "turntable.png", export.image_grid(np.stack(views), columns=4))
  frames = []
  for frame in history.frames:
    p = {k: jnp.asarray(v[i]) for k, v in frame.items() if k != "texture"}
    if "texture" in frame:
      p["texture"] = jnp.asarray(frame["texture"][i] / 255.0, jnp.float32)
    frames.append(np.asarray(render(p, *map(jnp.float32, EVOLUTION_VIEW))))
  export.write_gif(folder / "evolution.gif", np.stack(frames))
