"""keditjax: knowledge editing of neural networks in JAX/Flax.

Layers, bottom to top: `data` (bundled datasets, one resolver) and
`kernels` (pure array math) -> `models` (Flax models, loaders, tokenizers,
named edit sites) -> `editors` -> `evaluation` -> `experiments`. See
README.md.

Submodules load on first use, so `import keditjax` stays cheap and
`keditjax.models.load("smollm2-135m")` works without importing
`keditjax.models` first.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("analysis", "compilation_cache", "data", "editors", "errors",
               "evaluation", "kernels", "memory", "models", "progress",
               "sharding", "stats", "training")
__all__ = list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    module = importlib.import_module(f"keditjax.{name}")
    globals()[name] = module  # later lookups skip this function
    return module
  raise AttributeError(f"module 'keditjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
