"""The evaluation harness: metrics, scoring, dataset loaders and protocols."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_tiny_lm
from keditjax import data, editors, errors
from keditjax.editors import base
from keditjax.evaluation import cases as C
from keditjax.evaluation import evaluator, protocols, report, scoring
from keditjax.evaluation import metrics as M
from keditjax.models import lm


@pytest.fixture(scope="module")
def model():
  return make_tiny_lm(num_layers=3, seed=2)


# -- metrics on hand-built values ---------------------------------------------

def test_comparisons_ties_fail_and_magnitude_is_probability_difference():
  assert M.prefers(-1.0, -2.0) and not M.prefers(-2.0, -1.0)
  assert not M.prefers(-1.5, -1.5)  # a tie is not a success
  assert M.magnitude(math.log(0.5), math.log(0.2)) == pytest.approx(0.3)
  # Mean vs sum: a 2-token target at -1 per token beats a 1-token target at
  # -1.5 by the mean (ROME) but loses by the sum.
  two, one = np.array([-1.0, -1.0]), np.array([-1.5])
  assert M.prefers(M.logprob(two), M.logprob(one))
  assert not M.prefers(M.logprob(two, "sum"), M.logprob(one, "sum"))
  with pytest.raises(errors.InputError):
    M.logprob(np.array([]))


def test_token_metrics():
  correct = np.array([True, False, True, True])
  assert M.token_accuracy(correct) == 0.75
  assert not M.exact_match(correct) and M.exact_match(correct[2:])
  assert M.agreement(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)
  with pytest.raises(errors.InputError):
    M.agreement(np.array([1, 2]), np.array([1]))


def test_survey_metrics():
  assert M.rate([True, False, True, True]) == 0.75
  assert math.isnan(M.rate([]))
  assert M.drawdown(40.0, 35.5) == 4.5
  # Edits 0..3 held right after they were made except edit 2; now only 0 does.
  assert M.retain_rate([1, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(1 / 3)
  assert math.isnan(M.retain_rate([0, 0], [1, 1]))


def test_ngram_entropy_known_value():
  # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> 1 bit.
  h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
  expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
  assert M.ngram_entropy("a b a b") == pytest.approx(expected)
  assert M.ngram_entropy("A, b") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)
  assert M.ngram_entropy("x") == 0.0
  varied = "the cat sat on the mat while a dog ran past the old red barn"
  assert M.fluency([varied]) > M.fluency(["the cat the cat the cat the cat"])


def test_tfidf_similarity_by_hand():
  corpus = ["paris is in france", "rome is in italy", "paris paris"]
  tf = M.TfIdf(corpus)
  idf = {w: math.log(4 / (1 + df)) + 1 for w, df in
         {"paris": 2, "is": 2, "in": 2, "france": 1, "rome": 1, "italy": 1}.items()}
  a = {"paris": 1 * idf["paris"], "france": 1 * idf["france"]}
  b = {"paris": 2 * idf["paris"], "is": 1 * idf["is"], "unseen": 0}
  dot = a["paris"] * b["paris"]
  norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(
      sum(v * v for v in b.values()))
  assert tf.similarity("Paris France", "paris is Paris unseen") == pytest.approx(dot / norm)
  assert tf.similarity("rome", "rome") == pytest.approx(1.0)
  assert M.consistency(tf, ["rome is"], ["italy"]) == 0.0


# -- scoring -------------------------------------------------------------------

def _unbatched(model, params, prompt, target):
  """Log-probs and argmax of target tokens from one unpadded forward pass."""
  p, t = model.encode(prompt), model.encode(" " + target.lstrip())
  ids = np.array([p + t], np.int32)
  logits = np.asarray(model.apply(params, ids), np.float64)[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  rows = np.arange(len(p) - 1, len(p) + len(t) - 1)
  return logp[rows, t], logits[rows].argmax(-1)


def test_teacher_forced_equals_unbatched_and_ignores_padding(model):
  prompts = ["The capital of Norway is", "A", "Some much longer prompt about a "
             "subject that needs more than one length bucket to fit in it, yes"]
  targets = ["Oslo and more words", "b", "x"]
  batched = scoring.teacher_forced(model, model.params, prompts, targets)
  alone = [scoring.teacher_forced(model, model.params, [p], [t])[0]
           for p, t in zip(prompts, targets)]
  for s, a, p, t in zip(batched, alone, prompts, targets):
    lp, am = _unbatched(model, model.params, p, t)
    np.testing.assert_allclose(s.logprobs, lp, atol=2e-4)
    np.testing.assert_allclose(a.logprobs, lp, atol=2e-4)
    np.testing.assert_array_equal(s.argmax, am)
    assert len(s.target) == len(model.encode(" " + t))
  with pytest.raises(errors.InputError, match="empty target"):
    scoring.teacher_forced(model, model.params, ["a"], [" "])


def _fake_scores(monkeypatch, table):
  """Replace the scorer by a table (prompt, target) -> (logprobs, correct)."""
  def fake(model, params, prompts, targets, batch_size=64):
    out = []
    for p, t in zip(prompts, targets):
      lp, argmax, target = table[(p, t.strip())]
      out.append(scoring.Scored(np.array(lp), np.array(argmax), np.array(target)))
    return out
  monkeypatch.setattr(scoring, "teacher_forced", fake)


def test_case_metrics_on_hand_built_scores(monkeypatch):
  case = C.EditCase(
      7, (base.make_request({"prompt": "{} speaks", "subject": "Ann",
                             "target_new": "Big Dutch", "target_true": "French"}),),
      paraphrase_prompts=("Ann talks", "Ann writes"),
      neighborhood=(("Bob speaks", "French"),),
      portability=(("Ann's language?", "Dutch", None),))
  table = {
      # efficacy: 2-token new at -1/token vs 1-token true at -1.5: mean wins,
      # sum loses; greedy yields the first token only.
      ("Ann speaks", "Big Dutch"): ([-1.0, -1.0], [5, 9], [5, 6]),
      ("Ann speaks", "French"): ([-1.5], [1], [2]),
      # paraphrase 1: a tie (fails); paraphrase 2: new wins, exact match.
      ("Ann talks", "Big Dutch"): ([-2.0, -2.0], [5, 0], [5, 6]),
      ("Ann talks", "French"): ([-2.0], [2], [2]),
      ("Ann writes", "Big Dutch"): ([-0.1, -0.1], [5, 6], [5, 6]),
      ("Ann writes", "French"): ([-3.0], [2], [2]),
      # neighbourhood keeps French; unedited top-1 tokens were [2, 4].
      ("Bob speaks", "French"): ([-0.5, -0.2], [2, 3], [2, 3]),
      ("Bob speaks", "Big Dutch"): ([-4.0, -4.0], [2, 3], [5, 6]),
      ("Ann's language?", "Dutch"): ([-1.0, -1.0, -1.0], [1, 7, 8], [6, 7, 8]),
  }
  _fake_scores(monkeypatch, table)
  ref = evaluator.Reference({(7, 0): np.array([2, 4])})
  [m], summary = evaluator.evaluate(None, None, [case], ref)
  assert m["efficacy_score"] == 1.0 and m["efficacy_score_sum"] == 0.0
  assert m["efficacy_magnitude"] == pytest.approx(math.exp(-1) - math.exp(-1.5))
  assert m["efficacy_margin"] == pytest.approx(0.5)
  assert m["paraphrase_score"] == 0.5  # tie fails, second passes
  assert m["paraphrase_score_sum"] == 0.5
  assert m["neighborhood_score"] == 1.0
  assert m["neighborhood_magnitude"] == pytest.approx(math.exp(-0.35) - math.exp(-4))
  assert m["rewrite_acc"] == 0.5 and m["rephrase_acc"] == pytest.approx(0.75)
  assert m["locality_acc"] == 0.5  # [2, 3] vs unedited [2, 4]
  assert m["portability_acc"] == pytest.approx(2 / 3)
  assert m["zsre_specificity"] == 1.0
  assert m["sr"] == 0.0 and m["gr"] == 0.5
  assert summary["efficacy_score"] == 100.0 and summary["gr"] == 50.0
  assert summary["efficacy_margin"] == pytest.approx(0.5)  # nats, not %


# -- loaders ---------------------------------------------------------------------

ROME_RECORD = {
    "case_id": 3, "pararel_idx": 1,
    "requested_rewrite": {"prompt": "The mother tongue of {} is",
                          "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"},
                          "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks",
                           "An album. Danielle Darrieux's mother tongue is"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of",
                             "The native language of Jean Renoir is"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


def test_rome_schema_counterfact(tmp_path):
  path = tmp_path / "counterfact.json"
  path.write_text(json.dumps([ROME_RECORD]))
  [case] = C.load_cases("counterfact", str(path))
  assert case.case_id == 3 and case.subject == "Danielle Darrieux"
  assert case.prompt == "The mother tongue of Danielle Darrieux is"
  assert (case.target_new, case.target_true) == (" English", " French")
  assert len(case.paraphrase_prompts) == 2
  assert case.neighborhood == (("Michel Rocard is a native speaker of", "French"),
                               ("The native language of Jean Renoir is", "French"))
  assert case.attribute_prompts and case.generation_prompts
  bad = dict(ROME_RECORD, requested_rewrite=dict(ROME_RECORD["requested_rewrite"],
                                                 target_new={"str": ""}))
  path.write_text(json.dumps([ROME_RECORD, bad]))
  with pytest.raises(errors.InputError, match=r"record 1.*target_new"):
    C.load_cases("counterfact", str(path))


def test_bundled_datasets_and_errors(tmp_path):
  cf = C.load_cases("counterfact", limit=2, start=5)
  raw = data.read_records("counterfact")[5:7]
  assert [c.case_id for c in cf] == [r["case_id"] for r in raw]
  assert cf[0].neighborhood
  zs = C.load_cases("zsre", limit=2)
  assert zs[0].portability and zs[0].neighborhood[0][0].endswith("?")
  assert zs[0].target_true == " 1998" and zs[0].case_id == 0
  mq = C.load_cases("mquake", limit=40)
  assert max(len(c.requests) for c in mq) > 1
  assert all(len(c.portability) == 3 and c.portability[0][2] for c in mq)
  facts = C.load_facts(limit=3)
  assert facts[0].text.startswith("Vinson Massif") and facts[0].answer
  assert C.load_facts(C.default_path("zsre"), limit=1)[0].answer == " 1998"
  claims = C.load_claims(limit=50)
  assert {c.label for c in claims} <= {"SUPPORTS", "REFUTES"} and len(claims) == 50
  # Round trip through the documented JSONL format.
  out = tmp_path / "mine.jsonl"
  C.to_jsonl(cf + mq[:3], str(out))
  assert C.load_cases("jsonl", str(out)) == [
      c.__class__(**{**c.__dict__, "source": "jsonl"}) for c in cf + mq[:3]]
  # Malformed records name the record and the field.
  rows = [{"prompt": "{} is", "subject": "X", "target_new": "y"},
          {"prompt": "Z is", "subject": "X", "target_new": "y"}]
  out.write_text("\n".join(json.dumps(r) for r in rows))
  with pytest.raises(errors.InputError, match=r"record 1.*subject 'X' does not occur"):
    C.load_cases("jsonl", str(out))
  out.write_text(json.dumps({"src": "q", "alt": "a", "subject": "q"}))
  with pytest.raises(errors.InputError, match="counterfact schema"):
    C.load_cases("counterfact", str(out), limit=1)
  with pytest.raises(errors.InputError, match="does not exist"):
    C.load_cases("zsre", str(tmp_path / "missing.json"))
  with pytest.raises(errors.InputError, match="unknown FEVER labels"):
    C.load_claims(labels=("TRUE",))


# -- protocols -------------------------------------------------------------------

def finetune_editor(steps=200, lr=1e-2):
  """A plain fine-tuning editor of the editor interface, for harness tests."""
  def init(model, params=None, **kw):
    return {"edits": 0}

  def apply(model, params, requests, state):
    requests = base.make_requests(requests)
    ids = [(model.encode(r.text), model.encode(r.target_new)) for r in requests]
    length = lm.bucket(max(len(p) + len(t) for p, t in ids))
    tokens = np.zeros((len(ids), length), np.int32)
    weight = np.zeros((len(ids), length - 1), np.float32)
    for i, (p, t) in enumerate(ids):
      tokens[i, :len(p) + len(t)] = p + t
      weight[i, len(p) - 1:len(p) + len(t) - 1] = 1
    mask = (tokens > 0) | (np.arange(length) == 0)

    def loss(p):
      logits, _ = lm.forward(model.config, p, jnp.asarray(tokens), jnp.asarray(mask, jnp.int32))
      lp = jax.nn.log_softmax(logits[:, :-1], -1)
      lp = jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
      return -(lp * weight).sum() / weight.sum()

    opt = optax.adam(lr)
    step = jax.jit(lambda p, s: (lambda l, g: (optax.apply_updates(
        p, opt.update(g, s, p)[0]), opt.update(g, s, p)[1]))(*jax.value_and_grad(loss)(p)))
    p, s = params, opt.init(params)
    for _ in range(steps):
      p, s = step(p, s)
    return p, {**state, "edits": state["edits"] + len(requests)}, base.EditInfo(
        changed={"all": {}})

  return base.FunctionalEditor("ft_test", None, init, apply)


def _cases(n, start=0):
  return C.load_cases("counterfact", limit=n, start=start)


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_four_protocols_with_a_finetuning_editor(model):
  cases, heldout = _cases(4), C.load_facts(C.default_path("counterfact"),
                                           limit=6, start=50)
  editor = finetune_editor()
  before = _copy(model.params)
  out = {}
  for mode, size in (("single", 1), ("batch", 2), ("sequential", 1),
                     ("sequential", 2)):
    proto = protocols.Protocol(mode, batch_size=size, fluency_tokens=6,
                               dd_every=1)
    out[mode, size] = r = protocols.run(model, editor, cases, proto,
                                        heldout=heldout, progress=False)
    assert r["n"] == 4 and len(r["cases"]) == 4
    if mode == "sequential":  # later edits may undo earlier ones
      assert r["metrics"]["sr_at_edit"] == 100.0
    else:
      assert r["metrics"]["sr"] == 100.0
      assert r["metrics"]["efficacy_score"] == 100.0
    assert r["protocol"]["successive"] == (mode == "sequential")
    assert "dd" in r["metrics"] and r["heldout"]["n"] == 6
  jax.tree.map(np.testing.assert_array_equal, model.params, before)
  seq = out["sequential", 1]
  assert [s["edits"] for s in seq["steps"]] == [1, 2, 3, 4]
  assert all({"sr_at_edit", "rr", "dd", "sr"} <= set(s) for s in seq["steps"])
  assert seq["steps"][0]["rr"] is None  # no earlier edit at step 1
  assert all(s["rr"] is not None for s in seq["steps"][1:])
  assert [s["edits"] for s in out["sequential", 2]["steps"]] == [2, 4]
  assert [r["step"] for r in seq["cases"]] == [1, 2, 3, 4]
  # The unedited baseline: same metric keys, no edits, DD 0 by definition.
  base_r = protocols.run(model, None, cases, protocols.Protocol(fluency=False),
                         heldout=heldout, progress=False)
  assert base_r["metrics"]["dd"] == 0.0 and base_r["metrics"]["locality_acc"] == 100.0
  assert base_r["metrics"]["sr"] < 100.0


def test_retain_rate_falls_when_later_edits_undo_earlier_ones(model):
  # Two cases on the same prompt with different targets: the second edit
  # overwrites the first. RR counts earlier edits only: none at step 1, and
  # at step 2 the one earlier edit no longer holds (0%, not the 50% of a
  # rate that also counted the edit just made); SR(all so far) is 50%.
  req = {"prompt": "The mother tongue of {} is", "subject": "Ann"}
  cases = [C.EditCase(i, (base.make_request(dict(req, target_new=t)),))
           for i, t in enumerate(["Dutch", "Greek"])]
  r = protocols.run(model, finetune_editor(), cases,
                    protocols.Protocol("sequential", fluency=False),
                    progress=False)
  assert [s["rr"] for s in r["steps"]] == [None, 0.0]
  assert [s["sr"] for s in r["steps"]] == [100.0, 50.0]
  assert [s["sr_at_edit_so_far"] for s in r["steps"]] == [100.0, 100.0]
  assert r["metrics"]["rr"] == 0.0 and r["metrics"]["sr_at_edit"] == 100.0


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_protocols_run_rome_and_memit(model, method, tmp_path):
  loose = dict(clamp_norm_factor=1e4, v_weight_decay=0.0, v_steps=8,
               v_compute_dtype="float32")
  if method == "rome":
    editor = editors.get(method, layer=1, use_covariance=False, **loose)
    state = editor.init(model, templates=("{}",))
  else:
    editor = editors.get(method, layers=(0, 1), **loose)
    state = editor.init(model, templates=("{}",),
                        covariance={l: np.eye(128) for l in (0, 1)})
  cases = _cases(3)
  for mode, size in (("single", 1), ("batch", 3), ("sequential", 1),
                     ("sequential", 3)):
    r = protocols.run(model, editor, cases, protocols.Protocol(
        mode, batch_size=size, fluency_tokens=4), state=state, progress=False,
        heldout=C.load_facts(C.default_path("counterfact"), limit=4, start=9))
    assert {"efficacy_score", "neighborhood_score", "rewrite_acc", "sr",
            "dd"} <= set(r["metrics"])
  paths = report.write(r, str(tmp_path))
  assert json.load(open(paths["results"]))["steps"][0]["edits"] == 3
  assert "| step |" in open(paths["summary"]).read()
  assert open(paths["plot"], "rb").read(4) == b"\x89PNG"


def test_scatter_draws_runs_with_both_metrics(tmp_path):
  runs = [("a", {"metrics": {"locality_acc": 90.0, "efficacy_score": 80.0}}),
          ("b", {"metrics": {"locality_acc": 70.0, "efficacy_score": None}}),
          ("c", {"metrics": {"locality_acc": 60.0, "efficacy_score": 99.0}})]
  path = str(tmp_path / "s.png")
  assert report.scatter(runs, path, "locality_acc", "efficacy_score") == [
      "a", "c"]
  assert open(path, "rb").read(4) == b"\x89PNG"


def test_protocol_errors_before_work(model):
  calls = []
  editor = base.FunctionalEditor(
      "spy", None, lambda m, p=None, **k: calls.append("init"),
      lambda *a: calls.append("apply"))
  for proto, cases, match in [
      (protocols.Protocol("single", batch_size=2), _cases(2), "mode='batch'"),
      (protocols.Protocol("online"), _cases(2), "mode='online'"),
      (protocols.Protocol(families=("bleu",)), _cases(2), "bleu"),
      (protocols.Protocol(), [], "no cases"),
      (protocols.Protocol(), _cases(1) * 2, "unique")]:
    with pytest.raises(errors.KeditError, match=match):
      protocols.run(model, editor, cases, proto, progress=False)
  assert not calls


def test_mquake_cases_edit_all_their_facts_and_score_portability(model):
  cases = [c for c in C.load_cases("mquake", limit=10) if len(c.requests) > 1][:1]
  assert cases
  r = protocols.run(model, finetune_editor(), cases,
                    protocols.Protocol("single", fluency=False), progress=False)
  m = r["metrics"]
  assert m["sr"] == 100.0  # every rewrite of the case was applied
  assert {"portability_acc", "portability_score", "efficacy_score"} <= set(m)


def test_cases_from_a_datasets_dataset():
  datasets = pytest.importorskip("datasets")
  rows = data.read_records("zsre")[:3]
  ds = datasets.Dataset.from_list([{k: r[k] for k in ("subject", "src", "alt", "answers",
                                                      "rephrase", "loc", "loc_ans")}
                                   for r in rows])
  cases = C.parse_cases(ds, "zsre")
  assert [c.target_new for c in cases] == [" " + r["alt"] for r in rows]


def test_results_table_rows_name_the_reproducing_command():
  from experiments import results_table
  results = {"method": "memit", "n": 100, "metrics": {"efficacy_score": 97.0, "rr": 91.5},
             "protocol": {"mode": "sequential", "batch_size": 10},
             "timing": {"total_seconds": 120.0},
             "command": {"dataset": "counterfact", "num_edits": 100}}
  row = results_table.row("x", results, ("efficacy_score", "dd", "rr"))
  assert "| 97.0 |  | 91.5 | 2.0 min |" in row
  assert ("`python -m experiments.evaluate --method=memit --dataset=counterfact "
          "--num_edits=100 --mode=sequential --batch_size=10`") in row
  # Every flag the JSON records that changes the run is in the command.
  results.update(method="mend", hparams={"checkpoint": "runs/m"},
                 protocol={"mode": "single", "batch_size": 1, "dd_every": 1},
                 command={"dataset": "zsre", "num_edits": 30,
                          "heldout": "known_1000", "heldout_size": 1000})
  assert results_table.command(results) == (
      "python -m experiments.evaluate --method=mend --dataset=zsre "
      "--num_edits=30 --config.mend.checkpoint=runs/m --mode=single "
      "--dd_every=1 --heldout_size=1000")  # known_1000: the default
  results["command"]["heldout"] = "auto"  # the default before
  assert "--dd_every=1 --heldout=auto --heldout_size=1000" in (
      results_table.command(results))


def test_sequential_checkpoints_are_linear_by_default(model):
  """Without eval_every, RR/SR over all earlier edits is measured at 10
  evenly spaced checkpoints (here every 2 of 12 steps) and at the end, not
  after every step; SR at edit time is still recorded for every step."""
  cases = _cases(12)
  r = protocols.run(model, finetune_editor(), cases,
                    protocols.Protocol("sequential", fluency=False),
                    progress=False)
  assert len(r["steps"]) == 12
  assert all("sr_at_edit" in s for s in r["steps"])
  assert [s["step"] for s in r["steps"] if "rr" in s] == [2, 4, 6, 8, 10, 12]
  assert r["protocol"]["eval_every"] == 2
  assert r["protocol"]["evaluated"] == "every 2 edit steps and at the end"
