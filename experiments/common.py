"""What every launcher does first: quiet logs and a persistent XLA cache."""

import os

import jax
from absl import logging


def setup() -> None:
  """WARNING-level logs; compiled programs cached on disk across runs.

  The cache lives in `$KEDITJAX_CACHE/xla` (default `~/.cache/keditjax/xla`),
  so a second run of the same edit shapes skips compilation.
  """
  logging.set_verbosity(logging.WARNING)
  root = os.environ.get("KEDITJAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "keditjax"))
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
