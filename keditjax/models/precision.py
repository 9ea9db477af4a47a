"""Mixed precision for the heavy passes: bfloat16 matmuls, float32 elsewhere.

`compute_dtype("bfloat16")` is a context manager under which every
`nn.Dense` and the tied LM head (`nn.Embed.attend`) multiply bfloat16 inputs
with float32 accumulation and return float32; norms, softmaxes, residual
additions and losses stay float32. On CPUs with AVX512-BF16 this runs the
matmuls about 1.7x faster than float32 (see `docs/benchmarks/`). The
backward pass is bfloat16 too (a `custom_vjp`), so gradients through the
network, as in the v* optimisation, get the same speed-up.

    with precision.compute_dtype("bfloat16"):
      logits, _, _ = lm.run(config, precision.cast_kernels(params), tokens)

`cast_kernels` rounds the dense kernels once, outside the loop, so a jitted
step does not re-round 100M weights every call.
"""

from __future__ import annotations

import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors

COMPUTE_DTYPES = ("float32", "bfloat16")
# "auto": bfloat16 where matmuls have native bfloat16 support, else float32.
AUTO = "auto"
# CPU feature flags (Linux /proc/cpuinfo) of native bfloat16 dot products.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
_LAYER = re.compile(r"^[A-Za-z]+_(\d+)(/|$)")


def check(name: str) -> str:
  if name not in COMPUTE_DTYPES:
    raise errors.ConfigError(
        f"compute_dtype={name!r}; use one of {', '.join(COMPUTE_DTYPES)}.")
  return name


def check_or_auto(name: str) -> str:
  """`check`, also accepting "auto" (see `resolve`)."""
  return name if name == AUTO else check(name)


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool:
  """Whether the host CPU multiplies bfloat16 natively (AVX512-BF16, AMX, or
  Arm's BF16 extension), from `/proc/cpuinfo` (False where unreadable)."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        cpuinfo = f.read()
    except OSError:
      return False
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      return any(flag in value.split() for flag in _BF16_CPU_FLAGS)
  return False


def resolve(name: str, backend: str | None = None,
            cpuinfo: str | None = None) -> str:
  """A concrete compute dtype: "auto" becomes "bfloat16" on GPUs, TPUs and
  CPUs with native bfloat16 matmuls, "float32" elsewhere.

  Without native support XLA's CPU backend widens bfloat16 operands to
  float32 around every matmul: no faster (the v* loop of a ROME edit on an
  AVX2 CPU: no gain, docs/benchmarks/edit_rome_cpu.json) and more memory
  (the widened copies and the custom backward's bfloat16 residuals: the v*
  loop's temporary buffers 629 MiB instead of 183 MiB on SmolLM2-135M,
  docs/benchmarks/vstar_memory_avx2.json).
  """
  if check_or_auto(name) != AUTO:
    return name
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return "bfloat16"
  return "bfloat16" if cpu_has_native_bfloat16(cpuinfo) else "float32"


def _contract_last(x, kernel_KxN):
  return jax.lax.dot_general(x, kernel_KxN, (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_matmul(x, kernel_KxN):
  """`x @ kernel` with bfloat16 inputs, float32 accumulation and output."""
  return _contract_last(x.astype(jnp.bfloat16), kernel_KxN.astype(jnp.bfloat16))


def _matmul_fwd(x, kernel_KxN):
  xb, kb = x.astype(jnp.bfloat16), kernel_KxN.astype(jnp.bfloat16)
  # Zero-size arrays carry the input dtypes (residuals must be arrays).
  return _contract_last(xb, kb), (xb, kb, jnp.zeros((0,), x.dtype),
                                  jnp.zeros((0,), kernel_KxN.dtype))


def _matmul_bwd(res, g):
  xb, kb, x_like, k_like = res
  gb = g.astype(jnp.bfloat16)
  dx = _contract_last(gb, kb.T).astype(x_like.dtype)
  # Unused cotangents (frozen weights) are removed by XLA's dead-code pass.
  batch = tuple(range(xb.ndim - 1))
  dk = jax.lax.dot_general(xb, gb, ((batch, batch), ((), ())),
                           preferred_element_type=jnp.float32).astype(k_like.dtype)
  return dx, dk


bf16_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _bfloat16_interceptor(next_fun, args, kwargs, context):
  module = context.module
  if isinstance(module, nn.Dense) and context.method_name == "__call__":
    params = module.variables["params"]
    y = bf16_matmul(args[0], params["kernel"])
    if "bias" in params:
      y = y + params["bias"].astype(jnp.float32)
    return y
  if isinstance(module, nn.Embed) and context.method_name == "attend":
    return bf16_matmul(args[0], module.variables["params"]["embedding"].T)
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def compute_dtype(name: str):
  """Runs Flax matmuls in `name` ("float32": unchanged) inside the block."""
  if check(name) == "float32":
    yield
    return
  with nn.intercept_methods(_bfloat16_interceptor):
    yield


def path_str(key_path) -> str:
  """A pytree key path as `layers_3/mlp/up_proj/kernel`."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(
      k, "idx", k)))) for k in key_path)


def layer_of(path: str) -> int | None:
  """`layers_3/...` or `h_3/...` -> 3; None for embeddings, final norms."""
  match = _LAYER.match(path)
  return None if match is None else int(match.group(1))


_to_bfloat16 = jax.jit(lambda x: x.astype(jnp.bfloat16))


def cast_kernels(params, name: str = "bfloat16", *, min_layer: int = 0,
                 max_layer: int | None = None):
  """Dense kernels of blocks in `[min_layer, max_layer]` rounded to `name`.

  Embeddings, norms and biases keep their dtype; a float32 `name` returns
  `params` itself. The result is a new pytree, `params` is not modified.
  """
  if check(name) == "float32":
    return params

  def cast(key_path, leaf):
    path = path_str(key_path)
    layer = layer_of(path)
    inside = layer is None or (layer >= min_layer and (
        max_layer is None or layer <= max_layer))
    if path.endswith("kernel") and np.ndim(leaf) == 2 and inside:
      return _to_bfloat16(leaf)
    return leaf
  return jax.tree_util.tree_map_with_path(cast, params)
