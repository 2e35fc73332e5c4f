"""sdsjax.host_memory: after keep_freed_memory(), a freed large block's pages stay mapped until
release_freed_memory()."""

import os
import subprocess
import sys

import pytest

# Allocates, touches and frees a 256 MB block three times and prints the page faults of the
# second and third rounds: ~65k (one per 4 KB page) when the block went back to the kernel
# before (on free under glibc's defaults; by release_freed_memory() before the third round).
SCRIPT = r"""
import ctypes, resource, sys
from sdsjax import host_memory
print("kept", host_memory.keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []
for round in range(3):
  if round == 2:
    host_memory.release_freed_memory()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("faults", faults[1], faults[2])
"""


def _run(keep: str):
  env = dict(os.environ, SDSJAX_KEEP_FREED_MEMORY=keep)
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
  ).stdout.split()
  return out[1] == "True", int(out[3]), int(out[4])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_avoids_page_faults():
  kept, faults, after_release = _run("1")
  assert kept and faults < 1000, faults
  assert after_release > 30000, after_release
  kept, faults, _ = _run("0")  # the opt-out leaves glibc's defaults: every round faults again
  assert not kept and faults > 30000, faults
