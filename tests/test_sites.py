"""Named edit sites: capture, patch, jit/grad/vmap, and the site -> leaf map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_arrays
from keditjax import errors
from keditjax.models import Patch, Sites, capture, patch
from keditjax.models.hf import flatten


def _leaf(params, path):
  for part in path:
    params = params[part]
  return params


def test_value_is_key_times_mapped_kernel(tiny_llama):
  m = tiny_llama
  tokens = golden_arrays("llama_gqa_tied")["input_ids"]
  for layer in range(m.config.num_layers):
    _, out = m.apply(m.params, tokens, sites=capture(
        f"layer/{layer}/mlp/key", f"layer/{layer}/mlp/value"))
    kernel = _leaf(m.params, m.site_param(f"layer/{layer}/mlp/value"))
    np.testing.assert_allclose(out[f"layer/{layer}/mlp/key"] @ kernel,
                               out[f"layer/{layer}/mlp/value"], atol=1e-5)


def test_capture_positions_gathers_rows(tiny_llama):
  m = tiny_llama
  tokens = golden_arrays("llama_gqa_tied")["input_ids"]
  _, full = m.apply(m.params, tokens, sites=capture("layer/1/resid"))
  pos = np.array([[3], [5]])
  _, some = m.apply(m.params, tokens, sites=capture("layer/1/resid",
                                                    positions=pos))
  np.testing.assert_allclose(some["layer/1/resid"][:, 0],
                             full["layer/1/resid"][[0, 1], [3, 5]], atol=1e-6)


def test_additive_patch_adds_exactly_its_delta(tiny_llama):
  m = tiny_llama
  tokens = golden_arrays("llama_gqa_tied")["input_ids"]
  name = "layer/0/mlp/value"
  delta = np.random.RandomState(0).randn(m.config.hidden_size).astype(np.float32)
  _, before = m.apply(m.params, tokens, sites=capture(name))
  sites = Sites(patches={name: Patch(delta, positions=np.array([4]))},
                capture=(name,))
  logits, after = m.apply(m.params, tokens, sites=sites)
  diff = np.array(after[name] - before[name])
  np.testing.assert_allclose(diff[:, 4], np.broadcast_to(delta, diff[:, 4].shape),
                             atol=1e-5)
  diff[:, 4] = 0
  assert np.abs(diff).max() == 0
  # Earlier positions are causally unaffected; later ones change.
  base = m.apply(m.params, tokens)
  np.testing.assert_allclose(logits[:, :4], base[:, :4], atol=1e-6)
  assert np.abs(np.asarray(logits[:, 4:] - base[:, 4:])).max() > 1e-4


def test_replace_patch_sets_value(tiny_llama):
  m = tiny_llama
  tokens = golden_arrays("llama_gqa_tied")["input_ids"]
  name = "layer/1/attn/out"
  value = np.ones((2, 1, m.config.hidden_size), np.float32) * 0.5
  _, out = m.apply(m.params, tokens, sites=Sites(
      patches={name: Patch(value, np.array([[2], [6]]), mode="replace")},
      capture=(name,)))
  np.testing.assert_allclose(out[name][0, 2], 0.5)
  np.testing.assert_allclose(out[name][1, 6], 0.5)


def test_zero_patch_is_identity_and_embed_site(tiny_llama):
  m = tiny_llama
  tokens = golden_arrays("llama_gqa_tied")["input_ids"]
  base = m.apply(m.params, tokens)
  logits, out = m.apply(m.params, tokens, sites=Sites(
      patches={"embed": Patch(jnp.zeros(m.config.hidden_size))},
      capture=("embed",)))
  np.testing.assert_allclose(logits, base, atol=1e-6)
  table = _leaf(m.params, m.site_param("embed"))
  np.testing.assert_allclose(out["embed"], np.asarray(table)[tokens], atol=1e-6)


def test_gradient_wrt_patch_matches_finite_differences(tiny_llama):
  m = tiny_llama
  tokens = golden_arrays("llama_gqa_tied")["input_ids"][:1]
  target = 7

  def loss(delta_D):
    logits, _ = m.apply(m.params, tokens, sites=patch(
        "layer/0/mlp/value", delta_D, positions=jnp.array([3])))
    return -jax.nn.log_softmax(logits[0, -1])[target]

  delta = jnp.asarray(np.random.RandomState(1).randn(m.config.hidden_size) * 0.1,
                      jnp.float32)
  grad = jax.jit(jax.grad(loss))(delta)
  eps = 1e-2
  rng = np.random.RandomState(2)
  for _ in range(3):
    direction = jnp.asarray(rng.randn(m.config.hidden_size), jnp.float32)
    direction /= jnp.linalg.norm(direction)
    numeric = (loss(delta + eps * direction) - loss(delta - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(grad @ direction), float(numeric),
                               rtol=2e-2, atol=2e-3)


def test_vmap_over_patch_values(tiny_llama):
  m = tiny_llama
  tokens = golden_arrays("llama_gqa_tied")["input_ids"][:1]
  deltas = jnp.asarray(np.random.RandomState(3).randn(3, m.config.hidden_size),
                       jnp.float32)

  def last_logits(delta):
    logits, _ = m.apply(m.params, tokens, sites=patch("layer/1/resid", delta))
    return logits[0, -1]

  batched = jax.vmap(last_logits)(deltas)
  for i in range(3):
    np.testing.assert_allclose(batched[i], last_logits(deltas[i]), atol=1e-5)


def test_jit_does_not_recompile_for_new_deltas(tiny_llama):
  from keditjax.models.lm import forward
  m = tiny_llama
  tokens = jnp.asarray(golden_arrays("llama_gqa_tied")["input_ids"])
  sites = lambda d: patch("layer/0/mlp/value", d, positions=jnp.array([1]))
  forward(m.config, m.params, tokens, None, None, sites(jnp.zeros(64)))
  before = forward._cache_size()
  for scale in (1.0, 2.0, 3.0):
    forward(m.config, m.params, tokens, None, None, sites(jnp.ones(64) * scale))
  assert forward._cache_size() == before


def test_site_to_parameter_map(tiny_llama):
  m = tiny_llama
  assert m.site_param("layer/1/mlp/value") == ("layers_1", "mlp", "down_proj", "kernel")
  assert m.site_param("layer/0/attn/out") == ("layers_0", "self_attn", "o_proj", "kernel")
  assert m.site_param("embed") == ("embed_tokens", "embedding")
  paths = set(flatten(m.params))
  for name in m.site_names():
    if not name.endswith(("resid", "mlp/in")):
      assert "/".join(m.site_param(name)) in paths
  for site in ("layer/0/resid", "layer/0/mlp/in"):
    with pytest.raises(errors.SiteError, match="no single parameter"):
      m.site_param(site)


@pytest.mark.parametrize("name", ["layer/9/mlp/key", "layer/0/mlp/keys",
                                  "mlp/value", "layer/-1/resid"])
def test_unknown_sites_are_refused(tiny_llama, name):
  m = tiny_llama
  tokens = golden_arrays("llama_gqa_tied")["input_ids"]
  with pytest.raises(errors.SiteError, match="site|layer"):
    m.apply(m.params, tokens, sites=capture(name))


def test_bad_patch_mode():
  with pytest.raises(errors.SiteError, match="mode"):
    Patch(np.zeros(3), mode="multiply")
