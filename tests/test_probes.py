"""Reliability probes of `python -m sdsjax.fit`: what a new user or an attacker can get wrong.

Every refusal is asserted the same way (`refused`): exit code 2, exactly one line on stderr that
starts with "error:" and names the problem, no traceback, and the --out folder untouched (absent,
or byte-for-byte as before). Most cases fail before any JAX work and run in-process; the few that
need a finished run share one (`finished`); a handful run as real processes (argv bytes, a
cluster that is not there, a hostile pickle). See also tests/test_fit_cli.py (signals, kill -9,
waves, resume equality) and tests/test_config.py (config parsing).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sdsjax import fit
from sdsjax import fit_run
from sdsjax import morphable
from sdsjax.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
# The tiny model at its smallest: options a case gives later win (argparse: the last one).
BASE = [
  "--model",
  "tiny-random",
  "--config",
  TINY,
  "--steps",
  "2",
  "num_components=6",
  "preview_resolution=16",
  "--no-progress",
]


def snapshot(folder: Path):
  """None for a missing folder, else every entry with its size and modification time."""
  if not os.path.lexists(folder):
    return None
  entries = {}
  for path in sorted(Path(folder).rglob("*")):
    st = path.lstat()
    entries[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, path.is_dir())
  return entries


def run_main(argv) -> tuple[int, str]:
  """fit.main in this process: (exit code, stderr)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = fit.main([str(a) for a in argv])
  return code, err.getvalue()


def refused(argv, out: Path, words: str, base=True, give_out=True) -> str:
  """Asserts the run is refused in one line naming `words`, with --out untouched."""
  before = snapshot(out)
  argv = [*(BASE if base else []), *argv]
  if give_out and "--out" not in argv:
    argv += ["--out", out]
  code, err = run_main(argv)
  lines = err.strip().splitlines()
  assert code == 2, err[-3000:]
  assert "Traceback" not in err
  assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
  assert words in lines[0], lines[0]
  assert snapshot(out) == before, "the refused run wrote to --out"
  return lines[0]


def print_config(*overrides) -> dict:
  import yaml

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert fit.main(["--print-config", *overrides]) == 0
  return yaml.safe_load(out.getvalue())


# ----------------------------------------------------------------------------------------------
# Values that parse but make no sense: refused before anything is read or written.

BAD_VALUES = [
  (["guidance_scale=nan"], "guidance_scale must be in"),
  (["guidance_scale=-inf"], "guidance_scale must be in"),
  (["--guidance-scale", "inf"], "guidance_scale must be in"),  # the --KEY VALUE form
  (["lr=-0.1"], "lr must be in"),
  (["lr=1e309"], "lr must be in"),  # overflows to inf
  (["grad_clip=-1"], "grad_clip must be in"),
  (["camera.distance_range=[0,1]"], "camera.distance_range"),
  (["camera.fov_range=[nan,40]"], "camera.fov_range"),
  (["light.ambient=nan"], "light.ambient"),
  (["raster.sigma=-1"], "raster.sigma"),
  (["raster.sigma=inf"], "raster.sigma"),
  (["raster.gamma=inf"], "raster.gamma"),
  (["raster.far=inf"], "raster.far"),
  (["raster.eps=nan"], "raster.eps"),
  (["raster.faces_per_pixel=1000000000"], "raster.faces_per_pixel"),
  (["raster.bin_size=100000000"], "raster.bin_size"),
  (["t_range=[nan,0.5]"], "t_range"),
  (["t_range=[0.1]"], "t_range"),
  (["camera.elevation_range=[10]"], "camera.elevation_range"),
  (["max_weight=0"], "max_weight must be in"),
  (["max_bad_steps=0"], "max_bad_steps must be in"),
  (["checkpoint_every=0"], "checkpoint_every must be in"),
  (["adam_b1=1"], "adam_b1 must be in"),
  (["dtype=float16"], "dtype must be one of"),
  (["--steps", "0"], "steps must be in"),
  (["--steps", "-1"], "steps must be in"),
  (["--seed", str(2**64)], "seed must be in"),
  (["--seed", "-1"], "seed must be in"),
  (["prompts_per_device=true"], "prompts_per_device"),
  (["prompts_per_device=0"], "prompts_per_device"),
  (["prompts_per_device=-3"], "prompts_per_device"),
  (["prompts_per_device=1.5"], "prompts_per_device"),
  (["num_components=0"], "num_components must be in"),
  (["--model", ""], "model is empty"),
]


@pytest.mark.parametrize("extra, words", BAD_VALUES, ids=[" ".join(c[0]) for c in BAD_VALUES])
def test_bad_value_is_refused(tmp_path, extra, words):
  line = refused(["--prompt", "an old man", *extra], tmp_path / "out", words)
  assert "raster.raster." not in line


def test_strings_are_read_as_strings():
  """negative_prompt=1.5 is a valid prompt, in every spelling; so is a model named 1.5."""
  assert print_config("negative_prompt=1.5")["negative_prompt"] == "1.5"
  assert print_config("negative_prompt=null")["negative_prompt"] == "null"
  assert print_config("negative_prompt=[a, b]")["negative_prompt"] == "[a, b]"
  assert print_config("--negative-prompt", "1.5")["negative_prompt"] == "1.5"
  assert print_config("--negative_prompt", "yes", "--guidance-scale", "7")["negative_prompt"] == (
    "yes"
  )
  assert print_config("--guidance-scale", "7")["guidance_scale"] == 7.0
  assert print_config("model=1.5")["model"] == "1.5"


# ----------------------------------------------------------------------------------------------
# Flags and --out.


def test_unknown_flags(tmp_path):
  out = tmp_path / "out"
  refused(["--prompt", "a", "--frobnicate"], out, "unknown flag --frobnicate")
  refused(["--prompt", "a", "--frobnicate", "3"], out, "unknown config key 'frobnicate'")
  refused(["--prompt", "a", "--steps", "abc"], out, "argument --steps: invalid int value")
  refused(["--prompt", "a", "hello"], out, "bad override 'hello'")


def test_resume_and_overwrite_together(tmp_path):
  refused(["--prompt", "a", "--resume", "--overwrite"], tmp_path / "out", "contradict")


@pytest.mark.parametrize(
  "out, words",
  [
    ("", "--out is empty"),
    ("   ", "--out is empty"),
    ("/proc/sdsjax-probe/out", "is not writable"),
    ("/proc/self/sdsjax-probe", "is not writable"),
    ("/sys/sdsjax-probe", "is not writable"),
    ("/dev/null", "is not a folder"),
    ("x" * 300, "too long"),
    ("a\0b", "NUL"),
  ],
  ids=["empty", "blank", "proc", "proc-self", "sys", "dev-null", "long-name", "nul"],
)
def test_unwritable_out(tmp_path, monkeypatch, out, words):
  monkeypatch.chdir(tmp_path)
  refused(["--prompt", "a", "--out", out], tmp_path / "nothing", words)
  assert os.listdir(tmp_path) == []


def test_out_under_a_file_or_a_broken_link(tmp_path):
  (tmp_path / "file").write_text("mine")
  refused(["--prompt", "a", "--out", tmp_path / "file"], tmp_path / "file", "not a folder")
  refused(["--prompt", "a", "--out", tmp_path / "file" / "o"], tmp_path / "file", "not a folder")
  (tmp_path / "link").symlink_to(tmp_path / "gone")
  refused(["--prompt", "a", "--out", tmp_path / "link"], tmp_path / "link", "broken")


def test_out_without_a_run_but_with_a_foreign_checkpoints_folder(tmp_path):
  """A user's own checkpoints/ folder is not a run: neither resumed, replaced nor written to."""
  out = tmp_path / "project"
  (out / "checkpoints").mkdir(parents=True)
  (out / "checkpoints" / "model.pt").write_text("mine")
  for flag in ([], ["--overwrite"]):
    refused(["--prompt", "a", *flag, "--out", out], out, "not an sdsjax run")
  refused(["--resume", "--out", out], out, "no run to resume")


def test_killed_while_making_checkpoints_folder(tmp_path):
  """A kill before checkpoints/ exists leaves only a staging folder: a plain re-run is not
  refused (it was once refused as "not an sdsjax run's"), --resume says to run again."""
  out = tmp_path / "out"
  (out / ".checkpoints.new").mkdir(parents=True)
  (out / ".checkpoints.new" / ".run_spec.json.x.tmp").write_text("{")  # killed mid-write
  assert fit.check_out_dir(str(out), resume=False, overwrite=False) == out
  refused(["--resume", "--out", out], out, "run again without --resume")
  fit_run.create_checkpoints_folder(out, {"fingerprint": "f"})
  assert sorted(os.listdir(out)) == ["checkpoints"]
  assert json.loads((out / "checkpoints" / fit_run.RUN_SPEC).read_text()) == {"fingerprint": "f"}


def test_missing_out_and_prompts(tmp_path):
  refused(["--prompt", "a"], tmp_path / "o", "--out is required", give_out=False)
  refused([], tmp_path / "o", "no prompt given")
  refused(["--resume"], tmp_path / "o", "no run to resume")
  (tmp_path / "f").write_text("a file")
  refused(["--prompt", "a", "--compile-cache", tmp_path / "f" / "x"], tmp_path / "o", "cannot be")


# ----------------------------------------------------------------------------------------------
# Files given by the user: configs and prompt files.


def test_config_files(tmp_path):
  out = tmp_path / "out"
  fifo = tmp_path / "fifo.yaml"
  os.mkfifo(fifo)
  binary = tmp_path / "binary.yaml"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 10)
  bomb = tmp_path / "bomb.yaml"
  lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
  lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
  bomb.write_text("\n".join([*lines, "negative_prompt: *a8"]) + "\n")
  huge = tmp_path / "huge.yaml"
  with huge.open("wb") as f:
    f.truncate(2**31)  # sparse: 2 GiB of nothing
  cases = [
    (tmp_path, "is a folder"),
    (binary, "not UTF-8"),
    ("/dev/zero", "not a regular file"),
    (fifo, "not a regular file"),
    (bomb, "alias"),
    (huge, "too large"),
    (tmp_path / "nope.yaml", "not found"),
  ]
  for config, words in cases:
    refused(["--prompt", "a", "--config", config], out, words, base=False)


def test_prompt_files(tmp_path):
  out = tmp_path / "out"
  (tmp_path / "latin1.txt").write_bytes("a café\n".encode("latin-1"))
  (tmp_path / "comments.txt").write_text("# only\n  # comments\n\n")
  (tmp_path / "nul.txt").write_bytes(b"a man\x00\n")
  os.mkfifo(tmp_path / "fifo.txt")
  with (tmp_path / "huge.txt").open("wb") as f:
    f.truncate(2**31)
  cases = [
    (tmp_path, "is a folder"),
    (tmp_path / "latin1.txt", "not UTF-8 text (line 1)"),
    (tmp_path / "comments.txt", "no prompt given"),
    (tmp_path / "nul.txt", "binary"),
    (tmp_path / "fifo.txt", "not a regular file"),
    ("/dev/zero", "not a regular file"),
    (tmp_path / "huge.txt", "too large"),
    (tmp_path / "missing.txt", "not found"),
  ]
  for path, words in cases:
    refused(["--prompts-file", path], out, words)


@pytest.mark.parametrize(
  "prompt, words",
  [
    ("", "empty prompt"),
    ("   ", "empty prompt"),
    ("a\0b", "NUL"),
    ("a \udcff man", "not valid UTF-8"),  # what Python makes of argv bytes that are not UTF-8
    ("x" * 100_001, "characters"),
  ],
  ids=["empty", "blank", "nul", "surrogate", "huge"],
)
def test_bad_prompts(tmp_path, prompt, words):
  refused(["--prompt", prompt], tmp_path / "out", words)


# ----------------------------------------------------------------------------------------------
# Head models: hostile and broken files.


class _System:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def _npz_claiming(path: Path, name: str, shape) -> Path:
  stream = io.BytesIO()
  np.lib.format.write_array_header_1_0(
    stream, {"descr": "<f4", "fortran_order": False, "shape": shape}
  )
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(name + ".npy", stream.getvalue() + b"\0" * 16)
  return path


@pytest.fixture(scope="module")
def small_head():
  head = morphable.load_model("builtin", 6)
  return {"mean": np.asarray(head.mean), "basis": np.asarray(head.basis), "faces": head.faces}


def test_hostile_and_broken_heads(tmp_path, small_head):
  out = tmp_path / "out"
  marker = tmp_path / "pwned"
  evil = tmp_path / "generic_model.pkl"
  evil.write_bytes(pickle.dumps({"v_template": _System(marker)}, protocol=2))
  peta = _npz_claiming(tmp_path / "peta.npz", "mean", (10**15, 3))
  mismatch = tmp_path / "mismatch.npz"
  np.savez(mismatch, **{**small_head, "basis": small_head["basis"][:, :100]})
  nan = tmp_path / "nan.npz"
  mean = small_head["mean"].copy()
  mean[3, 1] = np.nan
  np.savez(nan, **{**small_head, "mean": mean})
  objects = tmp_path / "objects.npz"
  np.savez(objects, **small_head, names=np.array([None, 1], dtype=object))
  (tmp_path / "notzip.npz").write_bytes(b"PK\x03\x04 but not really")
  ict = tmp_path / "FaceXModel"
  ict.mkdir()
  (ict / "generic_neutral_mesh.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
  (ict / "identity000.obj").write_bytes(b"v 0 0 \xff\x00\nf 1 2 9\n")
  cases = [
    (f"flame:{evil}", "refusing to unpickle"),
    (str(evil), "refusing to unpickle"),
    (str(peta), "over the"),
    (str(mismatch), "'basis' has shape"),
    (str(nan), "NaN"),
    (str(objects), "plain numeric"),
    (str(tmp_path / "notzip.npz"), "not a readable .npz"),
    (f"ict:{ict}", str(ict)),
    (f"ict:{tmp_path / 'nowhere'}", "ICT-FaceKit folder not found"),
    (str(tmp_path / "missing.npz"), "not found"),
    ("foo:bar", "unknown head model"),
  ]
  for head, words in cases:
    refused(["--prompt", "a", "--head", head], out, words)
  assert not marker.exists()


def test_head_and_config_disagree(tmp_path):
  out = tmp_path / "out"
  refused(["--prompt", "a", "pose_joints=[jaw]"], out, "has no skeleton")
  refused(["--prompt", "a", "num_components=1000"], out, "lower num_components")


# ----------------------------------------------------------------------------------------------
# Stable Diffusion folders: broken, hostile, or with weights that cannot train.


@pytest.fixture(scope="module")
def tiny_folder():
  from sdsjax.models import tiny_random

  return tiny_random.materialize_tiny_random()


def _edit_json(rel, **values):
  def edit(folder: Path):
    path = folder / rel
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))

  return edit


def _poison(rel, value):
  def edit(folder: Path):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    path = folder / rel
    tensors = dict(load_file(str(path)))
    name = sorted(k for k in tensors if tensors[k].dtype.kind == "f")[-1]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = value
    save_file(tensors, str(path))

  return edit


def _write(rel, data: bytes):
  return lambda folder: (folder / rel).write_bytes(data)


UNET = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER = "scheduler/scheduler_config.json"
BROKEN_MODELS = {
  "truncated-weights": (
    lambda f: (f / UNET).write_bytes((f / UNET).read_bytes()[:5000]),
    "corrupt",
  ),
  "petabyte-header": (_write(UNET, (2**60).to_bytes(8, "little") + b"{}"), "corrupt"),
  "config-not-json": (_write("unet/config.json", b"{not json"), "unet/config.json"),
  "no-blocks": (_edit_json("unet/config.json", block_out_channels=[]), "not a supported"),
  "zero-heads": (_edit_json("unet/config.json", attention_head_dim=0), "not a supported"),
  "timesteps-text": (_edit_json(SCHEDULER, num_train_timesteps="many"), "scheduler"),
  "timesteps-0": (_edit_json(SCHEDULER, num_train_timesteps=0), "scheduler"),
  "beta-over-1": (_edit_json(SCHEDULER, beta_end=2.0), "scheduler"),
  "trained-betas": (_edit_json(SCHEDULER, trained_betas=[0.5, 1.5]), "scheduler"),
  "nan-unet": (_poison(UNET, np.nan), "NaN or inf"),
  "inf-vae": (_poison("vae/diffusion_pytorch_model.safetensors", np.inf), "NaN or inf"),
  "nan-text-encoder": (_poison("text_encoder/model.safetensors", np.nan), "NaN or inf"),
  "scaling-text": (_edit_json("vae/config.json", scaling_factor="big"), "scaling_factor"),
  "scaling-nan": (_edit_json("vae/config.json", scaling_factor=float("nan")), "scaling_factor"),
  "tokenizer": (_write("tokenizer/vocab.json", b"{oops"), "tokenizer"),
}


@pytest.mark.parametrize("name", list(BROKEN_MODELS))
def test_broken_model_folder(tmp_path, tiny_folder, name):
  edit, words = BROKEN_MODELS[name]
  folder = tmp_path / "model"
  shutil.copytree(tiny_folder, folder)
  edit(folder)
  refused(["--prompt", "a", "--model", folder], tmp_path / "out", words)


def test_resolutions_and_seeds_checked_against_the_model(tmp_path):
  out = tmp_path / "out"
  # Multiples of 8 that the tiny UNet (2 levels) cannot halve: refused, not a shape traceback.
  refused(["--prompt", "a", "sd_resolution=72"], out, "does not suit this UNet")
  refused(["--prompt", "a", "sd_resolution=8"], out, "does not suit this UNet")
  refused(["--prompt", "a", "--prompt", "b", "--seed", str(2**32 - 1)], out, "lower the seed")


# ----------------------------------------------------------------------------------------------
# One finished run: odd prompts, their folders, and valid JSON outputs.

LONG_PROMPT = ("a very old bearded man with a crooked straw hat and round glasses, " * 160)[:10_000]
ODD_PROMPTS = ["x", "x", "x 2", "!!!", "老人 👴", LONG_PROMPT, "checkpoints", "prompt"]
FINISHED = [
  *BASE,
  "prompts_per_device=8",
  "checkpoint_every=1",
  "evolution_every=1",
]


def _strict_json(text: str):
  def refuse(name):
    raise ValueError(f"{name} in JSON")

  return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """(out, stderr) of a 2-step run of ODD_PROMPTS, checkpointed at steps 1 and 2."""
  root = tmp_path_factory.mktemp("finished")
  prompts = root / "prompts.txt"
  prompts.write_text("\n".join(ODD_PROMPTS) + "\n", encoding="utf-8")
  out = root / "out"
  code, err = run_main([*FINISHED, "--prompts-file", prompts, "--out", out])
  assert code == 0, err[-3000:]
  return out, err


def test_odd_prompts_get_unique_folders(finished):
  out, _ = finished
  run = _strict_json((out / "run.json").read_text())
  folders = [p["folder"] for p in run["prompts"]]
  assert [p["prompt"] for p in run["prompts"]] == ODD_PROMPTS
  assert len(set(folders)) == len(folders) == len(ODD_PROMPTS)
  assert "checkpoints" not in folders
  assert folders[:3] == ["x", "x-2", "x-2-2"]
  for folder in folders:
    assert (out / folder / "head.obj").is_file() and (out / folder / "params.npz").is_file()
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2", "run_spec.json"]


def test_long_prompt_is_warned_about_in_one_line(finished):
  _, err = finished
  warnings = [line for line in err.splitlines() if line.startswith("warning: prompt 6 ")]
  assert len(warnings) == 1 and "77 tokens" in warnings[0]
  assert not [line for line in err.splitlines() if "prompt 5 " in line or "prompt 8 " in line]


def test_outputs_are_strict_json(finished):
  out, _ = finished
  _strict_json((out / "run.json").read_text())
  _strict_json((out / "checkpoints" / "run_spec.json").read_text())
  for folder in out.iterdir():
    if (folder / "metrics.jsonl").is_file():
      rows = [_strict_json(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
      assert [r["step"] for r in rows] == [1, 2]


# ----------------------------------------------------------------------------------------------
# Resume and checkpoints.


def _copy(finished, tmp_path) -> Path:
  out = tmp_path / "out"
  shutil.copytree(finished[0], out, symlinks=True)
  return out


def test_resume_refusals(finished, tmp_path):
  out = _copy(finished, tmp_path)
  refused(["--resume", "--prompt", "someone else", "--out", out], out, "prompts differ", False)
  refused(["--resume", "guidance_scale=3", "--out", out], out, "config differs", False)
  refused(["--resume", "--overwrite", "--out", out], out, "contradict", False)
  refused([*BASE, "--prompt", "x", "--out", out], out, "already holds a run", False)
  spec = out / "checkpoints" / "run_spec.json"
  text = spec.read_text()
  spec.write_text(text[: len(text) // 2])
  refused(["--resume", "--out", out], out, "damaged", False)
  data = json.loads(text)
  spec.write_text(json.dumps({**data, "prompts": [1, None]}))
  refused(["--resume", "--out", out], out, "not a run spec", False)
  spec.write_text(json.dumps({**data, "config": {**data["config"], "lr": -5}}))
  refused(["--resume", "--out", out], out, "lr must be in", False)


def test_resume_of_a_changed_model_is_refused(finished, tmp_path, tiny_folder):
  """The run's fingerprint covers the model: a folder swapped under the run is refused."""
  out = _copy(finished, tmp_path)
  spec_path = out / "checkpoints" / "run_spec.json"
  spec = json.loads(spec_path.read_text())
  folder = tmp_path / "model"
  shutil.copytree(tiny_folder, folder)
  (folder / "README.md").write_text("changed\n")
  spec["config"]["model"] = str(folder)
  spec_path.write_text(json.dumps(spec))
  refused(["--resume", "--out", out], out, "another fingerprint", False)


def _damage(step_dir: Path, how: str) -> None:
  if how == "truncated":
    for path in (step_dir / "state").rglob("*"):
      if path.is_file() and path.stat().st_size > 64:
        path.write_bytes(path.read_bytes()[:64])
  elif how == "garbage":
    for path in (step_dir / "state").rglob("*"):
      if path.is_file():
        path.write_bytes(os.urandom(max(path.stat().st_size, 16)))
  elif how == "metadata-deleted":
    for path in step_dir.rglob("*METADATA*"):
      path.unlink()
  elif how == "state-deleted":
    shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("how", ["truncated", "garbage", "metadata-deleted", "state-deleted"])
def test_damaged_newest_checkpoint_falls_back_to_the_older(finished, tmp_path, how):
  folder = tmp_path / "checkpoints"
  shutil.copytree(finished[0] / "checkpoints", folder)
  fingerprint = json.loads((finished[0] / "run.json").read_text())["fingerprint"]
  _damage(folder / "2", how)
  warnings = []
  meta, _, history = fit_run.Checkpoints(folder, fingerprint).restore_latest(None, warnings.append)
  assert meta["step"] == 1 and history.steps == [0, 1]
  assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint 2 ")
  assert "\n" not in warnings[0]


def test_unreadable_checkpoints_and_another_runs_checkpoint(finished, tmp_path):
  folder = tmp_path / "checkpoints"
  shutil.copytree(finished[0] / "checkpoints", folder)
  with pytest.raises(CheckpointError, match="belongs to another run") as info:
    fit_run.Checkpoints(folder, "another seed's fingerprint").restore_latest(None, print)
  assert "\n" not in str(info.value)
  fingerprint = json.loads((finished[0] / "run.json").read_text())["fingerprint"]
  _damage(folder / "1", "garbage")
  _damage(folder / "2", "truncated")
  warnings = []
  with pytest.raises(CheckpointError, match="none of the checkpoints") as info:
    fit_run.Checkpoints(folder, fingerprint).restore_latest(None, warnings.append)
  assert "--overwrite" in str(info.value) and len(warnings) == 2


def test_resume_past_a_corrupt_checkpoint_equals_the_uninterrupted_run(finished, tmp_path):
  """A run killed after its step-2 save whose newest checkpoint is then damaged: resuming goes
  back to step 1 and ends where the uninterrupted run ended."""
  out = _copy(finished, tmp_path)
  run_path = out / "run.json"
  run = json.loads(run_path.read_text())
  for entry in run["prompts"]:
    entry["status"] = "pending"
    (out / entry["folder"] / "params.npz").unlink()
  run_path.write_text(json.dumps(run))
  _damage(out / "checkpoints" / "2", "truncated")
  code, err = run_main(["--resume", "--out", out, "--no-progress"])
  assert code == 0, err[-3000:]
  assert any(line.startswith("warning: checkpoint 2 is unreadable") for line in err.splitlines())
  resumed = json.loads(run_path.read_text())
  assert resumed["resumed_from"] == {"wave": 0, "step": 1}
  for entry in resumed["prompts"]:
    with (
      np.load(out / entry["folder"] / "params.npz") as a,
      np.load(finished[0] / entry["folder"] / "params.npz") as b,
    ):
      np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-5, atol=1e-6)
    rows = (out / entry["folder"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


# ----------------------------------------------------------------------------------------------
# --overwrite removes exactly what the previous run wrote.


def test_overwrite_removes_the_runs_files_and_keeps_the_users(finished, tmp_path):
  out = _copy(finished, tmp_path)
  old = json.loads((out / "run.json").read_text())
  mine = {
    out / "notes.txt": "mine",
    out / "x" / "my_notes.txt": "mine too",
    out / "renders" / "a.png": "not sdsjax's",
  }
  for path, text in mine.items():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  # FINISHED's options: its compiled program, from the compile cache.
  argv = [*FINISHED, "--prompt", "a bald man", "--overwrite", "--out", out]
  code, err = run_main(argv)
  assert code == 0, err[-3000:]
  for path, text in mine.items():
    assert path.read_text() == text
  assert sorted(os.listdir(out / "x")) == ["my_notes.txt"]
  for entry in old["prompts"]:
    if entry["folder"] != "x":
      assert not (out / entry["folder"]).exists(), entry["folder"]
  run = json.loads((out / "run.json").read_text())
  assert [p["folder"] for p in run["prompts"]] == ["a-bald-man"]
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2", "run_spec.json"]


# ----------------------------------------------------------------------------------------------
# Numerics: the run stops with a clear error instead of writing a diverged head.


def test_diverging_fit_stops_before_writing_a_mesh(tmp_path):
  out = tmp_path / "out"
  # prior.bound=0: the default ±3σ box would hold the weights, so nothing could diverge.
  argv = [*BASE, "--steps", "4", "lr=10", "prior.bound=0", "--prompt", "a", "--out", out]
  code, err = run_main(argv)
  last = err.strip().splitlines()[-1]
  assert code == 2 and "Traceback" not in err
  assert last.startswith("error: step ") and "max_weight" in last and "--overwrite" in last
  assert not (out / "a" / "head.obj").exists() and not (out / "a" / "params.npz").exists()


def _health(bad, biggest):
  return {"bad_in_a_row": np.asarray(bad), "max_abs_weight": np.asarray(biggest, np.float32)}


def test_health_checks():
  from sdsjax import config as config_lib

  cfg = config_lib.load_config(None, ["max_bad_steps=3", "max_weight=5"])
  fit_run._check_health(_health([2, 0], [4.0, 1.0]), cfg, 7, 0, ["a", "b"])
  for metrics, words in [
    (_health([0, 3], [1.0, 1.0]), "3 steps in a row had a non-finite gradient for prompt 'b'"),
    (_health([0, 0], [1.0, 6.0]), "reached 6σ, beyond max_weight=5"),
    (_health([0, 0], [np.nan, 1.0]), "of prompt 'a'"),
  ]:
    with pytest.raises(fit_run.FitError, match=words) as info:
      fit_run._check_health(metrics, cfg, 7, 0, ["a", "b"])
    assert "\n" not in str(info.value) and "--overwrite" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Real processes: argv bytes, a cluster that is not there, a hostile pickle.


def _cli(*argv, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "SDSJAX_DISTRIBUTED_TIMEOUT": "20"}
  return subprocess.run(
    [sys.executable, "-m", "sdsjax.fit", *argv], capture_output=True, env=env, timeout=timeout
  )


def _assert_one_line_refusal(proc, words):
  err = proc.stderr.decode("utf-8", "replace").strip()
  assert proc.returncode == 2, err[-3000:]
  assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
  assert err.startswith("error: ") and words in err, err


def test_process_prompt_that_is_not_utf8(tmp_path):
  out = tmp_path / "out"
  proc = _cli(*BASE, "--prompt", b"a \xff\xfe man", "--out", str(out))
  _assert_one_line_refusal(proc, "not valid UTF-8")
  assert not out.exists()


def test_process_distributed_without_a_cluster(tmp_path):
  out = tmp_path / "out"
  _assert_one_line_refusal(
    _cli(*BASE, "--distributed", "--prompt", "a", "--out", str(out)), "no cluster to join"
  )
  assert not out.exists()


def test_process_hostile_pickle_runs_nothing(tmp_path):
  out = tmp_path / "out"
  marker = tmp_path / "pwned"
  evil = tmp_path / "generic_model.pkl"
  evil.write_bytes(pickle.dumps({"v_template": _System(marker)}, protocol=2))
  proc = _cli(*BASE, "--head", f"flame:{evil}", "--prompt", "a", "--out", str(out))
  _assert_one_line_refusal(proc, "refusing to unpickle")
  assert not out.exists() and not marker.exists()
