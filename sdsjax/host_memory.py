"""Keep freed host memory mapped, so that each jitted step stops paying for fresh pages.

XLA:CPU allocates a step's temporaries (GBs at Stable Diffusion size) with malloc and frees them
at the end of the step. glibc serves blocks that large with mmap and returns them with munmap, so
every step first-touches GBs of new pages: ~1.2 M page faults and ~6-9 s of kernel time per
SD-1.5 UNet forward or VAE encode fwd+bwd on a 2-core CPU (benchmarks/RESULTS.md), a third of
the step. Telling glibc to serve large blocks from its heap and never to trim it keeps those
pages mapped from one step to the next. The cost: the process keeps its peak footprint, and a
run of programs with ever larger temporaries can stack them up (a freed block only serves a
request it can hold); `release_freed_memory()` hands the free pages back between such phases.
PyTorch's CPU allocator has the same problem; the benchmarks apply this to both sides.

It must run before the allocating threads exist (before JAX's first computation), because a
thread that already has its own malloc arena keeps it, and hence before JAX says which backend it
will use. It does nothing where a JAX accelerator plugin is installed (GPU, TPU): there the big
buffers live on the device, and one malloc arena shared by the many host threads of XLA's
GPU compiler would only add lock contention. Set SDSJAX_KEEP_FREED_MEMORY=0 to opt out.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def cpu_only() -> bool:
  """Whether JAX will run on the CPU, judged without starting a backend: JAX_PLATFORMS names
  only cpu, or no PJRT plugin (CUDA, ROCm, TPU) is installed."""
  platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms == ["cpu"]
  return (
    not importlib.metadata.entry_points(group="jax_plugins")
    and importlib.util.find_spec("libtpu") is None
  )


def keep_freed_memory() -> bool:
  """Configure glibc's malloc as described above. Returns whether it did (not with an
  accelerator, on macOS, Windows, musl, or with SDSJAX_KEEP_FREED_MEMORY=0)."""
  if (
    os.environ.get("SDSJAX_KEEP_FREED_MEMORY", "1") == "0"
    or not sys.platform.startswith("linux")
    or not cpu_only()
  ):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # No mmap for large blocks; never give the heap's top back (-1 is SIZE_MAX to glibc); one arena,
  # because a thread's own arena would still mmap blocks over its 64 MB heap size.
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))
  return all(mallopt(param, value) == 1 for param, value in settings)


def release_freed_memory() -> None:
  """Return the pages of freed heap blocks to the kernel (glibc's malloc_trim), keeping the
  settings above; the next step pays for its pages once more."""
  if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
      ctypes.CDLL(None).malloc_trim(0)


def process_rss(field: str = "VmRSS") -> int:
  """Resident (or, with VmHWM, peak resident) bytes of this process; 0 where unknown."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0
