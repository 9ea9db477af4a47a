"""Knowledge-neurons editor (Dai et al. 2022) on the tiny golden models."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend, models, pre_tokenizers

from conftest import golden_dir
from keditjax import editors, errors
from keditjax.editors import base
from keditjax.editors import knowledge_neurons as kn
from keditjax.models import Patch, Sites, capture, load
from keditjax.models.lm import LanguageModel
from keditjax.models.tokenizer import Tokenizer

PROMPT = "t5 t17 t40 t41 t3"
REQUEST = {"prompt": PROMPT, "subject": "t40 t41", "target_new": "t20",
           "ground_truth": "t21", "case_id": 7}
# One jit shape for every test: 2 layers x steps rows in chunks of 64.
FAST = dict(steps=16, batch_size=64)


def _word_model(name):
  """A golden tiny model with a word-level tokenizer: "t{i}" is token i."""
  m = load("hf:" + golden_dir(name))
  backend = Backend(models.WordLevel(
      {f"t{i}": i for i in range(m.config.vocab_size)}, unk_token="t0"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return LanguageModel(m.config, m.params, Tokenizer(backend))


@pytest.fixture(scope="module")
def model():
  return _word_model("llama_gqa_tied")


def _ids(model, text=PROMPT):
  return model.tokenizer.encode(text)


def _leaf(params, path):
  return base.get_leaf(params, path)


def _last_probs(model, params, text=PROMPT, sites=None):
  tokens = np.asarray([_ids(model, text)], np.int32)
  out = model.apply(params, tokens, sites=sites)
  logits = out[0] if sites is not None else out
  return np.asarray(jax.nn.softmax(logits[0, -1]))


def test_cached_last_token_pass_matches_full_forward(model):
  c = model.config
  ids = _ids(model)
  probs, keys = kn.next_token_probs(c, model.params, ids, range(c.num_layers))
  names = [f"layer/{l}/mlp/key" for l in range(c.num_layers)]
  logits, out = model.apply(model.params, np.asarray([ids], np.int32),
                            sites=capture(*names))
  np.testing.assert_allclose(probs, jax.nn.softmax(logits[0, -1]), atol=1e-6)
  np.testing.assert_allclose(keys, np.stack([out[n][0, -1] for n in names]),
                             atol=1e-5, rtol=1e-5)


def test_integrated_gradients_completeness(model):
  """Per layer, sum_i Attr_i ≈ P(x) - P(layer zeroed at the last token)."""
  c, ids, answer = model.config, _ids(model), 21
  layers = tuple(range(c.num_layers))
  coarse, _ = kn.attribution_scores(c, model.params, ids, answer, layers,
                                    steps=8, batch_size=64)
  fine, details = kn.attribution_scores(c, model.params, ids, answer, layers,
                                        steps=128, batch_size=64)
  p_x = details["prob"]
  np.testing.assert_allclose(p_x, _last_probs(model, model.params)[answer],
                             rtol=1e-5)
  last = np.array([len(ids) - 1])
  for j, l in enumerate(layers):
    zeroed = Sites(patches={f"layer/{l}/mlp/key": Patch(
        jnp.zeros(c.intermediate_size), last, mode="replace")})
    p_base = _last_probs(model, model.params, sites=zeroed)[answer]
    delta = p_x - p_base
    assert abs(delta) > 1e-5
    # A right Riemann sum errs by O(1/m): 16x the steps, ~16x less error.
    err_fine = abs(fine[j].sum() - delta)
    err_coarse = abs(coarse[j].sum() - delta)
    assert err_fine < 0.06 * abs(delta), (l, fine[j].sum(), delta)
    assert err_fine < err_coarse / 8, (l, err_fine, err_coarse)


def _plant(model, layer, neuron, answer):
  """A copy of the params where `neuron` alone writes `answer` at PROMPT."""
  c, ids = model.config, _ids(model)
  tokens = np.asarray([ids], np.int32)
  before = "embed" if layer == 0 else f"layer/{layer - 1}/resid"
  _, out = model.apply(model.params, tokens, sites=capture(
      before, f"layer/{layer}/attn/out"))
  # The MLP input at the last token: RMSNorm(residual + attention output).
  x = np.asarray(out[before][0, -1] + out[f"layer/{layer}/attn/out"][0, -1],
                 np.float64)
  scale = np.asarray(model.params[f"layers_{layer}"]["post_attention_layernorm"]
                     ["scale"], np.float64)
  h = x / np.sqrt(np.mean(x ** 2) + c.norm_eps) * scale
  params = jax.tree.map(np.array, model.params)
  mlp = params[f"layers_{layer}"]["mlp"]
  mlp["gate_proj"]["kernel"][:, neuron] = 4.0 * h / (h @ h)   # gate = 4
  mlp["up_proj"]["kernel"][:, neuron] = 4.0 * h / (h @ h)     # up = 4
  e = params["embed_tokens"]["embedding"][answer]
  mlp["down_proj"]["kernel"][neuron] = 3.0 * e / (e @ e)
  return jax.tree.map(jnp.asarray, params)


def test_planted_knowledge_neuron_is_ranked_first(model):
  layer, neuron, answer = 0, 37, 21
  params = _plant(model, layer, neuron, answer)
  assert _last_probs(model, params)[answer] > 0.5  # the planted fact holds
  assert _last_probs(model, model.params)[answer] < 0.05
  layers = tuple(range(model.config.num_layers))
  scores, _ = kn.attribution_scores(model.config, params, _ids(model), answer,
                                    layers, **FAST)
  neurons, _ = kn.select_neurons([scores], layers, 0.2, 0.5, None)
  assert neurons[0][:2] == (layer, neuron)
  flat = np.sort(scores.ravel())[::-1]
  assert flat[0] > 5 * flat[1]
  # The editor finds it too, and its row is the one edited.
  editor = editors.get("kn", max_neurons=1, **FAST)
  _, _, info = editor.apply(model, params, REQUEST, editor.init(model))
  assert info.extras["requests"][0]["neurons"][0][:2] == (layer, neuron)


def test_select_neurons_threshold_and_sharing():
  layers = (3, 5)
  a = np.array([[1.0, 0.1, 0.5], [0.0, 0.3, -2.0]])
  b = np.array([[0.2, 0.0, 1.0], [0.0, 0.9, 0.0]])
  # Coarse (t = 0.25): a -> (3,0),(3,2),(5,1); b -> (3,2),(5,1).
  neurons, coarse = kn.select_neurons([a, b], layers, 0.25, 1.0, None)
  assert coarse == [3, 2]
  assert [n[:2] for n in neurons] == [(3, 2), (5, 1)]
  np.testing.assert_allclose([n[2] for n in neurons], [0.75, 0.6])
  neurons, _ = kn.select_neurons([a, b], layers, 0.25, 0.5, 2)
  assert [n[:2] for n in neurons] == [(3, 2), (3, 0)]


@pytest.mark.parametrize("scale_by_value_norm", [False, True])
def test_edit_changes_only_selected_rows_by_documented_amounts(
    model, scale_by_value_norm):
  params = model.params
  snapshot = jax.tree.map(np.array, params)
  editor = editors.get("kn", max_neurons=3, lambda_erase=1.5, lambda_add=4.0,
                       scale_by_value_norm=scale_by_value_norm, **FAST)
  state = editor.init(model)
  new, state2, info = editor.apply(model, params, [REQUEST], state)
  assert state2 is state
  # Inputs untouched, bit for bit.
  jax.tree.map(np.testing.assert_array_equal, snapshot,
               jax.tree.map(np.asarray, params))
  # Same structure and dtypes: valid input to any other editor.
  assert jax.tree.structure(new) == jax.tree.structure(params)
  assert jax.tree.map(lambda x: x.dtype, new) == \
      jax.tree.map(lambda x: x.dtype, params)
  report = info.extras["requests"][0]
  neurons, signs = report["neurons"], report["signs"]
  assert 1 <= len(neurons) <= 3 and report["old_source"] == "target_true"
  assert (report["old_token"], report["new_token"]) == (21, 20)
  # Signs follow the neurons' activations on the edit prompt.
  _, keys = kn.next_token_probs(model.config, params, _ids(model), (0, 1))
  assert signs == [1.0 if keys[l, i] >= 0 else -1.0 for l, i, _ in neurons]
  emb = np.asarray(_leaf(params, state.embed_path))
  expected = {}
  for (l, i, _), sign in zip(neurons, signs):
    row = np.asarray(_leaf(params, state.value_paths[l]))[i]
    erase, add = 1.5, 4.0
    if scale_by_value_norm:
      erase *= np.linalg.norm(row) / np.linalg.norm(emb[21])
      add *= np.linalg.norm(row) / np.linalg.norm(emb[20])
    expected[(l, i)] = row + sign * (add * emb[20] - erase * emb[21])
  changed_paths = {"/".join(state.value_paths[l]) for l, _, _ in neurons}
  assert set(info.changed) == changed_paths
  old_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
    name = "/".join(k.key for k in path)
    if name not in changed_paths:
      assert leaf is old_leaves[path], name  # shared, not copied
      continue
    layer = int(name.split("/")[0].split("_")[1])
    new_k, old_k = np.asarray(leaf), np.asarray(old_leaves[path])
    for i in range(new_k.shape[0]):
      if (layer, i) in expected:
        np.testing.assert_allclose(new_k[i], expected[(layer, i)], rtol=1e-6,
                                   atol=1e-6)
      else:
        np.testing.assert_array_equal(new_k[i], old_k[i])
  # The edit works on this model: P(new) rises, and beats P(true).
  before = model.score(params, [PROMPT] * 2, [" t20", " t21"])
  after = model.score(new, [PROMPT] * 2, [" t20", " t21"])
  assert after[0] > before[0] and after[0] > after[1]
  assert set(info.seconds) >= {"attribution", "select", "edit"}


def test_missing_target_true_uses_greedy_token_and_batches(model):
  greedy = int(np.argmax(_last_probs(model, model.params)))
  second = {"prompt": "t9 t40 t41 t2 t3 t4", "subject": "t40 t41",
            "target_new": "t30", "target_true": "t31", "case_id": 8}
  request = base.Request("t5 t17 {} t3", "t40 t41", "t20", None, case_id=1)
  editor = editors.get("kn", **FAST)
  state = editor.init(model)
  new, _, info = editor.apply(model, model.params, [request, second], state)
  first, other = info.extras["requests"]
  assert (first["old_source"], first["old_token"]) == ("greedy", greedy)
  assert other["old_source"] == "target_true" and other["old_token"] == 31
  after = model.score(new, [PROMPT, second["prompt"]], [" t20", " t30"])
  before = model.score(model.params, [PROMPT, second["prompt"]],
                       [" t20", " t30"])
  assert np.all(after > before)


def test_no_recompile_for_a_new_request_in_the_same_bucket(model):
  editor = editors.get("kn", **FAST)
  state = editor.init(model)
  editor.apply(model, model.params, REQUEST, state)
  sizes = (kn._ig_rows._cache_size(), kn._prefix_cache._cache_size())
  other = dict(REQUEST, prompt="t1 t2 t40 t41 t8 t9 t10", target_new="t50")
  editor.apply(model, model.params, other, state)
  assert (kn._ig_rows._cache_size(), kn._prefix_cache._cache_size()) == sizes


class _CountingTokenizer:
  """Tokenizes like the word model, but maps "empty" to no tokens."""

  def __init__(self, inner):
    self.inner = inner

  def encode(self, text):
    return [] if text.strip() == "empty" else self.inner.encode(text)


def test_bad_input_is_refused_before_any_work(model, monkeypatch):
  def no_work(*args, **kwargs):
    raise AssertionError("work started before validation")
  monkeypatch.setattr(kn, "next_token_probs", no_work)
  monkeypatch.setattr(kn, "attribution_scores", no_work)
  editor = editors.get("kn", **FAST)
  state = editor.init(model)
  good = REQUEST
  for bad in ([good, dict(good, subject="")],                 # empty subject
              [good, dict(good, target_new="  ")],            # empty target
              [good, dict(good, subject="t99")],              # not in prompt
              [good, 42], 42, []):
    with pytest.raises(errors.InputError):
      editor.apply(model, model.params, bad, state)
  tokless = copy.copy(model)
  tokless.tokenizer = _CountingTokenizer(model.tokenizer)
  for bad in (dict(good, subject="t41", target_new="empty"),  # no conflict
              dict(good, ground_truth="empty")):
    with pytest.raises(errors.InputError, match="tokenizes to nothing"):
      editor.apply(tokless, model.params, [good, bad], state)
  long = dict(good, prompt=" ".join(["t1"] * 70) + " t40 t41")
  with pytest.raises(errors.InputError, match="max_position_embeddings"):
    editor.apply(model, model.params, long, state)
  with pytest.raises(errors.ConfigError, match="out of range"):
    editors.get("kn", layers=(0, 2)).init(model)
  with pytest.raises(errors.ConfigError, match="out of range"):
    editors.get("kn", layers=(5,)).apply(model, model.params, good, state)
  for field, value in (("steps", 0), ("threshold", 1.5),
                       ("share_fraction", 0.0), ("max_neurons", 0),
                       ("batch_size", 0), ("layers", [0])):
    with pytest.raises(errors.ConfigError, match=field):
      editors.get("kn", **{field: value})
  with pytest.raises(errors.ConfigError):
    editors.get("kn", no_such_field=1)


def test_hparams_are_frozen_and_hashable():
  h = editors.hparams_class("kn")()
  assert isinstance(h, kn.KnowledgeNeuronsHParams)
  assert hash(h) == hash(kn.KnowledgeNeuronsHParams())
  with pytest.raises(dataclasses.FrozenInstanceError):
    h.steps = 3
  assert (h.steps, h.threshold) == (20, 0.2)
  editor = editors.get("kn")
  assert editor.name == "kn" and editor.hparams == h


def test_gpt2_names_through_site_params():
  """Another architecture: the edit lands on h_{l}/mlp/c_proj/kernel rows."""
  model = _word_model("gpt2")
  editor = editors.get("kn", layers=(1,), max_neurons=2, **FAST)
  state = editor.init(model)
  new, _, info = editor.apply(model, model.params, REQUEST, state)
  assert list(info.changed) == ["h_1/mlp/c_proj/kernel"]
  rows = np.nonzero(np.any(np.asarray(new["h_1"]["mlp"]["c_proj"]["kernel"]) !=
                           np.asarray(model.params["h_1"]["mlp"]["c_proj"]
                                      ["kernel"]), axis=1))[0]
  assert sorted(rows) == sorted(i for _, i, _ in
                                info.extras["requests"][0]["neurons"])
