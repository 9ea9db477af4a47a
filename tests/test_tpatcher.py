"""T-Patcher: the patch rule, the margins after training, the new greedy
target, KV-cached generation, capacity doubling, exact removal, purity,
checkpointable state, saving, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import editors, errors, models
from keditjax.editors import base, state_io, tpatcher
from keditjax.evaluation import scoring
from keditjax.models import adapters, sites as sites_lib
from tests.conftest import make_tiny_lm

LAYER = 3
# A random tiny model's next-token distributions are nearly flat (NLL ~4.3
# for any byte), so training stops on "greedy and margins hold"
# (stop_nll=10) rather than on a small NLL.
HP = dict(layer=LAYER, memory_size=256, memory_task="", lr=5e-2, steps=200,
          stop_nll=10.0, capacity=2)


def _req(prompt, subject, target):
  return {"prompt": prompt, "subject": subject, "target_new": target}


REQS = [_req("Kalomi lives in", "Kalomi", "Rome"),
        _req("Zetano speaks", "Zetano", "Greek")]


def _editor(**kw):
  return editors.get("tpatcher", **dict(HP, **kw))


def _logits(model, params, text, length=32):
  """Logits of `text`, right-padded to `length` (one compile per params
  structure, whatever the text)."""
  ids = model.encode(text)
  tokens = np.zeros((1, length), np.int32)
  mask = np.zeros((1, length), np.int32)
  tokens[0, :len(ids)], mask[0, :len(ids)] = ids, 1
  return np.asarray(model.apply(params, tokens, attention_mask=mask))[
      0, :len(ids)]


def _activations(model, params, hparams, text):
  """Every neuron's pre-activation h·k + b at every position of `text`."""
  name = f"layer/{hparams.layer}/mlp/in"
  _, out = model.apply(params, np.asarray([model.encode(text)]),
                       sites=sites_lib.capture(name))
  _, a = tpatcher.patch(params, hparams)
  return (np.asarray(out[name][0]) @ np.asarray(a.params["keys"]).T
          + np.asarray(a.params["bias"]))


@pytest.fixture(scope="module")
def model():
  return make_tiny_lm()


@pytest.fixture(scope="module")
def edited(model):
  """REQS[0] edited, then REQS[1] on top (the inputs kept)."""
  editor = _editor()
  state = editor.init(model)
  before = jax.tree.map(np.array, model.params)
  state_before = jax.tree.map(np.array, state)
  p1, s1, i1 = editor.apply(model, model.params, REQS[0], state)
  params, new_state, i2 = editor.apply(model, p1, REQS[1], s1)
  extras = {k: i1.extras[k] + i2.extras[k] for k in ("greedy", "neurons",
                                                     "steps", "nll")}
  extras["patch_neurons"] = i2.extras["patch_neurons"]
  info = base.EditInfo(records=i1.records + i2.records, extras=extras)
  return dict(editor=editor, state=state, before=before,
              state_before=state_before, p1=p1, s1=s1, params=params,
              new_state=new_state, info=info, i1=i1, i2=i2)


# -- the patch rule ---------------------------------------------------------

def test_patch_rule_adds_active_firing_neurons_only():
  p = tpatcher.empty_patch(4, 3, 2).params
  p = dict(p, keys=jnp.asarray([[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]),
           bias=jnp.asarray([0., -1, 0, 0]),
           values=jnp.asarray([[1., 0], [0, 1], [5, 5], [7, 7]]),
           active=jnp.asarray([1, 1, 1, 0], jnp.int32))
  h = jnp.asarray([[[2., 0, 0],      # neuron 0 fires at 2
                    [0, 3, 0],       # neuron 1 fires at 3 - 1
                    [0, 0, -1],      # neuron 2 below zero: silent
                    [0, 0.5, 0]]])   # neuron 1 below its bias: silent
  x = jnp.full((1, 4, 2), 0.25)
  out = np.asarray(tpatcher.patch_neurons(p, x, {"mlp/in": h}))
  # Neuron 3 is inactive: it never adds its value (7, 7), though h·k > 0.
  np.testing.assert_array_equal(out[0], [[2.25, 0.25], [0.25, 2.25],
                                         [0.25, 0.25], [0.25, 0.25]])


def test_empty_patch_is_the_identity_bit_for_bit(model):
  a = tpatcher.empty_patch(2, 64, 64)
  params = adapters.with_adapters(model.params, "layer/3/mlp/value", (a,))
  for text in ("A big dog", "Kalomi lives in"):
    np.testing.assert_array_equal(_logits(model, params, text),
                                  _logits(model, model.params, text))


# -- an edit ----------------------------------------------------------------

def test_patch_fires_on_its_edit_and_stays_below_the_margin_on_the_memory(
    model, edited):
  params, info, hp = edited["params"], edited["info"], edited["editor"].hparams
  state = edited["new_state"]
  memory = np.asarray(state.memory)[:int(state.memory_count)]
  _, a = tpatcher.patch(params, hp)
  keys, bias = np.asarray(a.params["keys"]), np.asarray(a.params["bias"])
  for record, req in zip(info.records, REQS):
    slots = [e.index for e in record.touched]
    assert slots and all(e.site == "layer/3/mlp/value" and e.kind == "tpatcher"
                         and e.action == "add" for e in record.touched)
    prompt = model.encode(req["prompt"])
    target = model.encode(" " + req["target_new"])
    acts = _activations(model, params, hp, req["prompt"] + " "
                        + req["target_new"])
    # Neuron j was added for one predictive position (the prompt's last
    # token or a target token): it fires there at or above its margin.
    predictive = acts[len(prompt) - 1:len(prompt) + len(target) - 1]
    assert np.all(predictive[:, slots].max(0) >= hp.margin_pos - 1e-4)
  # Every neuron stays at or below the negative margin on the WikiText
  # memory it was trained against ...
  base_rows = int(edited["state"].memory_count)
  live = np.asarray(a.params["active"]) > 0
  assert (memory[:base_rows] @ keys[live].T + bias[live]).max() <= (
      hp.margin_neg + 1e-4)
  # ... so it adds exactly zero there: the memory rows pass unchanged.
  rows = jnp.asarray(memory[None, :base_rows])
  out = tpatcher.patch_neurons(a.params, jnp.zeros((1, base_rows, 64)),
                               {"mlp/in": rows})
  assert not np.asarray(out).any()
  # The second edit's neurons were trained against the first edit's input
  # too (appended to the memory by the first apply).
  second = [e.index for e in info.records[1].touched]
  first_rows = memory[base_rows:base_rows + len(REQS[0]["prompt"]) + 1
                      + len(REQS[0]["target_new"])]
  assert (first_rows @ keys[second].T + bias[second]).max() <= (
      hp.margin_neg + 1e-4)


def test_edited_model_greedily_continues_with_the_new_targets(model, edited):
  info = edited["info"]
  for req in REQS:
    before = scoring.teacher_forced(model, model.params, [req["prompt"]],
                                    [" " + req["target_new"]])[0]
    after = scoring.teacher_forced(model, edited["params"], [req["prompt"]],
                                   [" " + req["target_new"]])[0]
    assert not before.correct.all() and after.correct.all()
  assert info.extras["greedy"] == [True, True]
  assert info.extras["patch_neurons"] == sum(info.extras["neurons"])
  assert tpatcher.size(edited["params"], edited["editor"].hparams) == sum(
      info.extras["neurons"])
  assert all(1 <= n <= 5 for n in info.extras["neurons"])
  assert len(info.extras["steps"]) == 2 and len(info.extras["nll"]) == 2


def test_kv_cached_generation_equals_a_full_forward(model, edited):
  params = edited["params"]
  prompt = model.encode(REQS[0]["prompt"])
  cached = model.generate(params, REQS[0]["prompt"], max_new_tokens=8,
                          return_ids=True, stop_at_eos=False)
  # One full forward pass over prompt + generated tokens: each generated
  # token is the argmax of the pass at the position before it.
  logits = np.asarray(model.apply(params, np.asarray([prompt + cached])))
  full = np.argmax(logits[0, len(prompt) - 1:-1], -1).tolist()
  assert cached == full
  # The patch matters: it writes " Rome" (the unedited model does not:
  # test_edited_model_greedily_continues_with_the_new_targets).
  assert cached[:5] == model.encode(" Rome")


def test_inputs_are_untouched_and_the_memory_grows(model, edited):
  jax.tree.map(np.testing.assert_array_equal, model.params, edited["before"])
  assert "adapters" not in model.params and "adapters" in edited["params"]
  # The edited pytree shares the weights: only the adapter is new.
  for key in model.params:
    assert edited["params"][key] is model.params[key]
  jax.tree.map(np.testing.assert_array_equal, edited["state_before"],
               jax.tree.map(np.asarray, edited["state"]))
  old, new = edited["state"], edited["new_state"]
  assert int(old.num_edits) == 0 and int(new.num_edits) == 2
  # Each edit's input (prompt + target positions) joined the memory.
  added = int(new.memory_count) - int(old.memory_count)
  assert added == sum(len(r["prompt"]) + 1 + len(r["target_new"])
                      for r in REQS)
  assert new.memory.shape[0] == 512  # 256 + 39 rows: capacity doubled


def test_capacity_doubles(edited):
  # Two slots to start with; the edits add several neurons each.
  _, a = tpatcher.patch(edited["params"], edited["editor"].hparams)
  n = edited["info"].extras["patch_neurons"]
  assert n > 2 and a.params["keys"].shape == (2 ** int(np.ceil(np.log2(n))),
                                              64)
  slots = [e.index for r in edited["info"].records for e in r.touched]
  assert slots == list(range(n))  # in order, each once
  grown = adapters.grow(a, 2 * a.params["keys"].shape[0] + 1)
  assert all(v.shape[0] == 4 * a.params["keys"].shape[0]
             for v in jax.tree.leaves(grown.params))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x[:len(y)], y),
               grown.params, a.params)
  assert not np.asarray(grown.params["active"][n:]).any()


# -- removal ---------------------------------------------------------------

def test_removing_the_last_edit_gives_the_earlier_model_bit_for_bit(
    model, edited):
  editor, p1, p2 = edited["editor"], edited["p1"], edited["params"]
  i1, i2 = edited["i1"], edited["i2"]
  texts = [r["prompt"] for r in REQS] + ["A big dog", "Quo vadit?"]
  assert np.abs(_logits(model, p2, texts[1])
                - _logits(model, p1, texts[1])).max() > 1e-3
  back = tpatcher.remove(p2, editor.hparams, i2.records[0])
  for t in texts:
    # Equal up to float rounding: the memory after removal keeps its grown
    # capacity (zeroed rows), and XLA's AVX2 CPU code reduces the longer
    # rows in another order (≤ 6e-7 seen; bit-for-bit on AVX-512); an edit
    # moves these logits by > 1e-3 (asserted above).
    np.testing.assert_allclose(_logits(model, back, t),
                               _logits(model, p1, t), rtol=0, atol=1e-5)
  _, a = tpatcher.patch(back, editor.hparams)
  for e in i2.records[0].touched:
    assert int(a.params["active"][e.index]) == 0
    assert not np.asarray(a.params["keys"][e.index]).any()
    assert not np.asarray(a.params["values"][e.index]).any()
  assert tpatcher.size(back, editor.hparams) == tpatcher.size(
      p1, editor.hparams)
  # p2 itself is untouched, and removing everything gives the unedited model.
  assert tpatcher.size(p2, editor.hparams) == sum(
      len(r.touched) for r in i1.records + i2.records)
  empty = tpatcher.remove(p2, editor.hparams, i1.records + i2.records)
  for t in texts:
    np.testing.assert_array_equal(_logits(model, empty, t),
                                  _logits(model, model.params, t))
  # A later edit reuses the freed slots; one whose target is already the
  # greedy continuation adds no neuron.
  _, _, i3 = editor.apply(model, back, [REQS[1], REQS[0]],
                          edited["new_state"])
  assert sorted(e.index for e in i3.records[0].touched)[0] == min(
      e.index for e in i2.records[0].touched)
  assert i3.extras["neurons"][1] == 0 and i3.records[1].touched == ()
  assert i3.extras["steps"][1] == 0 and i3.extras["greedy"][1]


def test_remove_refuses_what_it_cannot_undo(model):
  hp = tpatcher.TPatcherHParams(**HP)
  record = base.EditRecord("x", "tpatcher", None, (base.AdapterEntry(
      tpatcher.site(hp), "tpatcher", 99),))
  with pytest.raises(errors.InputError, match="no T-Patcher patch"):
    tpatcher.remove(model.params, hp, record)
  params = adapters.with_adapters(model.params, tpatcher.site(hp),
                                  (tpatcher.empty_patch(4, 64, 64),))
  with pytest.raises(errors.InputError, match="beyond"):
    tpatcher.remove(params, hp, record)


# -- state, saving, registry, errors ----------------------------------------

def test_state_saves_and_restores(model, edited, tmp_path):
  editor, state = edited["editor"], edited["new_state"]
  state_io.save_state(str(tmp_path), editor, model, state)
  back = state_io.load_state(str(tmp_path), editor, model)
  assert type(back) is tpatcher.TPatcherState and back.layer == LAYER
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(a, b)
  # The restored state edits on as the original would.
  _, s2, _ = editor.apply(model, edited["params"], REQS[0], back)
  assert int(s2.num_edits) == 3


def test_patch_survives_keditjax_save_and_load(model, edited, tmp_path):
  out = str(tmp_path / "kj")
  models.save(model, out, edited["params"], format="keditjax")
  loaded = models.load("hf:" + out)
  (a,) = adapters.at(loaded.params, "layer/3/mlp/value")
  assert a.kind == "tpatcher" and a.fn is tpatcher.patch_neurons
  assert a.inputs == ("mlp/in",) and dict(a.options) == {"activation": "relu"}
  for text in (REQS[0]["prompt"], "A big dog"):
    np.testing.assert_array_equal(_logits(loaded, loaded.params, text),
                                  _logits(model, edited["params"], text))


def test_task_memory_reads_where_prompts_predict_their_answers(model):
  from keditjax import data
  records = data.read_records("counterfact-train")[:3]
  pairs = tpatcher._task_pairs(records)
  assert pairs[:2] == [(records[0]["prompt"], " " + records[0]["ground_truth"]),
                       (records[0]["locality_prompt"],
                        " " + records[0]["locality_ground_truth"])]
  rows = tpatcher.task_memory(model, model.params, LAYER, "counterfact-train",
                              3)
  name = f"layer/{LAYER}/mlp/in"
  want = []
  for p, a in pairs:  # one pass each: the last prompt token on
    p_ids, a_ids = model.encode(p), model.encode(a)
    ids = p_ids + a_ids
    tokens, mask = np.zeros((1, 64), np.int32), np.zeros((1, 64), np.int32)
    tokens[0, :len(ids)], mask[0, :len(ids)] = ids, 1
    _, out = model.apply(model.params, tokens, attention_mask=mask,
                         sites=sites_lib.capture(name))
    want.append(np.asarray(out[name][0, len(p_ids) - 1:len(ids) - 1]))
  want = np.concatenate(want)
  assert rows.shape == want.shape
  # The same rows, in task_memory's (length-sorted) order.
  gap = np.abs(want[:, None] - rows[None]).max(-1)
  assert gap.min(1).max() < 1e-4
  assert sorted(gap.argmin(1)) == list(range(len(rows)))
  # Through init: the WikiText rows, then these.
  state = _editor(memory_task="counterfact-train",
                  memory_task_records=3).init(model)
  assert int(state.memory_count) == 256 + len(want)
  # zsRE's layout; anything else is refused.
  assert tpatcher._task_pairs([{"src": "Who?", "answers": ["Ann"],
                                "loc": "nq question: x", "loc_ans": "y"}]) == [
      ("Who?", " Ann"), ("nq question: x", " y")]
  with pytest.raises(errors.InputError, match="record 0"):
    tpatcher._task_pairs([{"question": "?"}])


def test_registry(model):
  spec = editors.METHODS["tpatcher"]
  assert spec.family == "architectural" and not spec.batches
  editor = editors.get("tpatcher", layer=2)
  assert editor.name == "tpatcher" and editor.hparams.layer == 2
  assert editors.hparams_class("tpatcher") is tpatcher.TPatcherHParams


@pytest.mark.parametrize("field,value", [
    ("activation", "silu"), ("margin_pos", 0.0), ("margin_neg", 0.5),
    ("key_scale", 0.0), ("memory_weight", -1.0), ("max_neurons", 0),
    ("steps", 0), ("lr", 0.0), ("capacity", 0), ("memory_size", 0),
    ("memory_task_records", -1)])
def test_bad_hparams_are_config_errors(field, value):
  with pytest.raises(errors.ConfigError, match=field):
    tpatcher.TPatcherHParams(**{field: value})
  with pytest.raises(errors.ConfigError):
    editors.get("tpatcher", **{field: value})


def test_bad_input_fails_before_any_work(model, edited, monkeypatch):
  editor, state = edited["editor"], edited["state"]
  with pytest.raises(errors.ConfigError, match="layer"):
    editors.get("tpatcher", layer=9).init(model)
  with pytest.raises(errors.ConfigError, match="colour"):
    editor.init(model, colour=1)
  with pytest.raises(errors.ConfigError, match="bogus"):
    editor.apply(model, model.params, REQS, state, bogus=True)
  # A bad request among good ones: nothing is trained.
  calls = []
  monkeypatch.setattr(tpatcher, "_edit_inputs",
                      lambda *a, **k: calls.append(1))
  with pytest.raises(errors.InputError):
    editor.apply(model, model.params, [REQS[0], _req("x is", "x", "")], state)
  with pytest.raises(errors.InputError, match="subject"):
    editor.apply(model, model.params, [REQS[0], _req("x is", "y", "z")],
                 state)
  assert not calls
  with pytest.raises(errors.InputError, match="state"):
    editor.apply(model, model.params, REQS, None)
  other = dataclasses.replace(state, layer=2)
  with pytest.raises(errors.ConfigError, match="layer 2"):
    editor.apply(model, model.params, REQS, other)
  # A patch made with another activation is not silently reused.
  with pytest.raises(errors.ConfigError, match="activation"):
    _editor(activation="gelu").apply(model, edited["params"], REQS[:1], state)
