"""`python -m sdsjax.fit`: outputs, bad input, kill-and-resume."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from sdsjax import fit
from sdsjax import fit_run

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def run_cli(*argv):
  return fit.main([*map(str, argv), "--no-progress"])


def test_two_prompts_write_every_output(tmp_path):
  out = tmp_path / "out"
  assert (
    run_cli(
      "--prompt",
      "an old man",
      "--prompt",
      "a young woman",
      "--model",
      "tiny-random",
      "--steps",
      20,
      "--out",
      out,
      "--config",
      TINY,
    )
    == 0
  )
  run = json.loads((out / "run.json").read_text())
  assert run["prompts"] == ["an old man", "a young woman"]
  assert run["slugs"] == ["an-old-man", "a-young-woman"]
  assert run["config"]["steps"] == 20 and run["timings"]["steps_per_s"] > 0
  for slug in run["slugs"]:
    folder = out / slug
    with np.load(folder / "params.npz") as params:
      assert params["weights"].shape == (50,)
      assert np.all(np.isfinite(params["weights"])) and np.abs(params["weights"]).max() > 0
    obj = trimesh.load(folder / "head.obj", force="mesh", process=False)
    glb = trimesh.load(folder / "head.glb", force="mesh")
    assert len(obj.faces) == len(glb.faces) > 1000
    turntable = np.asarray(Image.open(folder / "turntable.png").convert("RGB"))
    assert turntable.shape[0] * 2 == turntable.shape[1]  # 2 rows of 4 views
    assert turntable.std() > 5  # not a blank image
    gif = Image.open(folder / "evolution.gif")
    assert gif.n_frames == 1 + 20 // 5
    rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(np.isfinite(r["loss"]) for r in rows)
  # The two prompts were fitted independently.
  a = np.load(out / "an-old-man" / "params.npz")["weights"]
  b = np.load(out / "a-young-woman" / "params.npz")["weights"]
  assert np.abs(a - b).max() > 1e-4


def test_texture_mode_writes_textured_mesh(tmp_path):
  out = tmp_path / "tex"
  assert (
    run_cli(
      "--prompt",
      "a painted face",
      "--model",
      "tiny-random",
      "--steps",
      4,
      "--texture",
      "texture_resolution=32",
      "--out",
      out,
      "--config",
      TINY,
    )
    == 0
  )
  folder = out / "a-painted-face"
  with np.load(folder / "params.npz") as params:
    assert params["texture"].shape == (32, 32, 3)
    assert params["texture"].min() >= 0.0 and params["texture"].max() <= 1.0
  assert (folder / "texture.png").exists()
  assert "map_Kd texture.png" in (folder / "head.mtl").read_text()
  mesh = trimesh.load(folder / "head.glb", force="mesh")
  assert mesh.visual.uv is not None


@pytest.mark.parametrize(
  "argv, words",
  [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "   "], "empty prompt"),
    ([], "no prompt given"),
    (["--prompt", "x", "guidanse_scale=3"], "unknown config key 'guidanse_scale'"),
    (["--prompt", "x", "--sd-resolution", "500"], "multiple of 8"),
    (["--prompt", "x", "render_resolution=100"], "multiple of 8"),
    (["--prompt", "x", "--model", "/nonexistent/sd-folder"], "/nonexistent/sd-folder"),
    (["--prompt", "x", "--head", "/nonexistent/head.npz"], "/nonexistent/head.npz"),
    (["--prompt", "x", "--config", "/nonexistent/cfg.yaml"], "config file not found"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "cannot read --prompts-file"),
  ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, words):
  out = tmp_path / "out"
  code = (
    run_cli(*argv, "--out", out, "--config", TINY)
    if "--config" not in argv
    else run_cli(*argv, "--out", out)
  )
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert words in err, err
  assert len(err.splitlines()) == 1 and "Traceback" not in err
  assert not out.exists()


def test_unwritable_out_is_refused(tmp_path, capsys):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a folder")
  assert run_cli("--prompt", "x", "--out", blocker / "out", "--config", TINY) == 2
  assert "not writable" in capsys.readouterr().err
  assert run_cli("--prompt", "x", "--out", blocker, "--config", TINY) == 2
  assert "not a folder" in capsys.readouterr().err
  assert blocker.read_text() == "not a folder"


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


class Interrupt(Exception):
  pass


def test_kill_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
  args = [
    "--prompt",
    "a bald pirate",
    "--prompt",
    "a child",
    "--model",
    "tiny-random",
    "--steps",
    20,
    "--config",
    TINY,
    "checkpoint_every=5",
    "num_components=12",
  ]
  assert run_cli(*args, "--out", tmp_path / "whole") == 0

  # Kill the second run at step 13: the last checkpoint is at step 10.
  real = fit_run.fit_step.make_batched_step

  def dying_batched_step(*a, **k):
    jitted = real(*a, **k)

    class Lowered:
      def __init__(self, lowered):
        self.lowered = lowered

      def compile(self):
        compiled = self.lowered.compile()
        calls = {"n": 0}

        def run(*xs):
          calls["n"] += 1
          if calls["n"] == 13:
            raise Interrupt
          return compiled(*xs)

        return run

    class Wrapped:
      def lower(self, *xs):
        return Lowered(jitted.lower(*xs))

    return Wrapped()

  monkeypatch.setattr(fit_run.fit_step, "make_batched_step", dying_batched_step)
  with pytest.raises(Interrupt):
    run_cli(*args, "--out", tmp_path / "killed")
  monkeypatch.setattr(fit_run.fit_step, "make_batched_step", real)
  assert not (tmp_path / "killed" / "run.json").exists()
  # Without --resume the half-done run is protected.
  assert run_cli(*args, "--out", tmp_path / "killed") == 2
  assert run_cli("--out", tmp_path / "killed", "--resume") == 0

  resumed = json.loads((tmp_path / "killed" / "run.json").read_text())
  assert resumed["resumed_from_step"] == 10
  for slug in ("a-bald-pirate", "a-child"):
    whole = np.load(tmp_path / "whole" / slug / "params.npz")["weights"]
    again = np.load(tmp_path / "killed" / slug / "params.npz")["weights"]
    np.testing.assert_allclose(again, whole, rtol=1e-5, atol=1e-6)
    log_whole = (tmp_path / "whole" / slug / "metrics.jsonl").read_text().splitlines()
    log_again = (tmp_path / "killed" / slug / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in log_again] == list(range(1, 21))
    np.testing.assert_allclose(
      [json.loads(l)["loss"] for l in log_again],
      [json.loads(l)["loss"] for l in log_whole],
      rtol=1e-4,
    )
    assert (
      Image.open(tmp_path / "killed" / slug / "evolution.gif").n_frames
      == Image.open(tmp_path / "whole" / slug / "evolution.gif").n_frames
    )
