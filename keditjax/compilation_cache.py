"""JAX's persistent compilation cache, switched on safely for keditjax.

A launcher compiles the same programs every time it starts (ROME's v*
loop, the covariance step, scoring); with this cache a second process loads
them from disk instead of compiling them again. Every `experiments.*`
launcher calls `enable()`; a library user calls it once, before the first
`jax.jit` runs:

  import keditjax
  keditjax.compilation_cache.enable()          # ~/.cache/keditjax/xla/...
  keditjax.compilation_cache.enable("/big/disk/xla")   # elsewhere

`$KEDITJAX_COMPILATION_CACHE` moves the cache (`0`/`off` disables it),
otherwise it lives in `$KEDITJAX_CACHE/xla`, `$XDG_CACHE_HOME/keditjax/xla`
or `~/.cache/keditjax/xla`; the launchers' `--compilation_cache` flag does the
same.

Keying. JAX keys an entry by the lowered program (shapes, dtypes, constants,
shardings), the jaxlib version, the backend platform, XLA flags and compile
options, so another model, config or jax version never reuses a wrong
executable: weights are runtime arguments of our jitted functions, and the
program of a different architecture or shape is a different key. One thing
JAX's key leaves out on CPU is the host's instruction set (the backend
reports only "cpu"), so a cache folder shared between machines (an NFS home)
could hand an AVX-512 executable to a CPU without it. `enable` therefore
places the entries in a sub-folder named after the jax/jaxlib versions and a
hash of the CPU's feature flags.
"""

from __future__ import annotations

import hashlib
import os
import platform

ENV_VAR = "KEDITJAX_COMPILATION_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")
DEFAULT_MAX_BYTES = 2 << 30  # LRU-evicted beyond this (jax + filelock)


def default_dir() -> str:
  """The cache root before `namespace()` is appended."""
  root = os.environ.get("KEDITJAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(
          os.path.expanduser("~"), ".cache"), "keditjax")
  return os.path.join(root, "xla")


def _cpu_fingerprint() -> str:
  """A short hash of the host CPU's model and feature flags."""
  text = platform.machine() + "|" + platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features", "model name", "CPU part"):
          text += "|" + line.strip()
          if key in ("flags", "Features"):
            break  # one processor's flags describe them all
  except OSError:  # not Linux: machine/processor names only
    pass
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def namespace() -> str:
  """The sub-folder for this jax/jaxlib version and CPU: `jax-0.10.2-...`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  return (f"jax-{jax.__version__}-jaxlib-{jaxlib.__version__}-"
          f"cpu-{_cpu_fingerprint()}")


def enable(path: str | None = None, *, min_compile_time_s: float = 0.0,
           max_bytes: int = DEFAULT_MAX_BYTES) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its folder.

  Args:
    path: the cache root (None: `$KEDITJAX_COMPILATION_CACHE`, else
      `default_dir()`); "", "0" or "off" disables the cache.
    min_compile_time_s: only programs that took at least this long to
      compile are stored (JAX's default is 1 s; 0 stores all: a ROME edit
      compiles ~30 small programs whose compile times add up to seconds).
    max_bytes: LRU-evict beyond this size (-1: never).

  Returns:
    The folder entries go to (root/`namespace()`), or None when disabled.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if path is None:
    path = os.environ.get(ENV_VAR)
    if path is None:
      path = default_dir()
  if path.strip().lower() in _OFF:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  folder = os.path.join(os.path.expanduser(path), namespace())
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(min_compile_time_s))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
  return folder
