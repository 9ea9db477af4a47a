"""bfloat16 matmuls (forward and backward) and the scanned v* loop."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import errors
from keditjax.editors import base, compute
from keditjax.models import lm, precision
from tests.conftest import make_tiny_lm


def test_bf16_matmul_value_and_gradients_match_float32():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(64, 32)) / 8, jnp.float32)
  f = lambda x, k: jnp.sum(jnp.tanh(precision.bf16_matmul(x, k)))
  g = lambda x, k: jnp.sum(jnp.tanh(x @ k))
  assert precision.bf16_matmul(x, k).dtype == jnp.float32
  np.testing.assert_allclose(f(x, k), g(x, k), rtol=2e-2)
  for got, want in zip(jax.grad(f, (0, 1))(x, k), jax.grad(g, (0, 1))(x, k)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=3e-2 * np.abs(want).max())
  # Forward and backward matmuls both take bfloat16 operands (the weight
  # gradient, not asked for here, is not computed).
  hlo = jax.jit(jax.grad(f)).lower(x, k).as_text()
  dots = [l for l in hlo.splitlines() if "dot_general" in l]
  both_bf16 = re.compile(r"\(tensor<[0-9x]+xbf16>, tensor<[0-9x]+xbf16>\)")
  assert len(dots) == 2 and all(both_bf16.search(d) for d in dots)


def test_compute_dtype_context_and_cast_kernels():
  model = make_tiny_lm(num_layers=3, seed=0)
  c, p = model.config, model.params
  tokens = jnp.asarray(np.arange(12).reshape(2, 6) % c.vocab_size, jnp.int32)
  full, _, _ = lm.run(c, p, tokens)
  cast = precision.cast_kernels(p, max_layer=1)
  leaves = {precision.path_str(kp): v
            for kp, v in jax.tree_util.tree_leaves_with_path(cast)}
  assert leaves["layers_1/mlp/up_proj/kernel"].dtype == jnp.bfloat16
  assert leaves["layers_2/mlp/up_proj/kernel"].dtype == jnp.float32
  assert leaves["embed_tokens/embedding"].dtype == jnp.float32
  jax.tree.map(lambda a: a.dtype == jnp.float32 or pytest.fail(), p)
  with precision.compute_dtype("bfloat16"):
    low, _, _ = lm.run(c, cast, tokens)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, full, atol=5e-2 * np.abs(full).max())
  assert precision.cast_kernels(p, "float32") is p
  with pytest.raises(errors.ConfigError, match="compute_dtype"):
    precision.check("float16")


@pytest.mark.parametrize("variant", [dict(scan_layers=True),
                                     dict(compute_dtype="bfloat16")])
def test_value_loop_variants_agree_with_the_default(variant):
  model = make_tiny_lm(num_layers=4, seed=1)
  request = base.make_request({"prompt": "The capital of Norway is",
                               "subject": "Norway", "target_new": "Rome"})
  # The unrolled loop is the reference (scanned prefill and v* blocks are
  # the default).
  hp = compute.ValueHParams(steps=4, lr=0.1, weight_decay=0.0,
                            clamp_norm_factor=1e4, scan_layers=False)
  run = lambda hp: compute.optimize_values(
      model, model.params, [request], ("{}", "A prefix. {}"), layer=1,
      site_kind="resid", hp=hp)
  want, got = run(hp), run(dataclasses.replace(hp, **variant))
  tol = 1e-4 if "scan_layers" in variant else 5e-2
  np.testing.assert_allclose(got["nll_history"], want["nll_history"],
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(got["delta"], want["delta"],
                             atol=tol * np.abs(want["delta"]).max() * 4)
