"""Partial forward passes: layer spans, hidden inputs, logit positions, cache."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax.models import layers, load, lm, sites
from tests.conftest import golden_dir


@pytest.fixture(scope="module", params=["llama_gqa_tied", "gpt2", "gptj"])
def model(request):
  return load("hf:" + golden_dir(request.param))


def test_span_composition_equals_full_pass(model):
  c, p = model.config, model.params
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size,
                                                         (2, 9)), jnp.int32)
  full, _, _ = lm.run(c, p, tokens)
  mid = c.num_layers // 2
  hidden, _, _ = lm.run(c, p, tokens, stop_layer=mid)
  rest, _, _ = lm.run(c, p, hidden=hidden, start_layer=mid)
  np.testing.assert_allclose(rest, full, atol=2e-5, rtol=1e-4)
  # The residual capture at block mid-1 is the partial pass's output.
  _, out = lm.forward(c, p, tokens,
                      sites=sites.capture(f"layer/{mid - 1}/resid"))
  np.testing.assert_allclose(out[f"layer/{mid - 1}/resid"], hidden,
                             atol=2e-5, rtol=1e-4)
  pos = jnp.array([[1, 8], [0, 3]])
  picked, _, _ = lm.run(c, p, tokens, logit_positions=pos)
  np.testing.assert_allclose(picked, np.take_along_axis(
      np.asarray(full), np.asarray(pos)[..., None], axis=1), atol=2e-5, rtol=1e-4)


def test_suffix_over_prefix_cache_equals_full_pass(model):
  """Prefix in the cache, suffix from a middle block: the editors' fast path."""
  c, p = model.config, model.params
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, 10)), jnp.int32)
  full, _, _ = lm.run(c, p, tokens)
  cache = layers.init_cache(c, 2, 10)
  _, _, cache = lm.run(c, p, tokens[:, :6], cache=cache)
  mid = 1
  hidden, _, _ = lm.run(c, p, tokens[:, 6:], stop_layer=mid, cache=cache)
  logits, _, _ = lm.run(c, p, hidden=hidden, start_layer=mid, cache=cache)
  np.testing.assert_allclose(logits, full[:, 6:], atol=2e-5, rtol=1e-4)


def test_bad_span_is_refused(model):
  with pytest.raises(ValueError, match="outside"):
    lm.run(model.config, model.params, jnp.zeros((1, 3), jnp.int32),
           stop_layer=model.config.num_layers + 1)


def test_scanned_blocks_equal_unrolled_pass(model):
  """`run_scanned` (one traced block under `lax.scan`) equals `run`."""
  c, p = model.config, model.params
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, 10)), jnp.int32)
  mask = jnp.asarray(np.array([[1] * 10, [0, 0] + [1] * 8]), jnp.int32)
  full, _, _ = lm.run(c, p, tokens, attention_mask=mask)
  cache = layers.init_cache(c, 2, 10)
  _, _, cache = lm.run(c, p, tokens[:, :6], attention_mask=mask[:, :6],
                       cache=cache)
  hidden, _, _ = lm.run(c, p, tokens[:, 6:], attention_mask=mask[:, 6:],
                        stop_layer=1, cache=cache)
  pos = jnp.array([[0, 3], [2, 1]])
  logits = lm.run_scanned(c, p, hidden, start_layer=1, cache=cache,
                          attention_mask=mask[:, 6:], logit_positions=pos)
  want = np.take_along_axis(np.asarray(full[:, 6:]),
                            np.asarray(pos)[..., None], axis=1)
  np.testing.assert_allclose(logits, want, atol=2e-5, rtol=1e-4)
  # Without a cache, from block 0's input.
  emb, _, _ = lm.run(c, p, tokens, stop_layer=0, attention_mask=mask)
  np.testing.assert_allclose(
      lm.run_scanned(c, p, emb, start_layer=0, attention_mask=mask), full,
      atol=2e-5, rtol=1e-4)


def test_scanned_prefill_fills_the_cache_as_the_unrolled_pass(model):
  """`prefill_scanned` writes the same KV cache as `run`, and the suffix
  pass on it gives the full pass's logits."""
  c, p = model.config, model.params
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, 9)), jnp.int32)
  mask = jnp.asarray(np.array([[1] * 9, [0, 0, 0] + [1] * 6]), jnp.int32)
  _, _, want = lm.run(c, p, tokens[:, :5], attention_mask=mask[:, :5],
                      cache=layers.init_cache(c, 2, 9))
  got = jax.jit(lambda t, m, k: lm.prefill_scanned(
      c, p, t, attention_mask=m, cache=k))(tokens[:, :5], mask[:, :5],
                                           layers.init_cache(c, 2, 9))
  assert len(got["layers"]) == c.num_layers and int(got["index"]) == 5
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=1e-4)
  full, _, _ = lm.run(c, p, tokens, attention_mask=mask)
  rest, _, _ = lm.run(c, p, tokens[:, 5:], attention_mask=mask[:, 5:],
                      cache=got)
  np.testing.assert_allclose(rest, full[:, 5:], atol=2e-5, rtol=1e-4)


def test_blocks_stacked_outside_give_the_same_pass(model):
  """`blocks` stacked by the caller (read in place by the scan) and a
  prefill that scans only from `scan_from` give the passes above."""
  c, p = model.config, model.params
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, 9)), jnp.int32)
  mask = jnp.asarray(np.array([[1] * 9, [0, 0] + [1] * 7]), jnp.int32)
  _, _, want = lm.run(c, p, tokens[:, :5], attention_mask=mask[:, :5],
                      cache=layers.init_cache(c, 2, 9))
  for scan_from in range(c.num_layers + 1):
    blocks = (lm.stack_blocks(c, p, scan_from)["params"]
              if scan_from < c.num_layers else None)
    got = jax.jit(lambda t, m, k, b, s=scan_from: lm.prefill_scanned(
        c, p, t, attention_mask=m, cache=k, scan_from=s, blocks=b))(
            tokens[:, :5], mask[:, :5], layers.init_cache(c, 2, 9), blocks)
    assert int(got["index"]) == 5
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=1e-4)
  full, _, _ = lm.run(c, p, tokens, attention_mask=mask)
  hidden, _, _ = lm.run(c, p, tokens[:, 5:], attention_mask=mask[:, 5:],
                        stop_layer=1, cache=want)
  logits = lm.run_scanned(c, p, hidden, start_layer=1, cache=want,
                          attention_mask=mask[:, 5:],
                          blocks=lm.stack_blocks(c, p, 1)["params"])
  np.testing.assert_allclose(logits, full[:, 5:], atol=2e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="layers"):  # blocks of another span
    lm.run_scanned(c, p, hidden, start_layer=1, cache=want,
                   blocks=lm.stack_blocks(c, p, 0)["params"])
