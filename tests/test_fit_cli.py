"""`python -m sdsjax.fit`: outputs, waves, interruption and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from sdsjax import fit
from sdsjax import fit_run

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
# A small, quick run shared by the interruption tests. Its options make one compiled program
# (`steps` and the batch are part of it), shared through the compile cache by every run that
# uses them, in-process or not (test_two_prompts and tests/test_fit_multihost.py too).
OPTIONS = [
  "--model",
  "tiny-random",
  "--config",
  TINY,
  "--steps",
  "24",
  "checkpoint_every=4",
  "num_components=12",
  "preview_resolution=32",
  "prompts_per_device=2",  # fixed: no automatic sizing (tests/test_probes.py covers it)
]
RUN = ["--prompt", "a bald pirate", "--prompt", "a child", *OPTIONS]
# Eight prompts a wave, at the smallest sizes: the program of tests/test_probes.py's FINISHED.
WAVE_OPTIONS = ["--model", "tiny-random", "--config", TINY, "--steps", "2", "num_components=6"]
WAVE_OPTIONS += ["preview_resolution=16", "prompts_per_device=8"]


def run_cli(*argv):
  return fit.main([*map(str, argv), "--no-progress"])


def weights(out, slug):
  with np.load(Path(out) / slug / "params.npz") as params:
    return params["weights"]


def assert_same_run(a, b, slugs=("a-bald-pirate", "a-child")):
  for slug in slugs:
    np.testing.assert_allclose(weights(b, slug), weights(a, slug), rtol=1e-5, atol=1e-6)
    rows_a = [json.loads(l) for l in (Path(a) / slug / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (Path(b) / slug / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
    np.testing.assert_allclose([r["loss"] for r in rows_b], [r["loss"] for r in rows_a], rtol=1e-4)
    frames = lambda out: Image.open(Path(out) / slug / "evolution.gif").n_frames
    assert frames(b) == frames(a)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
  """The uninterrupted run the interrupted ones must equal."""
  out = tmp_path_factory.mktemp("whole") / "out"
  assert run_cli(*RUN, "--out", out) == 0
  return out


def test_two_prompts_write_every_output(tmp_path):
  out = tmp_path / "out"
  argv = ["--prompt", "an old man", "--prompt", "a young woman", *OPTIONS, "evolution_every=5"]
  assert run_cli(*argv, "--out", out) == 0
  run = json.loads((out / "run.json").read_text())
  assert run["version"] == 2
  assert [p["prompt"] for p in run["prompts"]] == ["an old man", "a young woman"]
  assert [p["slug"] for p in run["prompts"]] == ["an-old-man", "a-young-woman"]
  assert [p["status"] for p in run["prompts"]] == ["done", "done"]
  assert [p["seed"] for p in run["prompts"]] == [0, 1]
  assert run["config"]["steps"] == 24 and run["timings"]["steps_per_s"] > 0
  assert (out / "index.html").is_file()
  for entry in run["prompts"]:
    folder = out / entry["folder"]
    with np.load(folder / "params.npz") as params:
      assert params["weights"].shape == (12,)
      assert np.all(np.isfinite(params["weights"])) and np.abs(params["weights"]).max() > 0
      assert list(params["names"][:2]) == ["head_width", "head_height"]
    obj = trimesh.load(folder / "head.obj", force="mesh", process=False)
    glb = trimesh.load(folder / "head.glb", force="mesh")
    assert len(obj.faces) == len(glb.faces) > 1000
    turntable = np.asarray(Image.open(folder / "turntable.png").convert("RGB"))
    assert turntable.shape[0] * 2 == turntable.shape[1]  # 2 rows of 4 views
    assert turntable.std() > 5  # not a blank image
    assert Image.open(folder / "evolution.gif").n_frames == 1 + 24 // 5 + 1  # + the last step
    rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["skipped"] == 0 and r["finite"] for r in rows)
    assert (folder / "index.html").is_file()  # the gallery's prompt page
  # The two prompts were fitted independently.
  assert np.abs(weights(out, "an-old-man") - weights(out, "a-young-woman")).max() > 1e-4


def test_texture_mode_writes_textured_mesh(tmp_path):
  out = tmp_path / "tex"
  argv = ["--prompt", "a painted face", "--model", "tiny-random", "--steps", 4, "--texture"]
  assert run_cli(*argv, "texture_resolution=32", "--out", out, "--config", TINY) == 0
  folder = out / "a-painted-face"
  with np.load(folder / "params.npz") as params:
    assert params["texture"].shape == (32, 32, 3)
    assert params["texture"].min() >= 0.0 and params["texture"].max() <= 1.0
  assert (folder / "texture.png").exists()
  assert "map_Kd texture.png" in (folder / "head.mtl").read_text()
  mesh = trimesh.load(folder / "head.glb", force="mesh")
  assert mesh.visual.uv is not None


def test_cli_process_exit_code_and_message(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "sdsjax.fit", "--prompt", "", "--out", str(tmp_path / "o")],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: empty prompt")
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "o").exists()


def test_print_config_lists_every_key():
  proc = subprocess.run(
    [sys.executable, "-m", "sdsjax.fit", "--print-config", "--config", TINY, "prior.identity=0.3"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert "model: tiny-random" in proc.stdout and "identity: 0.3" in proc.stdout
  assert "raster:" in proc.stdout and "sigma:" in proc.stdout


class Interrupt(Exception):
  pass


def dying_at_call(n: int, compile_step, on_compile=None):
  """A `program_cache.compile_step` whose program raises Interrupt at its n-th call (a kill);
  `on_compile(args)` sees each compilation. It wraps the program the run really uses (saved or
  traced), so the killed run shares its compiled program with the others."""

  def compile(step_fn, args, *rest):
    if on_compile:
      on_compile(args)
    program = compile_step(step_fn, args, *rest)
    calls = {"n": 0}

    def run(*xs):
      calls["n"] += 1
      if calls["n"] == n:
        raise Interrupt
      return program(*xs)

    return run

  return compile


def test_kill_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch, whole):
  # Kill the second run at step 13: the last checkpoint is at step 12.
  real = fit_run.program_cache_lib.compile_step
  monkeypatch.setattr(fit_run.program_cache_lib, "compile_step", dying_at_call(13, real))
  with pytest.raises(Interrupt):
    run_cli(*RUN, "--out", tmp_path / "killed")
  monkeypatch.setattr(fit_run.program_cache_lib, "compile_step", real)
  run = json.loads((tmp_path / "killed" / "run.json").read_text())
  assert all(p["status"] == "pending" for p in run["prompts"])
  # Without --resume the half-done run is protected.
  assert run_cli(*RUN, "--out", tmp_path / "killed") == 2
  # The same command plus --resume, as the interrupt message says (its config and overrides
  # are the run's own, so they must compare equal to the stored ones).
  assert run_cli(*RUN, "--out", tmp_path / "killed", "--resume") == 0
  resumed = json.loads((tmp_path / "killed" / "run.json").read_text())
  assert resumed["resumed_from"] == {"wave": 0, "step": 12}
  assert all(p["status"] == "done" for p in resumed["prompts"])
  assert_same_run(whole, tmp_path / "killed")


def test_texture_fit_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
  """The texture's Adam state lives on its pyramid levels (sdsjax.texture_pyramid): a
  checkpoint must restore it exactly."""
  argv = [*RUN[:2], "--model", "tiny-random", "--config", TINY, "--steps", 6, "--texture"]
  argv += ["texture_resolution=32", "texture_coarsest=8", "checkpoint_every=2"]
  argv += ["num_components=6", "preview_resolution=16"]
  assert run_cli(*argv, "--out", tmp_path / "whole") == 0
  real = fit_run.program_cache_lib.compile_step
  monkeypatch.setattr(fit_run.program_cache_lib, "compile_step", dying_at_call(4, real))
  with pytest.raises(Interrupt):
    run_cli(*argv, "--out", tmp_path / "killed")
  monkeypatch.setattr(fit_run.program_cache_lib, "compile_step", real)
  assert run_cli(*argv, "--out", tmp_path / "killed", "--resume") == 0
  assert json.loads((tmp_path / "killed" / "run.json").read_text())["resumed_from"]["step"] == 2
  texture = lambda run: np.load(tmp_path / run / "a-bald-pirate" / "params.npz")["texture"]
  np.testing.assert_allclose(texture("killed"), texture("whole"), rtol=1e-5, atol=1e-6)
  assert np.abs(texture("whole") - texture("whole").mean((0, 1))).max() > 0  # it moved


def _start(out, *extra, resume=False):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = ["--resume"] if resume else [*RUN, *extra]
  return subprocess.Popen(
    [sys.executable, "-m", "sdsjax.fit", *args, "--out", str(out), "--no-progress"],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for_steps(out, slug, steps, proc, timeout=600):
  path = Path(out) / slug / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
    if path.exists() and len(path.read_text().splitlines()) >= steps:
      return
    time.sleep(0.05)
  raise AssertionError("the run did not reach the step in time")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_equals_uninterrupted(tmp_path, whole, sig, code):
  out = tmp_path / "stopped"
  proc = _start(out)
  _wait_for_steps(out, "a-child", 6, proc)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == code, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert "--resume" in last and "Traceback" not in err, err[-2000:]
  stopped_at = len((out / "a-child" / "metrics.jsonl").read_text().splitlines())
  assert 6 <= stopped_at < 24
  assert run_cli("--out", out, "--resume") == 0
  resumed = json.loads((out / "run.json").read_text())
  # The signal's step was checkpointed, not only the last multiple of checkpoint_every.
  assert resumed["resumed_from"] == {"wave": 0, "step": stopped_at}
  assert_same_run(whole, out)


def test_kill_9_during_saves_then_resume_equals_uninterrupted(tmp_path, whole):
  """SIGKILL while orbax writes a checkpoint (its temporary folder exists), twice over."""
  out = tmp_path / "killed9"
  for attempt in range(2):
    proc = _start(out, "checkpoint_every=1", resume=attempt > 0)
    deadline = time.time() + 600
    ckpt = out / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
      saving = ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir())
      if (saving and attempt == 0) or (saving and time.time() > deadline - 590):
        proc.kill()
        break
      time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
      break  # the run finished before a save could be caught: still a valid outcome
    assert proc.returncode == -signal.SIGKILL, (attempt, err[-2000:])
  if not (out / "run.json").exists() or any(
    p["status"] != "done" for p in json.loads((out / "run.json").read_text())["prompts"]
  ):
    assert run_cli("--out", out, "--resume") == 0
  # checkpoint_every=1 here, 4 in the whole run: only the schedule of saves differs.
  assert_same_run(whole, out)


def test_waves_one_compilation_and_resume_in_wave_3(tmp_path, monkeypatch):
  """24 prompts, 8 per device: 3 waves through one compiled step; a kill in wave 3 resumes."""
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("".join(f"a head number {i}\n" for i in range(24)))
  # The program of tests/test_probes.py's FINISHED run (from the compile cache).
  argv = ["--prompts-file", prompts, *WAVE_OPTIONS, "checkpoint_every=1"]
  lowered = []
  real = fit_run.program_cache_lib.compile_step
  # Counts the compilations (one program for all waves); "dies" at a call no run reaches.
  counting = dying_at_call(10**9, real, on_compile=lambda xs: lowered.append(xs[1].shape))

  monkeypatch.setattr(fit_run.program_cache_lib, "compile_step", counting)
  assert run_cli(*argv, "--out", tmp_path / "whole") == 0
  assert len(lowered) == 1 and lowered[0][0] == 8  # one program for all 3 waves
  run = json.loads((tmp_path / "whole" / "run.json").read_text())
  assert run["waves"] == 3 and run["prompts_per_device"] == 8
  assert [p["wave"] for p in run["prompts"]] == [i // 8 for i in range(24)]
  for entry in run["prompts"]:
    assert (
      entry["status"] == "done" and (tmp_path / "whole" / entry["folder"] / "head.glb").exists()
    )
  assert (tmp_path / "whole" / "index.html").exists()

  # Killed in wave 3 (after 2 waves × 2 steps and 1 more step).
  dying = dying_at_call(6, real, on_compile=lambda xs: lowered.append(xs[1].shape))
  monkeypatch.setattr(fit_run.program_cache_lib, "compile_step", dying)
  with pytest.raises(Interrupt):
    run_cli(*argv, "--out", tmp_path / "killed")
  monkeypatch.setattr(fit_run.program_cache_lib, "compile_step", counting)
  half = json.loads((tmp_path / "killed" / "run.json").read_text())
  assert [p["status"] for p in half["prompts"]] == ["done"] * 16 + ["pending"] * 8
  assert run_cli("--out", tmp_path / "killed", "--resume") == 0
  resumed = json.loads((tmp_path / "killed" / "run.json").read_text())
  assert resumed["resumed_from"] == {"wave": 2, "step": 1}
  for i in range(24):
    slug = f"a-head-number-{i}"
    np.testing.assert_allclose(
      weights(tmp_path / "killed", slug), weights(tmp_path / "whole", slug), rtol=1e-5, atol=1e-6
    )


def test_a_prompts_result_does_not_depend_on_its_wave_or_position(tmp_path):
  """Same program (wave size 8), the prompt lands in another wave and slot: same weights."""
  first = tmp_path / "a.txt"
  first.write_text("".join(f"p{i}\n" for i in range(9)))  # p8 is wave 1, slot 0 (seed 8)
  argv = WAVE_OPTIONS
  assert run_cli("--prompts-file", first, *argv, "--out", tmp_path / "a") == 0
  second = tmp_path / "b.txt"
  second.write_text("q0\np8\n")  # the same text now in wave 0, slot 1: seed 1, so pin it
  assert run_cli("--prompts-file", second, *argv, "seed=7", "--out", tmp_path / "b") == 0
  np.testing.assert_array_equal(weights(tmp_path / "a", "p8"), weights(tmp_path / "b", "p8"))


def test_slugs_are_unique_for_any_prompt_list():
  slugs = fit_run.slugify(["x", "x", "x 2", "X!", "", "x-2"])
  assert len(set(slugs)) == len(slugs)
  assert slugs[:3] == ["x", "x-2", "x-2-2"] or len(set(slugs[:3])) == 3


def test_long_prompts_keep_their_view_suffix():
  from sdsjax.models.stable_diffusion import load_stable_diffusion

  sd = load_stable_diffusion("tiny-random")
  long = " ".join(["a very old bearded man with a hat"] * 20)
  kept = fit_run.fit_to_tokens(sd.tokenizer, long, sd.text_length, True)
  assert kept != long and long.startswith(kept[:20])
  for suffix in ("front view", "back view", "overhead view"):
    ids = sd.tokenizer(f"{kept}, {suffix}")["input_ids"]
    assert len(ids) <= sd.text_length
  short = "an old man"
  assert fit_run.fit_to_tokens(sd.tokenizer, short, sd.text_length, True) == short


def test_metrics_lines_are_valid_json_with_non_finite_values():
  metrics = {"loss": np.array([np.nan, 1.0]), "grad_norm": np.array([np.inf, 2.0])}
  line = fit_run._metric_row(3, metrics, 0)
  assert json.loads(line) == {"step": 3, "loss": None, "grad_norm": None}


def test_expression_config_writes_identity_and_expression(tmp_path):
  """Issue 14's command: identity and expression weights, meshes that load in trimesh."""
  out = tmp_path / "laugh"
  config = ROOT / "configs" / "expression.yaml"
  argv = ["--config", config, "--prompt", "a laughing old man", "--model", "tiny-random"]
  assert (
    run_cli(*argv, "--steps", 20, "--out", out, "render_resolution=32", "sd_resolution=64") == 0
  )
  folder = out / "a-laughing-old-man"
  with np.load(folder / "params.npz") as params:
    assert params["weights"].shape == (50,)
    assert params["expression"].shape == (14,) and np.abs(params["expression"]).max() > 0
    assert "jaw_open" in list(params["expression_names"])
  for name in ("head.obj", "head.glb"):
    mesh = trimesh.load(folder / name, force="mesh", process=False)
    assert len(mesh.faces) > 1000 and np.isfinite(mesh.vertices).all()
