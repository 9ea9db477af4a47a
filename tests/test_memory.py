"""`keditjax.memory`: freed activation-sized buffers leave the process."""

import platform
import subprocess
import sys

import pytest

from keditjax import memory

# A freed 16 MiB mapped buffer raises glibc's dynamic mmap threshold; then
# 100 buffers of 4 MiB come from the heap under a live one, and are freed.
SCRIPT = r"""
import sys, numpy as np
from keditjax import memory
mode = sys.argv[1]
if mode == "tuned":
  assert memory.tune_allocator() and memory.tuned() == (1 << 20, 64 << 20)
base = memory.current_rss_mib()
big = np.ones(2 << 20); del big
tmp = [np.ones(512 << 10) for _ in range(100)]
pin = np.ones(25_000)
del tmp
if mode == "released":
  memory.release_freed_memory()
print(memory.current_rss_mib() - base)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                           reason="glibc's allocator only")


def _retained(mode):
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True,
                       capture_output=True, text=True)
  return float(out.stdout.split()[-1])


@glibc
def test_tuned_allocator_returns_freed_buffers():
  assert _retained("default") > 300  # glibc keeps the 400 MiB freed
  assert _retained("tuned") < 50
  assert _retained("released") < 50


def test_rss_readings():
  assert memory.peak_rss_mib() > 0 and memory.current_rss_mib() > 0
