"""WISE: the router, TIES merging, shards, the norm constraint, exact removal
of recent edits, KV-cache safety, purity, checkpoints and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import editors, errors, models
from keditjax.editors import base, state_io, wise
from keditjax.models import adapters
from tests.conftest import make_tiny_lm

# Small and fast on the tiny byte-level model: one generated prefix, a few
# WikiText-2 rows, a loose norm bound (a random tiny model's weights are
# ~0.02, far from what moving a prediction takes).
FAST = dict(layer=2, num_contexts=1, num_negatives=4, negative_length=17,
            steps=25, optimizer="adam", lr=0.02, norm_constraint=50.0,
            alpha=0.05, beta=0.5, gamma=0.3, replay=10.0, save_freq=500,
            hard_negatives=2)
# A byte-level random model's next-token distributions are nearly uniform and
# its MLP outputs tiny: moving a prediction needs the last block, a large step
# and margins that weigh little (routing is then not selective: its own tests
# use FAST).
CONTENT = dict(layer=3, num_contexts=1, num_negatives=4, negative_length=17,
               steps=40, optimizer="adam", lr=0.5, norm_constraint=1000.0,
               margin_weight=0.1, save_freq=500, hard_negatives=2)


def _req(prompt, subject, target):
  return {"prompt": prompt, "subject": subject, "target_new": target}


REQS = [_req("Kalomi lives in", "Kalomi", "Paris"),
        _req("Zetano speaks", "Zetano", "Greek"),
        _req("Rupoka plays the", "Rupoka", "harp")]
UNRELATED = ("A big dog", "Wow! 42 cat", "The sun is hot today")


@pytest.fixture(scope="module")
def model():
  return make_tiny_lm()


def _editor(**kw):
  return editors.get("wise", **dict(FAST, **kw))


@pytest.fixture(scope="module")
def edited(model):
  """Three sequential edits into one shard: (editor, params, state, info)."""
  editor = _editor()
  state = editor.init(model)
  params, state2, info = editor.apply(model, model.params, REQS, state)
  return editor, params, state, state2, info


def _logits(model, params, text):
  return np.asarray(model.apply(params, np.asarray([model.encode(text)])))


def _margin_at_last_token(model, params, hparams, text):
  """max over live shards of d − threshold at the text's last token."""
  _, a = wise.side_memory(params, hparams)
  main = adapters.with_adapters(params, wise.site(hparams), ())
  tokens = jnp.asarray([model.encode(text)])
  _, key, value = wise._layer_inputs(model.config, main, tokens,
                                     jnp.ones_like(tokens),
                                     layer=hparams.layer)
  _, d = wise.shard_distances(a.params["deltas"], value, key,
                              model.config.activation)
  live = np.asarray(a.params["active"]) > 0
  margin = np.asarray(d)[:, 0, -1] - np.asarray(a.params["threshold"])
  return float(np.max(np.where(live, margin, -np.inf)))


# -- the adapter's rule ------------------------------------------------------

def _two_shards():
  """Shard 0 doubles key[0] into out[0]; shard 1 triples key[1] into out[1]."""
  deltas = np.zeros((3, 2, 2), np.float32)
  deltas[0, 0, 0] = 2.0
  deltas[1, 1, 1] = 3.0
  deltas[2, 0, 0] = 100.0  # inactive: must never fire
  return wise.wise_adapter(deltas, threshold_S=[1.0, 1.0, 0.0],
                           active_S=[1, 1, 0], act="relu")


def test_router_picks_the_firing_shard_with_the_largest_distance():
  a = _two_shards()
  key = jnp.asarray([[[0.1, 0.1],    # d = 0.2 / 0.3: below both thresholds
                      [1.0, 0.0],    # shard 0 fires (d = 2)
                      [1.0, 1.0],    # both fire; shard 1 is farther (3 > 2)
                      [0.0, 0.2]]])  # shard 1: d = 0.6, below its threshold
  x = jnp.ones((1, 4, 2))
  out = np.asarray(a(x, {"mlp/key": key}))[0]
  np.testing.assert_allclose(out, [[1, 1], [3, 1], [1, 4], [1, 1]])


def test_running_mean_router_is_causal_and_averages_over_the_prefix():
  a = dataclasses.replace(_two_shards(), options=(("act", "relu"),
                                                   ("router", "running_mean")))
  key = jnp.asarray([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]])
  x = jnp.ones((1, 4, 2))
  out = np.asarray(a(x, {"mlp/key": key}))[0]
  # Shard 0's d is 2, 0, 0, 2: running means 2, 1, 0.67, 1 -> fires where
  # the mean exceeds 1 (position 0 only; at 1 and 3 it equals 1).
  np.testing.assert_allclose(out[:, 0], [3, 1, 1, 1])
  # Appending positions never changes earlier outputs.
  longer = np.asarray(a(jnp.ones((1, 6, 2)), {"mlp/key": jnp.concatenate(
      [key, jnp.ones((1, 2, 2)) * 5], axis=1)}))[0]
  np.testing.assert_allclose(longer[:4], out)


def test_ties_merge_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  deltas = rng.normal(size=(3, 40)).astype(np.float32)
  deltas[rng.random((3, 40)) < 0.5] = 0.0  # sparse, like masked shards
  weights = np.array([0.2, 0.3, 0.5], np.float32)

  def numpy_ties(d, w, density):
    d = d.copy()
    k = int(density * d.shape[1])
    for s in range(len(d)):
      keep = np.argsort(-np.abs(d[s]), kind="stable")[:k]
      trimmed = np.zeros_like(d[s])
      trimmed[keep] = d[s][keep]
      d[s] = trimmed
    wd = d * w[:, None]
    sign = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(wd) == sign
    total = (wd * agree).sum(0)
    div = (w[:, None] * agree).sum(0)
    return total / np.where(div == 0, 1.0, div)

  for density in (0.3, 0.53, 1.0):
    np.testing.assert_allclose(
        np.asarray(wise.ties_merge(deltas, weights, density)),
        numpy_ties(deltas, weights, density), rtol=1e-6, atol=1e-7)
  # Disjoint shards merge to their union (each entry keeps its value).
  a, b = np.zeros((2, 6), np.float32), None
  a[0, :3], a[1, 3:] = [1, -2, 3], [4, -5, 6]
  np.testing.assert_allclose(wise.ties_merge(a, [0.5, 0.5], 1.0),
                             [1, -2, 3, 4, -5, 6])
  del b


# -- editing on the tiny model ----------------------------------------------

def test_router_sends_edits_to_the_side_memory_and_unrelated_text_to_main(
    model, edited):
  editor, params, _, _, info = edited
  for req in REQS:
    text = req["prompt"].format(req["subject"]) if "{}" in req["prompt"] \
        else req["prompt"]
    assert _margin_at_last_token(model, params, editor.hparams, text) > 0
    assert np.abs(_logits(model, params, text)
                  - _logits(model, model.params, text)).max() > 1e-3
  for text in UNRELATED:
    assert _margin_at_last_token(model, params, editor.hparams, text) < 0
  # Unrelated text goes through the main memory: the logits are the
  # unedited model's, bit for bit.
  for text in UNRELATED:
    np.testing.assert_array_equal(_logits(model, params, text),
                                  _logits(model, model.params, text))
  assert info.extras["shards"] == 1 and wise.size(params, editor.hparams) == 1
  assert len(info.records) == 3 and len({r.id for r in info.records}) == 3
  for r in info.records:
    (entry,) = r.touched
    assert (entry.site, entry.kind, entry.index, entry.action) == (
        "layer/2/mlp/value", "wise", 0, "update")


def _first_token(model, params, req):
  from keditjax.evaluation import scoring
  got = scoring.teacher_forced(model, params, [req["prompt"]],
                               [req["target_new"]])[0]
  return float(got.logprobs[0]), bool(got.correct[0])


@pytest.fixture(scope="module")
def content_edited(model):
  editor = editors.get("wise", **CONTENT)
  return editor.apply(model, model.params, REQS[:1], editor.init(model))


def test_per_edit_shards_route_each_edit_to_its_own_shard(model):
  """The default layout: one shard per edit (save_freq=1), each with its own
  threshold; an edit prompt's largest firing distance is its own shard's,
  and unrelated text fires none."""
  editor = _editor(save_freq=1, merge_freq=1000)
  params, _, info = editor.apply(model, model.params, REQS,
                                 editor.init(model))
  assert wise.size(params, editor.hparams) == 3
  assert [r.touched[0].index for r in info.records] == [0, 1, 2]
  _, a = wise.side_memory(params, editor.hparams)
  assert len(set(np.asarray(a.params["threshold"])[:3].tolist())) == 3
  main = adapters.with_adapters(params, wise.site(editor.hparams), ())
  for i, req in enumerate(REQS):
    text = req["prompt"].format(req["subject"]) if "{}" in req["prompt"] \
        else req["prompt"]
    tokens = jnp.asarray([model.encode(text)])
    _, key, value = wise._layer_inputs(  # pylint: disable=protected-access
        model.config, main, tokens, jnp.ones_like(tokens),
        layer=editor.hparams.layer)
    _, d = wise.shard_distances(a.params["deltas"], value, key,
                                model.config.activation)
    d_S = np.asarray(d)[:, 0, -1]
    fires = (d_S > np.asarray(a.params["threshold"])) & (
        np.asarray(a.params["active"]) > 0)
    assert fires[i] and np.argmax(np.where(fires, d_S, -np.inf)) == i
  for text in UNRELATED:
    assert _margin_at_last_token(model, params, editor.hparams, text) < 0


def test_hard_negatives_use_the_edit_template_with_other_subjects(model,
                                                                  edited):
  editor, _, state, _, _ = edited
  request = base.make_requests([REQS[0]])[0]
  rows = wise._hard_rows(  # pylint: disable=protected-access
      model, request, state, editor.hparams, 0)
  assert len(rows) == editor.hparams.hard_negatives == 2
  for ids in rows:
    text = model.tokenizer.decode(ids)
    assert text.endswith(" lives in") and "Kalomi" not in text
  # Deterministic per edit count, different across edits.
  again = wise._hard_rows(  # pylint: disable=protected-access
      model, request, state, editor.hparams, 0)
  assert again == rows
  assert wise._hard_rows(  # pylint: disable=protected-access
      model, request, state, editor.hparams, 1) != rows


def test_an_edit_makes_its_first_target_token_greedy(model, content_edited):
  params, _, info = content_edited
  before, was_greedy = _first_token(model, model.params, REQS[0])
  after, greedy = _first_token(model, params, REQS[0])
  assert not was_greedy and greedy
  assert after > before + 1.0
  assert info.extras["steps"] == [40]  # the later bytes never got greedy


def test_inputs_stay_untouched(model, edited):
  editor, _, state, _, _ = edited
  before = jax.tree.map(np.array, model.params)
  state_before = jax.tree.map(np.array, state)
  editor.apply(model, model.params, REQS[:1], state)
  jax.tree.map(np.testing.assert_array_equal, model.params, before)
  jax.tree.map(np.testing.assert_array_equal, state, state_before)
  assert "adapters" not in model.params


def test_norm_constraint_and_gradient_mask_hold(model):
  editor = _editor(norm_constraint=0.5, mask_ratio=0.3, steps=10)
  params, state, _ = editor.apply(model, model.params, REQS[:2],
                                  editor.init(model))
  _, a = wise.side_memory(params, editor.hparams)
  delta = np.asarray(a.params["deltas"][0])
  w_main = np.asarray(base.get_leaf(model.params,
                                    model.site_param("layer/2/mlp/value")))
  assert np.all(np.abs(delta) <= 0.5 * np.abs(w_main) + 1e-7)
  assert np.any(np.abs(delta) > 0.4 * np.abs(w_main))  # the bound binds
  mask = wise.grad_mask(np.asarray(state.key), 0, delta.shape, 0.3)
  assert 0.25 < mask.mean() < 0.35
  assert not np.any(delta[~mask])  # only the shard's entries moved


def test_shards_save_merge_and_merged_memory_keeps_each_edit(model):
  # A shard per edit; after the second edit both shards merge by TIES.
  editor = editors.get("wise", **dict(CONTENT, save_freq=1, merge_freq=2,
                                      density=1.0, capacity=1))
  state = editor.init(model)
  params, state, info1 = editor.apply(model, model.params, REQS[:1], state)
  assert info1.extras["shards"] == 1 and not info1.extras["merged"][0]
  params, state, info2 = editor.apply(model, params, REQS[1:2], state)
  assert info2.extras["merged"] == [True]
  _, a = wise.side_memory(params, editor.hparams)
  assert wise.size(params, editor.hparams) == 1
  assert a.params["deltas"].shape[0] == 2  # grew by doubling from 1
  merge = info2.records[0].touched[-1]
  assert merge.previous["slots"] == [0, 1]
  np.testing.assert_allclose(
      a.params["deltas"][0],
      wise.ties_merge(merge.previous["deltas"], [0.5, 0.5], 1.0))
  for req in REQS[:2]:  # the TIES-merged memory still answers each edit
    before, _ = _first_token(model, model.params, req)
    after, greedy = _first_token(model, params, req)
    # Greedy is the claim; the log-prob rise (≈ 1.0 here, 0.997 with XLA's
    # AVX2 CPU code) is checked with a margin that does not sit on it.
    assert greedy and after > before + 0.5, req
  # WISE-Merge folds a later shard into the earlier merge.
  merge_mode = _editor(save_freq=1, merge_freq=1, retrieve=False)
  p, s, _ = merge_mode.apply(model, model.params, REQS[:2],
                             merge_mode.init(model))
  assert wise.size(p, merge_mode.hparams) == 1
  # The schedule's closed form (experiments/bench_arch.py sizes WISE by it).
  assert wise.shards_after(1, editor.hparams) == 1
  assert wise.shards_after(2, editor.hparams) == 1
  assert wise.shards_after(2, merge_mode.hparams) == 1
  hp = wise.WiseHParams()
  assert [wise.shards_after(n, hp) for n in (0, 10, 100, 999, 1000, 1001)] == [
      1, 10, 100, 999, 1, 2]
  hp = dataclasses.replace(hp, save_freq=3, merge_freq=6)
  assert [wise.shards_after(n, hp) for n in (5, 6, 7, 13)] == [2, 1, 2, 3]
  hp = dataclasses.replace(hp, retrieve=False)
  assert wise.shards_after(13, hp) == 2


def test_kv_cached_generation_equals_the_full_forward_pass(model,
                                                           content_edited):
  params, _, _ = content_edited
  prompt = REQS[0]["prompt"]
  cached = model.generate(params, prompt, max_new_tokens=6, return_ids=True,
                          stop_at_eos=False)
  ids = model.encode(prompt)
  for _ in range(6):
    logits = np.asarray(model.apply(params, np.asarray([ids])))
    ids = ids + [int(np.argmax(logits[0, -1]))]
  assert cached == ids[-6:]
  plain = model.generate(model.params, prompt, max_new_tokens=6,
                         return_ids=True, stop_at_eos=False)
  assert plain != cached  # the side memory fired


def test_remove_is_exact_for_recent_edits_and_refuses_older_ones(model,
                                                                 edited):
  editor, params, state, _, info = edited
  hp = editor.hparams
  # Undoing the last edit gives the model after the first two, exactly.
  two, _, _ = editor.apply(model, model.params, REQS[:2], state)
  back = wise.remove(params, hp, info.records[2])
  jax.tree.map(np.testing.assert_array_equal,
               wise.side_memory(back, hp)[1].params,
               wise.side_memory(two, hp)[1].params)
  # An older edit's shard was trained on by later edits: refused.
  with pytest.raises(errors.InputError, match="changed since"):
    wise.remove(params, hp, info.records[0])
  # Newest first, all of them: the unedited model, bit for bit.
  empty = wise.remove(params, hp, info.records)
  assert "adapters" not in empty
  for text in [r["prompt"] for r in REQS]:
    np.testing.assert_array_equal(_logits(model, empty, text),
                                  _logits(model, model.params, text))
  # The given params are untouched.
  assert wise.size(params, hp) == 1


def test_removing_a_merge_restores_the_shards(model):
  editor = _editor(save_freq=1, merge_freq=2, steps=5)
  state = editor.init(model)
  p1, state, _ = editor.apply(model, model.params, REQS[:1], state)
  p2, _, info = editor.apply(model, p1, REQS[1:2], state)
  back = wise.remove(p2, editor.hparams, info.records[0])
  jax.tree.map(np.testing.assert_array_equal,
               wise.side_memory(back, editor.hparams)[1].params,
               wise.side_memory(p1, editor.hparams)[1].params)


def test_state_checkpoints_and_adapters_save_with_the_model(model, edited,
                                                            tmp_path):
  editor, params, _, state, _ = edited
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, (np.ndarray, jax.Array)) for x in leaves)
  state_io.save_state(str(tmp_path / "state"), editor, model, state)
  back = state_io.load_state(str(tmp_path / "state"), editor, model)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, back, state)
  out = str(tmp_path / "kj")
  models.save(model, out, params, format="keditjax")
  loaded = models.load("hf:" + out)
  text = REQS[0]["prompt"]
  np.testing.assert_array_equal(_logits(loaded, loaded.params, text),
                                _logits(model, params, text))
  # The restored adapter and state continue editing.
  more, _, _ = editor.apply(loaded, loaded.params, REQS[:1], back)
  assert wise.size(more, editor.hparams) == 1


def test_registry_and_bad_input(model, edited):
  editor, params, state, _, _ = edited
  assert editors.METHODS["wise"].family == "architectural"
  assert editors.METHODS["wise"].batches is False
  assert editors.get("wise").name == "wise"
  for bad, field in ((dict(router="nearest"), "router"),
                     (dict(mask_ratio=0.0), "mask_ratio"),
                     (dict(save_freq=3, merge_freq=4), "merge_freq"),
                     (dict(density=1.5), "density"),
                     (dict(norm_constraint=0.0), "norm_constraint"),
                     (dict(alpha=-1.0), "alpha"),
                     (dict(hard_negatives=-1), "hard_negatives")):
    with pytest.raises(errors.ConfigError, match=field):
      editors.get("wise", **bad)
  with pytest.raises(errors.ConfigError, match="colour"):
    editor.init(model, colour=1)
  with pytest.raises(errors.ConfigError, match="layer"):
    editors.get("wise", layer=9).init(model)
  with pytest.raises(errors.InputError):
    editor.apply(model, model.params, [_req("x is", "x", "")], state)
  with pytest.raises(errors.InputError, match="WiseState"):
    editor.apply(model, model.params, REQS[:1], None)
  # A side memory with another router is not silently reused.
  with pytest.raises(errors.ConfigError, match="router"):
    _editor(router="running_mean").apply(model, params, REQS[:1], state)


def test_public_constructor_builds_random_shards(model):
  rng = np.random.default_rng(0)
  f, d = model.config.intermediate_size, model.config.hidden_size
  a = wise.wise_adapter(rng.normal(0, 0.01, (4, f, d)), np.ones(4),
                        act=model.config.activation)
  params = adapters.with_adapters(model.params, "layer/2/mlp/value", (a,))
  assert wise.size(params, wise.WiseHParams(layer=2)) == 4
  assert np.isfinite(_logits(model, params, "A big dog")).all()
