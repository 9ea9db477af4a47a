"""GRACE: the deferral rule, split/expand, exact removal, purity, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import editors, errors
from keditjax.editors import base, grace
from keditjax.models import adapters
from tests.conftest import make_tiny_lm


def _book(keys, values, eps, active=None, labels=None):
  keys = np.asarray(keys, np.float32)
  n = len(keys)
  return {"keys": jnp.asarray(keys), "values": jnp.asarray(values, jnp.float32),
          "eps": jnp.asarray(eps, jnp.float32),
          "labels": jnp.asarray(labels or [0] * n, jnp.int32),
          "active": jnp.asarray(active or [1] * n, jnp.int32)}


BOOK = _book(keys=[[0, 0, 0], [10, 0, 0], [0, 10, 0]],
             values=[[1, 1], [2, 2], [3, 3]], eps=[1.0, 1.0, 1.0],
             active=[1, 1, 0])


def _lookup(queries_L, replacement="replace_last", book=BOOK):
  q = jnp.asarray([queries_L], jnp.float32)
  x = jnp.full((1, len(queries_L), 2), -1.0)
  out = grace.codebook_lookup(book, x, {"mlp/key": q}, replacement=replacement)
  return np.asarray(out)[0]


def test_deferral_rule_inside_and_outside_eps():
  out = _lookup([[0.5, 0, 0],      # inside key 0's ε -> its value
                 [0, 0, 1.01],     # just outside key 0's ε -> unchanged
                 [9.2, 0.5, 0],    # nearest is key 1, inside -> value 1
                 [0, 10, 0],       # on key 2, but key 2 is inactive
                 [5, 0, 0]])       # between keys, outside both
  np.testing.assert_array_equal(out, [[1, 1], [-1, -1], [2, 2], [-1, -1],
                                      [-1, -1]])


def test_nearest_key_decides_even_when_a_farther_radius_is_larger():
  book = _book(keys=[[0, 0, 0], [3, 0, 0]], values=[[1, 1], [2, 2]],
               eps=[0.5, 10.0])
  # Nearest is key 0 (distance 1 > its ε 0.5): no replacement, although
  # key 1's large radius would cover the query.
  np.testing.assert_array_equal(_lookup([[1, 0, 0]], book=book), [[-1, -1]])


def test_replacement_modes():
  queries = [[5, 5, 5], [0, 0, 0.1], [5, 5, 5], [10, 0, 0.2], [5, 5, 5]]
  np.testing.assert_array_equal(
      _lookup(queries, "replace_last"),
      [[-1, -1], [1, 1], [-1, -1], [2, 2], [-1, -1]])
  # From the first hit on, the most recent hit's value.
  np.testing.assert_array_equal(
      _lookup(queries, "replace_all"),
      [[-1, -1], [1, 1], [1, 1], [2, 2], [2, 2]])
  # Every position up to the last hit gets the last hit's value.
  np.testing.assert_array_equal(
      _lookup(queries, "replace_prompt"),
      [[2, 2], [2, 2], [2, 2], [2, 2], [-1, -1]])


@pytest.fixture(scope="module")
def model():
  return make_tiny_lm()


def _req(prompt, subject, target):
  return {"prompt": prompt, "subject": subject, "target_new": target}


REQS = [_req("Kalomi lives in", "Kalomi", "Paris"),
        _req("Zetano speaks", "Zetano", "Greek"),
        _req("Rupoka plays the", "Rupoka", "harp")]


def _editor(**kw):
  hp = dict(layer=2, eps_factor=0.05, steps=20, lr=0.5)
  hp.update(kw)
  return editors.get("grace", **hp)


def _logits(model, params, text):
  return np.asarray(model.apply(params, np.asarray([model.encode(text)])))


def test_edits_add_entries_with_their_own_labels_and_leave_inputs_untouched(
    model):
  editor = _editor()
  state = editor.init(model)
  before = jax.tree.map(np.array, model.params)
  params, state2, info = editor.apply(model, model.params, REQS, state)
  jax.tree.map(np.testing.assert_array_equal, model.params, before)
  assert "adapters" not in model.params and int(state.num_edits) == 0
  assert int(state2.num_edits) == 3
  assert info.extras["action"] == ["add"] * 3
  _, book = grace.codebook(params, editor.hparams)
  labels = np.asarray(book.params["labels"])
  # EasyEdit bug 1: labels prepended while keys are appended. Each record's
  # entry carries its own request's label.
  for record, req in zip(info.records, REQS):
    (entry,) = record.touched
    assert entry.action == "add" and entry.site == "layer/2/mlp/value"
    assert labels[entry.index] == grace.label_of(req["target_new"])
  assert len({r.id for r in info.records}) == 3
  assert grace.size(params, editor.hparams) == 3
  # The edit changes its own prompt's prediction, the weights stay.
  for path in ("layers_2",):
    jax.tree.map(np.testing.assert_array_equal, params[path],
                 model.params[path])
  assert np.abs(_logits(model, params, "Kalomi lives in")
                - _logits(model, model.params, "Kalomi lives in")).max() > 1e-3


def test_unrelated_prompts_are_untouched_bit_for_bit(model):
  editor = _editor()
  params, _, _ = editor.apply(model, model.params, REQS, editor.init(model))
  # A random byte-level model's queries are dominated by the current byte,
  # so these avoid the edit prompts' last bytes ("n", "s", "e").
  for text in ("A big dog", "Quo vadit, Kalomi?", "Wow! 42 cat"):
    np.testing.assert_array_equal(_logits(model, params, text),
                                  _logits(model, model.params, text))


def test_split_on_conflict_and_expand_on_agreement(model):
  # A huge radius puts the second key within reach of the first.
  editor = _editor(eps_factor=5.0)
  state = editor.init(model)
  p1, state, i1 = editor.apply(model, model.params, REQS[0], state)
  _, book1 = grace.codebook(p1, editor.hparams)
  eps0 = float(book1.params["eps"][0])
  key0 = np.asarray(book1.params["keys"][0])
  conflict = _req("Kalomi lives near", "Kalomi", "Rome")   # another label
  p2, state_c, i2 = editor.apply(model, p1, conflict, state)
  assert i2.extras["action"] == ["split"]
  _, book2 = grace.codebook(p2, editor.hparams)
  key1 = np.asarray(book2.params["keys"][1])
  half = np.linalg.norm(key1 - key0) / 2
  np.testing.assert_allclose(book2.params["eps"][:2], [half, half], rtol=1e-5)
  assert [t.action for t in i2.records[0].touched] == ["shrink", "add"]
  agree = _req("Kalomi lives near", "Kalomi", "Paris")     # the same label
  p3, _, i3 = editor.apply(model, p1, agree, state)
  assert i3.extras["action"] == ["expand"]
  _, book3 = grace.codebook(p3, editor.hparams)
  assert grace.size(p3, editor.hparams) == 1
  d = np.linalg.norm(key1 - key0)
  assert float(book3.params["eps"][0]) == pytest.approx(max(eps0, d), rel=1e-5)
  # Undoing the expansion restores the entry exactly (EasyEdit bug 2: edit
  # ids in nested lists broke deletion; here a record names its entries).
  back = grace.remove(p3, editor.hparams, i3.records[0])
  jax.tree.map(np.testing.assert_array_equal,
               grace.codebook(back, editor.hparams)[1].params, book1.params)
  back_split = grace.remove(p2, editor.hparams, i2.records)
  jax.tree.map(np.testing.assert_array_equal,
               grace.codebook(back_split, editor.hparams)[1].params,
               book1.params)


def test_removing_one_edit_restores_its_prompt_and_keeps_the_others(model):
  editor = _editor()
  params, _, info = editor.apply(model, model.params, REQS, editor.init(model))
  texts = [r["prompt"] for r in REQS]
  edited = [_logits(model, params, t) for t in texts]
  removed = grace.remove(params, editor.hparams, info.records[1])
  np.testing.assert_array_equal(_logits(model, removed, texts[1]),
                                _logits(model, model.params, texts[1]))
  for i in (0, 2):
    np.testing.assert_array_equal(_logits(model, removed, texts[i]), edited[i])
  _, book = grace.codebook(removed, editor.hparams)
  slot = info.records[1].touched[0].index
  assert int(book.params["active"][slot]) == 0
  assert not np.asarray(book.params["keys"][slot]).any()  # the key is gone
  # The params given are untouched, and a later edit reuses the free slot.
  assert grace.size(params, editor.hparams) == 3
  again, _, info2 = editor.apply(model, removed, REQS[1], editor.init(model))
  assert info2.records[0].touched[0].index == slot
  # All removed: the model is the unedited one.
  empty = grace.remove(params, editor.hparams, info.records)
  for t in texts:
    np.testing.assert_array_equal(_logits(model, empty, t),
                                  _logits(model, model.params, t))


def test_codebook_grows_by_doubling(model):
  editor = _editor(capacity=2, steps=1)
  reqs = [_req(f"Name{i} lives in", f"Name{i}", f"city{i}") for i in range(5)]
  params, _, info = editor.apply(model, model.params, reqs, editor.init(model))
  _, book = grace.codebook(params, editor.hparams)
  assert book.params["keys"].shape[0] == 8 and info.extras["codebook_size"] == 5
  assert [r.touched[0].index for r in info.records] == [0, 1, 2, 3, 4]


def test_training_writes_the_first_target_token(model):
  """On a byte-level tiny model a target is several tokens, and one value at
  the last prompt token can only decide the first of them (the rest follow
  from attention to it); the real model's targets are mostly one token."""
  from keditjax.evaluation import scoring
  editor = _editor(steps=100)
  prompt, target = REQS[0]["prompt"], " " + REQS[0]["target_new"]
  before = scoring.teacher_forced(model, model.params, [prompt], [target])[0]
  params, _, info = editor.apply(model, model.params, REQS[:1],
                                 editor.init(model))
  after = scoring.teacher_forced(model, params, [prompt], [target])[0]
  assert not before.correct[0] and after.correct[0]
  assert after.logprobs[0] > before.logprobs[0] + 1.0
  assert info.extras["steps"] == [100]  # the later tokens never got greedy


def test_bad_input(model):
  with pytest.raises(errors.ConfigError, match="eps_factor"):
    grace.GraceHParams(eps_factor=0.0)
  with pytest.raises(errors.ConfigError, match="eps_factor"):
    editors.get("grace", eps_factor=-1.0)
  with pytest.raises(errors.ConfigError, match="replacement"):
    editors.get("grace", replacement="replace_some")
  editor = _editor()
  with pytest.raises(errors.ConfigError, match="colour"):
    editor.init(model, colour=1)
  with pytest.raises(errors.ConfigError, match="layer"):
    editors.get("grace", layer=9).init(model)
  state = editor.init(model)
  with pytest.raises(errors.ConfigError, match="bogus"):
    editor.apply(model, model.params, REQS, state, bogus=True)
  with pytest.raises(errors.InputError):
    editor.apply(model, model.params, [_req("x is", "x", "")], state)
  # A codebook made with another replacement mode is not silently reused.
  params, _, _ = editor.apply(model, model.params, REQS[:1], state)
  with pytest.raises(errors.ConfigError, match="replacement"):
    _editor(replacement="replace_all").apply(model, params, REQS[1:2], state)
