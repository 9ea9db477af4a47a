"""KV-cached generation and batched scoring against plain forward passes."""

import jax
import numpy as np
import pytest

from conftest import golden_dir
from keditjax import errors
from keditjax.models import load


def _greedy_reference(model, ids, steps):
  """Greedy decoding by recomputing the full forward pass every step."""
  ids = list(ids)
  out = []
  for _ in range(steps):
    logits = model.apply(model.params, np.array([ids]))
    nxt = int(np.argmax(logits[0, -1]))
    ids.append(nxt)
    out.append(nxt)
  return out


@pytest.mark.parametrize("name", ["llama_gqa_tied", "mistral_gqa",
                                  "qwen2_bias_untied"])
def test_cached_greedy_matches_recomputation(name):
  model = load("hf:" + golden_dir(name))
  prompts = [[5, 9, 17, 3, 44, 2, 90], [11, 12], [100, 3, 7, 7, 9]]
  got = model.generate(model.params, prompts, 6, return_ids=True,
                       stop_at_eos=False)
  for prompt, row in zip(prompts, got):
    assert row == _greedy_reference(model, prompt, 6)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_llama):
  m = tiny_llama
  prompt = [5, 9, 17, 3]
  a = m.generate(m.params, prompt, 8, temperature=1.0, seed=1, return_ids=True,
                 stop_at_eos=False)
  b = m.generate(m.params, prompt, 8, temperature=1.0, seed=1, return_ids=True,
                 stop_at_eos=False)
  c = m.generate(m.params, prompt, 8, temperature=1.0, seed=2, return_ids=True,
                 stop_at_eos=False)
  assert a == b and a != c
  greedy = m.generate(m.params, prompt, 8, return_ids=True, stop_at_eos=False)
  nucleus = m.generate(m.params, prompt, 8, temperature=1.0, top_p=1e-6,
                       seed=3, return_ids=True, stop_at_eos=False)
  assert nucleus == greedy


def test_score_matches_manual_log_softmax(tiny_llama):
  m = tiny_llama
  prompts = [[5, 9, 17], [1, 2, 3, 4, 5, 6], [8]]
  conts = [[3, 44, 2], [7], [9, 10]]
  got = m.score(m.params, prompts, conts, reduction="none", batch_size=2)
  for p, c, lp in zip(prompts, conts, got):
    logits = np.asarray(m.apply(m.params, np.array([p + c])))[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    want = [logp[len(p) - 1 + i, t] for i, t in enumerate(c)]
    np.testing.assert_allclose(lp, want, atol=1e-5)
  sums = m.score(m.params, prompts, conts)
  means = m.score(m.params, prompts, conts, reduction="mean")
  np.testing.assert_allclose(sums, [x.sum() for x in got], atol=1e-5)
  np.testing.assert_allclose(means, [x.mean() for x in got], atol=1e-5)


def test_score_rejects_bad_input(tiny_llama):
  m = tiny_llama
  with pytest.raises(errors.InputError, match="continuation 0"):
    m.score(m.params, [[1, 2]], [[]])
  with pytest.raises(errors.InputError, match="2 prompts but 1"):
    m.score(m.params, [[1], [2]], [[3]])
  with pytest.raises(errors.InputError, match="token ids"):
    m.apply(m.params, np.array([[1, 999]]))


def test_generate_refuses_to_run_past_max_positions(tiny_llama):
  m = tiny_llama
  with pytest.raises(errors.InputError, match="max_position_embeddings"):
    m.generate(m.params, [1, 2, 3], m.config.max_position_embeddings)


def test_nucleus_cutoff_equals_the_sorted_definition():
  import jax
  from keditjax.models import lm
  rng = np.random.default_rng(0)
  probs = jax.nn.softmax(rng.normal(size=(6, 500)) * np.arange(1, 7)[:, None] * 0.7)
  probs = np.asarray(probs)
  for top_p in (0.1, 0.5, 0.9, 0.999):
    cutoff = np.asarray(lm._nucleus_cutoff(probs, top_p))
    for row, c in zip(probs, cutoff):
      s = np.sort(row)[::-1]
      k = int(np.searchsorted(np.cumsum(s), top_p)) + 1  # smallest set reaching p
      np.testing.assert_array_equal(row >= c, row >= s[k - 1])
