"""keditjax: knowledge editing of neural networks in JAX/Flax.

Layers, bottom to top: `kernels` (pure array math) -> `models` (Flax models,
loaders, tokenizers, named edit sites) -> `editors` -> `evaluation` ->
`experiments`. See README.md.
"""

from keditjax import errors

__version__ = "0.1.0"
__all__ = ["errors"]
