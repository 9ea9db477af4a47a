"""Fuzzing every LM editor's public API with generated requests (issue 20).

Each method gets `N_PER_METHOD` cases from `tests/fuzz_cases.py` (empty,
whitespace, huge, lone-surrogate, NUL, bytes and unicode-heavy text, subjects
not in the prompt, stray format fields, wrong types, garbage, NaN/inf/
negative/huge/wrong-type hyper-parameters through `editors.get`, duplicate
and conflicting edits). Every case must succeed or raise a
`keditjax.errors.KeditError` naming the problem; any other exception fails
with the case's kind. Neither the model's params nor the editor state given
to `apply` may change, whatever the outcome.

Choices the cases pin down:
  * identical requests in one batch are allowed (each method edits them as
    it edits any batch: MEMIT solves with the key twice, ROME/GRACE/WISE
    write the second on top of the first);
  * two requests for the same prompt and subject with different targets in
    one batch are refused by `make_requests` for every method ("conflicting
    requests"): no edit satisfies both, and a batch method would average
    them;
  * a prompt holds exactly one `{}` and no other brace;
  * text must be valid UTF-8 (a lone surrogate is refused; NUL is allowed);
  * a request that does not fit the model's context (with the editor's
    context templates) is refused before any model work;
  * hyper-parameters are checked against their annotations by
    `editors.get` (`check_hparams`): NaN/inf, bools for numbers, wrong
    types, lists for tuples; negative, zero and huge values are left to
    each method's own checks (hyper-parameter cases go through `get` only:
    building and applying every accepted override would compile a new
    editor per case).

Set KEDITJAX_FUZZ_REPORT=path.json to write the count table; run with -s to
see it printed.
"""

import collections
import json
import os

import jax
import numpy as np
import pytest

from keditjax import editors, errors
from keditjax.models import tiny
from tests import fuzz_cases
from tests.test_editor_contract import build

N_PER_METHOD = 75
MAX_VALID = 2  # real edits per method (the rest is refused in validation)
CLASSIFIER_ONLY = {
    "mend_classifier": "edits text classifiers (FEVER fact checkers)",
    "knowledge_editor": "edits text classifiers (FEVER fact checkers)",
    "enn": "edits image classifiers",
}
LM_METHODS = sorted(set(editors.METHODS) - set(CLASSIFIER_ONLY))
COUNTS = {}  # method -> Counter of outcomes


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_lm()


def _leaves(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, leaves, [np.array(x) for x in leaves]


def _assert_untouched(before, tree, what):
  treedef, leaves, values = before
  now, now_def = jax.tree.leaves(tree), jax.tree.structure(tree)
  assert now_def == treedef, f"{what}: the pytree's structure changed"
  for old, new, value in zip(leaves, now, values):
    assert old is new, f"{what}: a leaf was replaced"
    np.testing.assert_array_equal(np.asarray(new), value, err_msg=what)


def _run(method, case, model, editor, state):
  """`(outcome, message)`: "ok"/"refused" from `apply`, "ok@get"/
  "refused@get" for hyper-parameter cases (through `editors.get` only:
  building and applying each accepted override would compile a new editor
  per case)."""
  if case.hparams is not None:
    try:
      editors.get(method, editor.hparams, **case.hparams)
    except errors.KeditError as e:
      return "refused@get", str(e)
    return "ok@get", ""
  try:
    editor.apply(model, model.params, case.requests, state)
  except errors.KeditError as e:
    return "refused", str(e)
  return "ok", ""


@pytest.mark.parametrize("method", sorted(editors.METHODS))
def test_every_case_succeeds_or_is_refused_by_name(model, method):
  if method in CLASSIFIER_ONLY:
    pytest.skip(f"{method} {CLASSIFIER_ONLY[method]}, not decoder LMs")
  editor, state = build(method, model)
  cases = fuzz_cases.generate(
      N_PER_METHOD, seed=LM_METHODS.index(method),
      hparams_class=editors.hparams_class(method), max_valid=MAX_VALID)
  params_before, state_before = _leaves(model.params), _leaves(state)
  counts, failures = collections.Counter(), []
  for case in cases:
    where = f"{method} case {case.kind!r}"
    try:
      outcome, message = _run(method, case, model, editor, state)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"{where}: {type(e).__name__}: {str(e)[:300]}")
      counts["crashed"] += 1
      continue
    counts[outcome] += 1
    if outcome.startswith("ok") and case.expect == "refused":
      failures.append(f"{where}: accepted, should be refused")
    elif outcome.startswith("refused") and case.expect == "ok":
      failures.append(f"{where}: refused a valid request: {message[:300]}")
    elif outcome.startswith("refused") and case.words and not any(
        w in message.lower() for w in case.words):
      failures.append(f"{where}: the message names none of {case.words}: "
                      f"{message[:300]}")
    _assert_untouched(params_before, model.params, f"{where}: params")
    _assert_untouched(state_before, state, f"{where}: state")
  COUNTS[method] = counts
  assert not failures, "\n".join(failures)


def test_counts_cover_a_thousand_requests():
  """The method × outcome table (after the per-method tests)."""
  if set(COUNTS) != set(LM_METHODS):
    pytest.skip("needs every per-method fuzz test in this session")
  outcomes = ("ok", "refused", "ok@get", "refused@get", "crashed")
  lines = [f"{'method':<12}" + "".join(f"{o:>13}" for o in outcomes) +
           f"{'total':>8}"]
  for method in LM_METHODS:
    c = COUNTS[method]
    lines.append(f"{method:<12}" + "".join(f"{c[o]:>13}" for o in outcomes)
                 + f"{sum(c.values()):>8}")
  total = collections.Counter()
  for c in COUNTS.values():
    total.update(c)
  lines.append(f"{'all':<12}" + "".join(f"{total[o]:>13}" for o in outcomes)
               + f"{sum(total.values()):>8}")
  print("\n" + "\n".join(lines))
  path = os.environ.get("KEDITJAX_FUZZ_REPORT")
  if path:
    with open(path, "w") as f:
      json.dump({"per_method": {m: dict(c) for m, c in COUNTS.items()},
                 "total": dict(total), "skipped": CLASSIFIER_ONLY}, f,
                indent=2, sort_keys=True)
  assert sum(total.values()) >= 1000
  assert total["crashed"] == 0


def test_generator_is_deterministic_and_covers_every_family():
  a = fuzz_cases.generate(300, seed=1, hparams_class=editors.hparams_class(
      "rome"), max_valid=12)
  b = fuzz_cases.generate(300, seed=1, hparams_class=editors.hparams_class(
      "rome"), max_valid=12)
  assert [(c.kind, c.expect, c.words, c.hparams is None) for c in a] == [
      (c.kind, c.expect, c.words, c.hparams is None) for c in b]
  families = {c.kind.split("/")[0] for c in a}
  assert {"valid", "empty", "whitespace", "huge", "surrogate", "bytes",
          "subject", "format", "type", "rewrite", "garbage", "batch",
          "unicode", "nul", "hparams"} <= families
  assert sum(c.expect != "refused" and c.hparams is None for c in a) == 12
  assert all(len(c.requests["prompt"]) > fuzz_cases.HUGE for c in a
             if c.kind == "huge/prompt")


def test_hparams_type_check_is_explicit():
  for bad in (dict(v_lr=float("nan")), dict(v_lr=float("inf")),
              dict(v_steps=True), dict(v_steps=2.5), dict(layer="4"),
              dict(context_lengths=(("a", 1),)), dict(v_steps=2 ** 63)):
    with pytest.raises(errors.ConfigError, match=next(iter(bad))):
      editors.get("rome", **bad)
  with pytest.raises(errors.ConfigError, match="layers"):
    editors.get("memit", layers=(1, float("nan")))
  with pytest.raises(errors.ConfigError, match="layers"):
    editors.get("memit", layers=[1, 2])  # unhashable
  v_lr = editors.get("rome", v_lr=2 ** 63).hparams.v_lr
  assert isinstance(v_lr, float) and v_lr == 2.0 ** 63  # an int is a float
  with pytest.raises(errors.ConfigError, match="RomeHParams"):
    editors.get("rome", editors.hparams_class("memit")())
