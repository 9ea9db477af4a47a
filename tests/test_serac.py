"""SERAC: the scope classifier (closed forms, training, the shipped one
retrieving the right edit for a paraphrase and nothing for unrelated text),
routed scoring and generation equal to the base model on rewritten prompts,
exact removal, purity, checkpointable state, saving and bad input."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from keditjax import editors, errors
from keditjax.editors import base, serac, state_io
from keditjax.evaluation import scoring
from keditjax.models import routed
from keditjax.training import scope
from tests.conftest import make_tiny_lm


def _req(prompt, subject, target):
  return {"prompt": prompt, "subject": subject, "target_new": target}


# CounterFact-shaped edits (made up, so no split is reused) with a
# paraphrase each and an unrelated prompt.
FACTS = [
    (_req("The mother tongue of Kalomi Verday is", "Kalomi Verday", " Greek"),
     "Kalomi Verday, a native speaker of",
     "The capital city of Norway is"),
    (_req("Zetano Brill plays the position of", "Zetano Brill", " goalkeeper"),
     "Which position does Zetano Brill play? They play as",
     "Bananas are a good source of"),
    (_req("The headquarters of Orvanta Motors is in", "Orvanta Motors",
          " Lisbon"),
     "Orvanta Motors is headquartered in the city of",
     "The Pacific Ocean is the largest"),
]


@pytest.fixture(scope="module")
def model():
  return make_tiny_lm()


@pytest.fixture(scope="module")
def edited(model):
  """All FACTS edited one after another (the inputs kept)."""
  editor = editors.get("serac")
  state = editor.init(model)
  before = jax.tree.map(np.array, model.params)
  params, infos = model.params, []
  for req, _, _ in FACTS:
    params, state, info = editor.apply(model, params, req, state)
    infos.append(info)
  return dict(editor=editor, state=state, params=params, infos=infos,
              before=before)


# --- the classifier ---------------------------------------------------------

def test_retrieve_matches_numpy_closed_form():
  rng = np.random.default_rng(0)
  params = {"proj": rng.normal(size=(8, 8)).astype(np.float32),
            "scale": np.float32(4.0), "bias": np.float32(-1.0)}
  q = rng.normal(size=(5, 8)).astype(np.float32)
  mem = rng.normal(size=(3, 8)).astype(np.float32)

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  z = 4.0 * unit(q @ params["proj"]) @ unit(mem @ params["proj"]).T - 1.0
  np.testing.assert_allclose(scope.logits(params, q, mem), z, rtol=1e-5,
                             atol=1e-5)
  prob = 1 / (1 + np.exp(-z))
  want = np.where(prob.max(1) > 0.5, prob.argmax(1), -1)
  np.testing.assert_array_equal(scope.retrieve(params, q, mem, 0.5), want)
  # A removed entry is never retrieved; an empty memory retrieves nothing.
  got = scope.retrieve(params, q, mem, 0.5, active_C=np.array([0, 1, 1]))
  assert not np.any(got == 0)
  np.testing.assert_array_equal(
      scope.retrieve(params, q, np.zeros((0, 8)), 0.5), [-1] * 5)


def test_retrieve_ties_go_to_the_newer_entry():
  params = scope.init_params(4)
  e = np.eye(4, dtype=np.float32)
  mem = np.stack([e[0], e[1], e[0]])  # entry 2 re-edits entry 0's fact
  np.testing.assert_array_equal(scope.retrieve(params, e[:2], mem), [2, 1])
  # cosine 0 -> logit -6: out of scope.
  np.testing.assert_array_equal(scope.retrieve(params, e[3:], mem), [-1])


def test_training_separates_in_scope_from_out_of_scope_pairs():
  """A synthetic problem the identity projection gets wrong: queries share
  their anchor's first 4 coordinates (in scope) or only the noise in the
  last 4 (out of scope); training must learn to look at the first 4."""
  rng = np.random.default_rng(1)
  n = 64
  anchors = rng.normal(size=(n, 8))
  anchors[:, 4:] *= 3.0  # the misleading part dominates the raw cosine
  pos = anchors.copy()
  pos[:, 4:] = rng.normal(size=(n, 4)) * 3.0
  neg = anchors.copy()
  neg[:, :4] = rng.normal(size=(n, 4))
  texts = ([f"a{i}" for i in range(n)] + [f"p{i}" for i in range(n)]
           + [f"n{i}" for i in range(n)])
  vecs = np.concatenate([anchors, pos, neg])
  vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
  table = dict(zip(texts, vecs.astype(np.float32)))
  anchor_t = [f"a{i}" for i in range(n)] * 2
  query_t = [f"p{i}" for i in range(n)] + [f"n{i}" for i in range(n)]
  labels = np.array([1.0] * n + [0.0] * n, np.float32)
  config = scope.ScopeConfig(steps=300, batch_size=64, lr=3e-2)

  def acc(params):
    z = scope.pair_logits(params, np.stack([table[t] for t in anchor_t]),
                          np.stack([table[t] for t in query_t]))
    return float(np.mean((np.asarray(z) > 0) == (labels > 0)))

  params, info = scope.train(lambda ts: np.stack([table[t] for t in ts]),
                             anchor_t, query_t, labels, config)
  assert acc(scope.init_params(8)) < 0.75
  assert acc(params) > 0.95
  assert info["pairs"] == 2 * n


def test_save_load_round_trip_and_bad_files(tmp_path):
  params = {k: np.asarray(v) for k, v in scope.init_params(3).items()}
  path = str(tmp_path / "c.npz")
  scope.save(path, params, {"note": 1})
  got = scope.load(path)
  for k in params:
    np.testing.assert_array_equal(got[k], params[k])
  assert os.path.exists(str(tmp_path / "c.json"))
  with pytest.raises(errors.CheckpointError):
    scope.load(str(tmp_path / "missing.npz"))
  np.savez(str(tmp_path / "other.npz"), w=np.zeros(3))
  with pytest.raises(errors.CheckpointError, match="not a scope classifier"):
    scope.load(str(tmp_path / "other.npz"))


def test_scope_config_rejects_evaluation_splits():
  with pytest.raises(errors.ConfigError, match="training splits"):
    scope.ScopeConfig(datasets=("counterfact-edit",))
  with pytest.raises(errors.ConfigError):
    scope.ScopeConfig(lr=0.0)


def test_shipped_classifier_routes_paraphrases_to_their_edit(edited):
  """The shipped classifier with the real MiniLM encoder: each paraphrase
  retrieves its own edit, unrelated prompts retrieve nothing."""
  params = edited["params"]
  paraphrases = [p for _, p, _ in FACTS]
  unrelated = [u for _, _, u in FACTS]
  np.testing.assert_array_equal(params.retrieve(paraphrases), [0, 1, 2])
  np.testing.assert_array_equal(params.retrieve(unrelated), [-1, -1, -1])


# --- the editor -------------------------------------------------------------

def test_memory_grows_and_records_name_their_entries(edited):
  params, infos = edited["params"], edited["infos"]
  assert isinstance(params, serac.SeracModel) and routed.is_routed(params)
  assert params.size() == 3
  assert params.texts[0] == "The mother tongue of Kalomi Verday is Greek"
  assert [i.records[0].touched[0].index for i in infos] == [0, 1, 2]
  assert int(edited["state"].num_edits) == 3
  assert infos[-1].extras["memory_size"] == 3


def test_routed_scoring_is_base_scoring_of_the_rewritten_prompt(model,
                                                                 edited):
  params = edited["params"]
  prompts = [FACTS[1][1], FACTS[1][2]]  # in scope, out of scope
  targets = [" goalkeeper", " potassium"]
  got = scoring.teacher_forced(model, params, prompts, targets)
  rewritten = [serac.SeracHParams().template.format(
      edit=params.texts[1], prompt=prompts[0]), prompts[1]]
  want = scoring.teacher_forced(model, model.params, rewritten, targets)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=1e-6)
  # and the in-scope prompt is not scored as the bare prompt.
  bare = scoring.teacher_forced(model, model.params, prompts[:1],
                                targets[:1])
  assert not np.allclose(got[0].logprobs, bare[0].logprobs)
  np.testing.assert_allclose(
      model.score(params, prompts, targets),
      model.score(model.params, rewritten, targets), rtol=1e-6)


def test_generate_routes(model, edited):
  params = edited["params"]
  prompt = FACTS[0][1]
  rewritten = params.route(model, [prompt])[0]
  assert rewritten == serac.SeracHParams().template.format(
      edit=params.texts[0], prompt=prompt)
  got = model.generate(params, [prompt], max_new_tokens=4)
  want = model.generate(model.params, [rewritten], max_new_tokens=4)
  assert got == want


def test_remove_is_exact(model, edited):
  params = edited["params"]
  rec = edited["infos"][1].records
  removed = serac.remove(params, serac.SeracHParams(), rec)
  assert removed.size() == 2 and params.size() == 3  # input untouched
  prompts = [FACTS[1][1], FACTS[0][1]]
  assert removed.retrieve(prompts)[0] == -1
  assert removed.retrieve(prompts)[1] == 0
  np.testing.assert_allclose(
      model.score(removed, prompts[:1], [" goalkeeper"]),
      model.score(model.params, prompts[:1], [" goalkeeper"]), rtol=1e-6)
  with pytest.raises(errors.InputError):
    serac.remove(model.params, serac.SeracHParams(), rec)
  bad = base.EditRecord(id="x", method="serac", request=rec[0].request,
                        touched=(base.AdapterEntry(serac.SITE, "serac", 9,
                                                   "add", None),))
  with pytest.raises(errors.InputError, match="entry 9"):
    serac.remove(params, serac.SeracHParams(), [bad])


def test_pure(edited, model):
  jax.tree.map(np.testing.assert_array_equal, edited["before"],
               jax.tree.map(np.asarray, model.params))
  assert edited["params"].base is model.params


def test_state_round_trip(tmp_path, model, edited):
  editor, state = edited["editor"], edited["state"]
  state_io.save_state(str(tmp_path), editor, model, state)
  got = state_io.load_state(str(tmp_path), editor, model)
  assert int(got.num_edits) == 3
  for k in state.classifier:
    np.testing.assert_array_equal(np.asarray(got.classifier[k]),
                                  np.asarray(state.classifier[k]))


@pytest.mark.parametrize("kw,match", [
    (dict(threshold=1.0), "threshold"), (dict(threshold=0.0), "threshold"),
    (dict(template="{prompt}"), "template"),
    (dict(classifier="/nonexistent.npz"), "does not exist")])
def test_bad_hparams(kw, match):
  with pytest.raises(errors.ConfigError, match=match):
    editors.get("serac", **kw)


def test_bad_request_and_other_settings_fail_before_work(model, edited):
  editor, state, params = edited["editor"], edited["state"], edited["params"]
  with pytest.raises(errors.InputError):
    editor.apply(model, params, _req("", "x", " y"), state)
  other = editors.get("serac", template="Imagine that {edit}. {prompt}")
  with pytest.raises(errors.ConfigError, match="template"):
    other.apply(model, params, FACTS[0][0], state)
  assert params.size() == 3


def test_registry():
  spec = editors.METHODS["serac"]
  assert spec.family == "architectural"
  assert isinstance(editors.get("serac"), base.FunctionalEditor)
  assert dataclasses.asdict(editors.get("serac").hparams)["threshold"] == 0.5
