"""What every benchmark script shares; each script is a parameter grid over these helpers.

Run the scripts as modules from the repository root: `python -m benchmarks.bench_fit ...`.

- Grids: `grid` (every combination of some axes) and `run_grid` (one row per case, a failing case
  becomes a row with its error and the others still run).
- Timing: `timed` (wall time, page faults, kernel time of one call), `alternate` (several
  implementations in turn, the first of each round rotating), `best_time`, `summary`, and for
  achieved rates `xla_flops` (XLA's FLOP count) and `jax_matmul_flops_per_s` (the yardstick).
- Device sync: `torch_sync`, `on_torch_device` (JAX's is `jax.block_until_ready`).
- Peak memory: `peak_rss_mb`, `RssPeak` (the peak above the level at its start),
  `jax_device_peak_mb`, `torch_device_peak_mb`, `release_torch_cache`, and the child-process
  protocol: `run_child` starts `python -m MODULE ARGS` and reads the one `CHILD_RESULT {json}`
  line that the child prints with `child_result`, so that a peak is one implementation's alone.
- Output: `run_info` (date, command, machine, versions), `markdown_table`, `emit` (JSON on stdout
  and optionally a file, then the markdown tables), `logger` (progress on stderr).

jax and torch are imported only inside the functions that need them: a torch-only child process
never imports jax. Importing this module sets XLA_PYTHON_CLIENT_PREALLOCATE=false unless it is set:
on a GPU both frameworks share the device in one process, and JAX must not take 75% of it up
front (which also makes JAX's peak_bytes_in_use its real peak).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdsjax import host_memory

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parent.parent
CHILD_TAG = "CHILD_RESULT "


# ------------------------------------------------------------------------------------------
# Grids.


def grid(**axes: Iterable) -> list[dict[str, Any]]:
  """Every combination of the axes' values as keyword dicts, the last axis varying fastest:
  `grid(prompts=[1, 8], dtype=["float32"])` -> `[{prompts: 1, dtype: float32}, {prompts: 8, ...}]`.
  """
  names = list(axes)
  return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def run_grid(
  measure: Callable[..., dict], cases: Iterable[Mapping[str, Any]], log=None
) -> list[dict]:
  """`measure(**case)` for every case; each row is the case's keys and the figures. A case that
  raises (out of memory at a large size, say) becomes a row with "error", and the grid goes on."""
  rows = []
  for case in cases:
    try:
      row = {**case, **measure(**case)}
    except Exception as err:  # the other cases' figures are still worth having
      row = {**case, "error": f"{type(err).__name__}: {err}"}
      traceback.print_exc(file=sys.stderr)
    if log:
      log(json.dumps(row, default=str))
    rows.append(row)
  return rows


# ------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass(frozen=True)
class Sample:
  """One timed call: wall seconds, and this process's minor page faults and kernel CPU seconds
  during it (first touches of freshly mapped memory show up there)."""

  seconds: float
  minor_faults: int
  system_s: float


def timed(fn: Callable[[], Any]) -> Sample:
  """Times one call of `fn`, which must wait for its own results (see `torch_sync`)."""
  before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  fn()
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF)
  return Sample(seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime)


def alternate(
  fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 0, log=None
) -> dict[str, list[Sample]]:
  """`warmup` untimed calls of each function, then `repeats` rounds of one timed call each.

  The implementations take turns, and who goes first rotates from round to round, so a change in
  a shared machine's load hits them alike. Returns the samples per name, in round order.
  """
  names = list(fns)
  for _ in range(warmup):
    for name in names:
      fns[name]()
  samples: dict[str, list[Sample]] = {name: [] for name in names}
  for rep in range(repeats):
    shift = rep % len(names)
    for name in names[shift:] + names[:shift]:
      samples[name].append(timed(fns[name]))
    if log:
      log(f"round {rep}: " + ", ".join(f"{n} {samples[n][-1].seconds:.4g}s" for n in names))
  return samples


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """The fastest of `repeats` timed calls after `warmup` untimed ones, in seconds."""
  for _ in range(warmup):
    fn()
  return min(timed(fn).seconds for _ in range(repeats))


def summary(samples: Sequence[Sample], per: int = 1) -> dict:
  """Median and min seconds (per one of `per` steps a call makes), all times, and the median
  page faults and kernel seconds per call."""
  times = [s.seconds / per for s in samples]
  return {
    "median_s": statistics.median(times),
    "min_s": min(times),
    "times_s": [round(t, 6) for t in times],
    "page_faults": int(statistics.median(s.minor_faults for s in samples)),
    "system_s": round(statistics.median(s.system_s for s in samples), 3),
  }


def _cost_flops(stage) -> float | None:
  try:
    analysis = stage.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def xla_flops(lowered, compiled) -> float | None:
  """XLA's FLOP count of a computation (`jax.stages.Lowered` and its `Compiled`), or None.

  The compiled program's count, except on GPU: there the convolutions become cuDNN calls that
  it leaves out, so the lowered HLO's count is used (it also counts work that XLA's passes later
  fold away, which is negligible at Stable Diffusion sizes but not at the tiny ones).
  """
  import jax

  on_gpu = jax.devices()[0].platform in ("gpu", "cuda", "rocm")
  return _cost_flops(lowered) if on_gpu else _cost_flops(compiled)


def jax_matmul_flops_per_s(dtype: str = "float32") -> float:
  """JAX's dense matmul rate on its first device in `dtype` (square, best of 3): the yardstick
  for achieved rates (the goals speak of a share of the bf16 dense peak)."""
  import jax
  import jax.numpy as jnp

  n = 1024 if jax.devices()[0].platform == "cpu" else 8192
  a = jnp.ones((n, n), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  return 2 * n**3 / best_time(lambda: matmul(a).block_until_ready(), 3)


# ------------------------------------------------------------------------------------------
# Device sync.


def torch_sync(device) -> None:
  """Waits for the device's queued work: CUDA is asynchronous, so a clock read must follow this."""
  import torch

  if torch.device(device).type == "cuda":
    torch.cuda.synchronize(device)


def on_torch_device(device, fn: Callable[[], Any]) -> Any:
  """Runs `fn` with `device` as torch's default device, then waits for it (`torch_sync`). The
  baseline names its devices itself; the default device only guards a factory call that does
  not."""
  import torch

  with torch.device(device):
    out = fn()
  torch_sync(device)
  return out


# ------------------------------------------------------------------------------------------
# Peak memory.


def proc_status_kb(field: str) -> int | None:
  """A field of /proc/self/status in kB (VmRSS, VmHWM), or None off Linux."""
  return host_memory.process_rss(field) // 1024 or None


def peak_rss_mb() -> float:
  """This process's peak resident memory: VmHWM, else getrusage's ru_maxrss.

  ru_maxrss survives fork + exec on Linux, so a child started by a big parent would report the
  parent's size; VmHWM belongs to the child's own address space.
  """
  hwm = proc_status_kb("VmHWM")
  kb = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024.0


class RssPeak:
  """The resident-memory peak from now on above the resident memory now.

  Linux: VmHWM after resetting it through /proc/self/clear_refs. Elsewhere the growth of
  ru_maxrss, which under-reports when the process had peaked higher before.
  """

  def __init__(self):
    self.rss_kb = proc_status_kb("VmRSS")
    self.maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
      Path("/proc/self/clear_refs").write_text("5")
      self.reset = self.rss_kb is not None
    except OSError:
      self.reset = False

  def mb(self) -> tuple[float, str]:
    """(peak MB, how it was measured)."""
    hwm = proc_status_kb("VmHWM") if self.reset else None
    if hwm is not None:
      return (hwm - self.rss_kb) / 1024.0, "VmHWM-VmRSS"
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss_kb) / 1024, "maxrss"


def jax_device_peak_mb() -> float | None:
  """JAX's peak_bytes_in_use on its first accelerator since the process started (it cannot be
  reset), in MB; None on CPU."""
  import jax

  dev = jax.devices()[0]
  stats = (dev.memory_stats() or {}) if dev.platform != "cpu" else {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def torch_device_peak_mb(reset: bool = False) -> float | None:
  """PyTorch's max_memory_allocated on CUDA since the last reset, in MB (None without CUDA);
  `reset=True` starts a new period."""
  import torch

  if not torch.cuda.is_available():
    return None
  peak = torch.cuda.max_memory_allocated() / 2**20
  if reset:
    torch.cuda.reset_peak_memory_stats()
  return peak


def release_torch_cache() -> None:
  """Hands PyTorch's cached, unused CUDA blocks back, so that JAX can use them (both frameworks
  share the device in one process); nothing without CUDA or when torch is not imported."""
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    gc.collect()
    torch.cuda.empty_cache()


def run_child(module: str, args: Sequence[str], timeout: float | None = None) -> dict:
  """Runs `python -m MODULE ARGS` in the repository root and returns the dict it reported with
  `child_result`, or {"error": the end of its output} when it reported none."""
  cmd = [sys.executable, "-m", module, *map(str, args)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(CHILD_TAG):
      return json.loads(line[len(CHILD_TAG) :])
  return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}"}


def child_result(result: Mapping[str, Any]) -> None:
  """Reports a child's figures to `run_child` (one line on stdout)."""
  print(CHILD_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------
# Machine, malloc setting and output.


def cpu_name() -> str:
  """The CPU's model name and core count, e.g. "AMD EPYC 7B13, 2 cores"."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores"


def device_name() -> str:
  """JAX's first accelerator, else the CUDA device torch sees, else "CPU: <cpu_name()>". Asks
  only a framework the process has already imported."""
  if "jax" in sys.modules:
    dev = sys.modules["jax"].devices()[0]
    if dev.platform != "cpu":
      return f"{dev.device_kind} ({dev.platform})"
  if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
    return f"{sys.modules['torch'].cuda.get_device_name(0)} (cuda)"
  return f"CPU: {cpu_name()}"


def add_malloc_option(parser) -> None:
  parser.add_argument(
    "--malloc",
    choices=("keep", "default"),
    default="keep",
    help="keep: sdsjax.host_memory.keep_freed_memory(), as python -m sdsjax.fit does, for "
    "every framework in the process (on CPU only); default: glibc's defaults",
  )


def apply_malloc(choice: str) -> bool:
  """Applies --malloc before any framework allocates; returns whether freed memory stays mapped."""
  from sdsjax import host_memory  # jax-free

  return choice == "keep" and host_memory.keep_freed_memory()


def run_info(module: str, **extra) -> dict:
  """Where and how a benchmark ran: date, the command, device, CPU, versions, XLA_FLAGS, load."""
  versions = {
    name: sys.modules[name].__version__
    for name in ("jax", "flax", "torch", "diffusers", "transformers")
    if name in sys.modules
  }
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": " ".join(["python -m", module, *sys.argv[1:]]),
    "device": device_name(),
    "cpu": cpu_name(),
    "versions": versions,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    # The machine may be shared: the load average says how contended the timings were.
    "loadavg_1min_start": os.getloadavg()[0],
    **extra,
  }


def fmt(value, spec: str = ".3g") -> str:
  """`format(value, spec)`, or "–" for a missing figure."""
  return "–" if value is None else format(value, spec)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def emit(report: dict, tables: str | Sequence[str], json_path: str | None = None) -> None:
  """Prints the report as JSON (and writes it to `json_path`), then the markdown tables. Adds the
  load average at the end next to the one `run_info` took at the start."""
  report.setdefault("loadavg_1min_end", os.getloadavg()[0])
  text = json.dumps(report, indent=2, default=str)
  print(text)
  if json_path:
    Path(json_path).write_text(text + "\n")
  for table in [tables] if isinstance(tables, str) else tables:
    print()
    print(table)


def logger(name: str) -> Callable[[str], None]:
  """A progress logger that writes "[name HH:MM:SS] msg" lines to stderr."""

  def log(msg: str) -> None:
    print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

  return log
