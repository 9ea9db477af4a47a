"""Continuous batching of the v* loop: same result per request, fewer steps."""

import jax
import numpy as np
import pytest

from keditjax import editors
from keditjax.editors import base, compute
from keditjax.models.tiny import tiny_lm

NAMES = ("Ann", "Bo", "Cyrus", "Dee", "Eli", "Fay", "Gus", "Hal", "Ida", "Jo")
TARGETS = ("ox", "cat", "emu", "yak", "elk", "owl", "bee", "ant", "ape", "cod")
# The prompt ends with the subject, so δ reaches the first target token
# directly and the NLL moves within a few steps; one shape bucket for all,
# so with chunk=4 the ten requests are one pool of chunks 4 + 4 + 2 (the
# last padded with copies that never start).
REQUESTS = tuple({"prompt": f"Of {n}", "subject": n, "target_new": t}
                 for n, t in zip(NAMES, TARGETS))
TEMPLATES = ("{}", "A prefix. {}")
LAYER = 2
# Embeddings of std 1 make predictions movable; a large stop_loss makes
# requests stop at steps 0 to 3, or never (the NLL plateaus above it).
HP = compute.ValueHParams(steps=10, lr=0.5, weight_decay=0.0, kl_factor=0.01,
                          clamp_norm_factor=1e4, stop_loss=50.0)


@pytest.fixture(scope="module")
def model():
  return tiny_lm(4, 0, embed_std=1.0)


@pytest.fixture(scope="module")
def runs(model):
  requests = base.make_requests(list(REQUESTS))
  run = lambda continuous: compute.optimize_values(
      model, model.params, requests, TEMPLATES, layer=LAYER,
      site_kind="resid", hp=HP, chunk=4, continuous=continuous)
  return run(False), run(True), run


def test_continuous_equals_chunked_in_fewer_slot_steps(runs):
  chunked, continuous, run = runs
  # Requests stop at different steps, none within 1e-3 of the threshold
  # (so float rounding cannot move a stop).
  assert len(set(chunked["steps"].tolist())) >= 3
  history = chunked["nll_history"][~np.isnan(chunked["nll_history"])]
  assert np.abs(history - HP.stop_loss).min() > 1e-3
  np.testing.assert_array_equal(continuous["steps"], chunked["steps"])
  for key in ("delta", "v0", "loss", "nll", "nll_history"):
    np.testing.assert_allclose(continuous[key], chunked[key], rtol=1e-5,
                               atol=1e-6, err_msg=key)
  assert chunked["segments"] == 3
  assert chunked["slot_steps"] == chunked["chunked_slot_steps"]
  assert continuous["chunked_slot_steps"] == chunked["slot_steps"]
  assert continuous["segments"] > 3
  assert continuous["slot_steps"] < chunked["slot_steps"]
  # Each slot-step beyond the requests' own passes is an idle slot.
  assert continuous["slot_steps"] >= int(np.sum(chunked["steps"] + 1))
  n = compute._segment._cache_size()  # pylint: disable=protected-access
  again = run(True)  # refills take traced slot indices: no recompiles
  assert compute._segment._cache_size() == n  # pylint: disable=protected-access
  np.testing.assert_array_equal(again["delta"], continuous["delta"])


def test_late_refill_counts_adam_steps_per_slot(model, runs):
  _, continuous, _ = runs
  # Request 7 is in the second chunk: it enters a slot after another
  # request stopped there, with its own Adam count starting at zero (a
  # count shared with the pool would change its bias correction).
  alone = compute.optimize_values(
      model, model.params, base.make_requests([REQUESTS[7]]), TEMPLATES,
      layer=LAYER, site_kind="resid", hp=HP)
  assert alone["steps"][0] == continuous["steps"][7] > 1
  np.testing.assert_allclose(continuous["delta"][7], alone["delta"][0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(continuous["nll_history"][7],
                             alone["nll_history"][0], rtol=1e-5)


def test_memit_continuous_and_chunked_write_the_same_params(model):
  rng = np.random.default_rng(0)
  covs = {}
  for layer in (1, LAYER):
    x = rng.normal(size=(512, 128))
    covs[layer] = (x.T @ x / len(x)).astype(np.float32)
  params = {}
  for continuous in (True, False):
    editor = editors.get(
        "memit", layers=(1, LAYER), mom2_update_weight=1.0, v_chunk=4,
        v_continuous=continuous, v_steps=HP.steps, v_lr=HP.lr,
        v_weight_decay=HP.weight_decay, kl_factor=HP.kl_factor,
        clamp_norm_factor=HP.clamp_norm_factor, v_stop_loss=HP.stop_loss,
        v_compute_dtype="float32")
    assert editor.hparams.value_hparams() == HP  # shares runs' compilations
    state = editor.init(model, covariance=covs, templates=TEMPLATES)
    params[continuous], _, info = editor.apply(model, model.params,
                                               list(REQUESTS), state)
    assert len(info.extras["steps"]) == len(REQUESTS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params[True], params[False])
  assert editors.hparams_class("alphaedit")().v_continuous
