"""What every launcher does first: quiet logs and a persistent XLA cache."""

from absl import flags, logging

from keditjax import compilation_cache, memory

_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "Persistent XLA compilation cache folder ('off' disables it; default: "
    "$KEDITJAX_COMPILATION_CACHE, else ~/.cache/keditjax/xla).")


def setup() -> str | None:
  """WARNING-level logs; compiled programs cached on disk across runs.

  Returns:
    The compilation cache folder (`keditjax.compilation_cache.enable`), or
    None when disabled.
  """
  logging.set_verbosity(logging.WARNING)
  memory.tune_allocator()  # freed activation buffers go back to the system
  return compilation_cache.enable(
      _CACHE.value if flags.FLAGS.is_parsed() else None)
