"""The multi-host path: two processes joined by jax.distributed over loopback, like a TPU pod."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Each process of a pod compiles its own program (on CPU, JAX's cache key differs between
# processes), so there is one pod run, interrupted and resumed.
COMMON = [
  "--prompt",
  "an old man",
  "--prompt",
  "a young woman",
  "--model",
  "tiny-random",
  "--config",
  TINY,
  "--steps",
  "8",
  "checkpoint_every=2",
  "num_components=8",
  "preview_resolution=16",
  "--no-progress",
]


def environment():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return env


def start_pod(argv):
  """Two processes of `python -m sdsjax.fit argv`, joined over loopback."""
  address = f"127.0.0.1:{free_port()}"
  return [
    subprocess.Popen(
      [
        *(sys.executable, "-m", "sdsjax.fit", *argv),
        *("--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)),
      ],
      env=environment(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]


def finish(procs, codes=(0, 0), timeout=900):
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert [p.returncode for p in procs] == list(codes), "\n".join(l[-2000:] for l in logs)
  return logs


def test_two_processes_stop_together_resume_and_match_one(tmp_path):
  """A preempted host (SIGTERM to one process of two): both stop at one step and checkpoint;
  the resumed pod ends where one process fitting both prompts ends."""
  import signal
  import time

  out = tmp_path / "pod"
  procs = start_pod([*COMMON, "prompts_per_device=1", "--out", str(out)])
  metrics = out / "an-old-man" / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline:
    assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # only the second host is preempted
  logs = finish(procs, (143, 143), timeout=600)
  assert "--resume" in logs[0].strip().splitlines()[-1]
  stopped = len(metrics.read_text().splitlines())
  assert 2 <= stopped < 8
  # Both processes agreed: the checkpoint is at the step process 0 logged last.
  steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == stopped, (steps, stopped)
  finish(start_pod(["--resume", "--out", str(out)]))
  pod = json.loads((out / "run.json").read_text())
  assert pod["process_count"] == 2 and len(pod["devices"]) == 2
  assert pod["resumed_from"]["step"] == stopped

  single = subprocess.run(
    [
      sys.executable,
      "-m",
      "sdsjax.fit",
      *COMMON,
      "prompts_per_device=2",
      "--out",
      str(tmp_path / "one"),
    ],
    env=environment(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert single.returncode == 0, single.stderr[-2000:]
  for slug in ("an-old-man", "a-young-woman"):
    a = np.load(out / slug / "params.npz")["weights"]
    b = np.load(tmp_path / "one" / slug / "params.npz")["weights"]
    assert np.abs(b).max() > 0
    # Each process compiles a batch of 1 where the single process compiles a batch of 2, so
    # XLA picks different kernels; Adam rescales the resulting ~1e-7 gradient noise to ~1e-5,
    # and to ~1e-3 on a weight whose gradient is near 0 (Adam divides it by its own size).
    # A wrong prompt/key assignment, or a step lost or repeated by the resume, would differ by
    # a step (lr 0.05 times Adam's |m/√v| of 0.3-1, on every weight); the bound is 5% of the
    # lr. (Over 24 steps the noise grows to ~5e-2: hence 8 steps.)
    np.testing.assert_allclose(a, b, rtol=0, atol=2.5e-3)
