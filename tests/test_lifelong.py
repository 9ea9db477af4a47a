"""Lifelong runs: checkpoints, resuming after a kill to the same result,
refusing other settings by name, perplexity and the params delta."""

import os
import shutil

import jax
import numpy as np
import pytest

from keditjax import editors, errors
from keditjax.editors import base
from keditjax.evaluation import cases as C
from keditjax.evaluation import lifelong
from keditjax.models import tiny


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_lm(embed_std=1.0)


def _cases(n=6):
  out = []
  for i in range(n):
    req = base.make_request({"prompt": "{} lives in", "subject": f"Name{i}",
                             "target_new": f"city{i}",
                             "target_true": "Paris"})
    out.append(C.EditCase(i, (req,), paraphrase_prompts=(f"Name{i} is in",),
                          neighborhood=((f"Other{i} lives in", "Paris"),)))
  return out


KNOWN = [C.Fact("{} lives in", f"Known{i}", "Rome") for i in range(3)]
PLAN = lifelong.Plan(batch_size=2, checkpoint_every=2,
                     families=("counterfact", "token"))
SETTINGS = {"dataset": "synthetic"}


def _editor(lr=0.5):
  return editors.get("ultraedit", layers=(2, 3), lr=lr)


def _ppl_rows():
  return np.random.default_rng(0).integers(0, 258, (3, 12)).astype(np.int32)


def _quality(points):
  return [{k: v for k, v in p.items() if "seconds" not in k} for p in points]


class Killed(Exception):
  pass


def test_a_killed_run_resumes_to_the_same_params_and_metrics(model, tmp_path):
  whole = lifelong.run(model, _editor(), _cases(), PLAN, known=KNOWN,
                       ppl_rows=_ppl_rows(), workdir=str(tmp_path / "a"),
                       settings=SETTINGS, progress=False)
  assert [p["edits"] for p in whole["checkpoints"]] == [2, 4, 6]
  assert whole["checkpoints"][0]["rr"] is None
  assert whole["resumed_from"] == 0
  assert whole["baseline"]["known_accuracy"] == whole["checkpoints"][0][
      "dd_ceiling"]

  seen = []

  def kill_after_two(point):
    seen.append(point["edits"])
    if len(seen) == 2:
      raise Killed

  work = str(tmp_path / "b")
  with pytest.raises(Killed):
    lifelong.run(model, _editor(), _cases(), PLAN, known=KNOWN,
                 ppl_rows=_ppl_rows(), workdir=work, settings=SETTINGS,
                 progress=False, on_checkpoint=kill_after_two)
  # A kill between the two renames of the next save, with a stray
  # half-written temporary folder: the last finished checkpoint is used.
  os.replace(os.path.join(work, "checkpoint"),
             os.path.join(work, "checkpoint.old"))
  os.makedirs(os.path.join(work, "checkpoint.tmp"))
  again = lifelong.run(model, _editor(), _cases(), PLAN, known=KNOWN,
                       ppl_rows=_ppl_rows(), workdir=work, settings=SETTINGS,
                       progress=False)
  assert again["resumed_from"] == 2  # two turns were done and saved
  assert _quality(again["checkpoints"]) == _quality(whole["checkpoints"])
  for a, b in zip(jax.tree.leaves(again["params"]),
                  jax.tree.leaves(whole["params"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(again["state"]),
                  jax.tree.leaves(whole["state"])):
    np.testing.assert_array_equal(a, b)
  # Finished: running it again only reads the results back.
  done = lifelong.run(model, _editor(), _cases(), PLAN, known=KNOWN,
                      ppl_rows=_ppl_rows(), workdir=work, settings=SETTINGS,
                      progress=False)
  assert done["resumed_from"] == 3
  assert _quality(done["checkpoints"]) == _quality(whole["checkpoints"])


def test_resuming_with_other_settings_is_refused_by_name(model, tmp_path):
  work = str(tmp_path)
  kill = lambda point: (_ for _ in ()).throw(Killed)  # pylint: disable=g-long-lambda
  with pytest.raises(Killed):
    lifelong.run(model, _editor(), _cases(), PLAN, workdir=work,
                 settings=SETTINGS, progress=False, on_checkpoint=kill)
  for kwargs, name in (
      (dict(editor=_editor(lr=0.25)), "hparams"),
      (dict(editor=editors.get("ft")), "method"),
      (dict(cases=_cases()[::-1]), "cases"),
      (dict(plan=lifelong.Plan(batch_size=2, checkpoint_every=4,
                               families=PLAN.families)), "plan"),
      (dict(settings={"dataset": "other"}), "dataset")):
    args = dict(editor=_editor(), cases=_cases(), plan=PLAN,
                settings=SETTINGS)
    args.update(kwargs)
    with pytest.raises(errors.ConfigError, match=name):
      lifelong.run(model, args["editor"], args["cases"], args["plan"],
                   workdir=work, settings=args["settings"], progress=False)


def test_sampled_checkpoints_score_a_fixed_subset(model):
  plan = lifelong.Plan(batch_size=2, checkpoint_every=2, sample=3,
                       families=("counterfact",))
  partial = []
  out = lifelong.run(model, _editor(), _cases(), plan, progress=False,
                     on_results=partial.append)
  # 2 edits: all; 4: a sample of 3; the last checkpoint: every edit.
  assert [p["scored"] for p in out["checkpoints"]] == [2, 3, 6]
  # Results so far after every checkpoint, complete at the last.
  assert [(r["edits_done"], r["complete"]) for r in partial] == [
      (2, False), (4, False), (6, True)]
  assert out["timing"]["edit_seconds_per_edit"] == pytest.approx(
      out["timing"]["edit_seconds_total"] / 6)


def test_plan_validation():
  with pytest.raises(errors.ConfigError, match="multiple"):
    lifelong.Plan(batch_size=3, checkpoint_every=4).validate()
  with pytest.raises(errors.ConfigError, match="families"):
    lifelong.Plan(families=("nonsense",)).validate()


def test_perplexity_matches_numpy(model):
  rows = _ppl_rows()
  logits = np.asarray(model.apply(model.params, rows), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp[:, :-1], rows[:, 1:, None], -1)
  want = float(np.exp(nll.mean()))
  assert lifelong.perplexity(model, model.params, rows, batch=2) == (
      pytest.approx(want, rel=1e-4))


def test_params_delta_keeps_changed_leaves_and_new_subtrees():
  w, b = np.ones((2, 2), np.float32), np.zeros(2, np.float32)
  params0 = {"blk": {"w": w, "b": b}, "emb": np.ones(3, np.float32)}
  params = {"blk": {"w": w + 1, "b": b.copy()}, "emb": params0["emb"],
            "adapters": {"layer/1/mlp/value": (np.arange(3.0),)}}
  delta = lifelong.params_delta(params0, params)
  assert list(delta["changed"]) == ["blk/w"]  # b was copied, not changed
  assert list(delta["extra"]) == ["adapters"]
  back = lifelong.params_from_delta(params0, delta)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
