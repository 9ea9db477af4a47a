"""Process memory: the C allocator's settings for large short-lived arrays.

XLA's CPU client takes its buffers from `malloc`. glibc serves a request
below its mmap threshold from the heap, and raises that threshold (up to
32 MiB) whenever a larger mapped buffer is freed, so a process that keeps
creating and dropping arrays of a few MiB (an edit's activations, the v*
loop's temporaries, compiler scratch) soon serves them from the heap, where
freed memory stays in the process: its resident size then runs hundreds of
MiB above what is live. `tune_allocator` pins the threshold, so every buffer
of at least `mmap_threshold` bytes is mapped and handed back to the system
when freed; `release_freed_memory` returns what the heap holds now. The
ROME edit benchmark (10 edits of SmolLM2-135M, three processes): peak RSS
1,985 MiB tuned against 2,107 MiB (docs/benchmarks/edit_rome_avx2.json and
edit_rome_avx2_untuned_allocator.json).

Every `experiments.*` launcher calls `tune_allocator()`; a library user may
call it once at start. Both are no-ops (returning False) without glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
_tuned = None


def _libc():
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name or "libc.so.6")
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
  except OSError:
    return None


def tune_allocator(mmap_threshold: int = 1 << 20,
                   trim_threshold: int = 64 << 20) -> bool:
  """Pins glibc's mmap threshold (and heap trim threshold) for this process.

  Args:
    mmap_threshold: buffers of at least this many bytes are mapped, and
      returned to the system when freed (glibc's default is dynamic).
    trim_threshold: free memory at the heap's top beyond this is returned.

  Returns:
    True if applied (glibc), False otherwise.
  """
  global _tuned
  libc = _libc()
  if libc is None:
    return False
  ok = (libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and
        libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1)
  _tuned = (mmap_threshold, trim_threshold) if ok else None
  return ok


def tuned():
  """`(mmap_threshold, trim_threshold)` set by `tune_allocator`, or None."""
  return _tuned


def release_freed_memory() -> bool:
  """Returns the heap's freed pages to the system (glibc's `malloc_trim`)."""
  libc = _libc()
  return bool(libc is not None and libc.malloc_trim(0))


def current_rss_mib() -> float:
  """This process's resident memory now (Linux; 0.0 elsewhere)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * resource.getpagesize() / 2**20
  except OSError:
    return 0.0


def peak_rss_mib() -> float:
  """This process's peak resident memory so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
