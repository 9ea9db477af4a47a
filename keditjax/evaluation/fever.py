"""FEVER claims for the fact-checking editing experiment (De Cao et al. 2021).

  claims = fever.load("/path/fever1.0_paper_dev.jsonl")      # SUPPORTS/REFUTES
  splits = fever.split(claims, seed=0)                        # train/dev/test
  fever.rewrites("Youtube is not a website.")
  # -> {"true_that": "It is true that Youtube is not a website.", ...}

Loading. Every row must be a JSON object with an integer `id`, a non-empty
string `claim` and a `label` in SUPPORTS / REFUTES / NOT ENOUGH INFO; anything
else raises `InputError` naming the line and the field. NOT ENOUGH INFO rows
are dropped (the fact checker is binary: 0 = SUPPORTS, 1 = REFUTES). The same
claim text can occur several times; a text is kept once, and a text seen with
both labels is dropped (it cannot be learned from the claim alone).

Splitting. `split` sorts the claims by id, permutes them with
`numpy.random.default_rng(seed)` and cuts 60/20/20: the result depends only
on the claim set and the seed, not on the file's row order, and since texts
are unique no claim text is in two splits.

The equivalence set (GR). FEVER has no paraphrases, so a claim's equivalence
set is built by rules that cannot change its truth value, and so not its
verdict. Each rule keeps the claim's words verbatim (case included; the
MiniLM tokenizer is uncased anyway), so every entity of the claim is in
every rewrite:

  true_that      "X."  -> "It is true that X."      (a true claim stays true,
                                                     a false one stays false)
  the_case_that  "X."  -> "It is the case that X."
  indeed         "X."  -> "Indeed, X."
  contraction    "is not" <-> "isn't" (also are/was/were/does/do/did/has/
                 have/had/could/would/should, and "cannot" <-> "can't"),
                 applied in the direction the claim allows; only claims
                 with such a negation get this rewrite.

X is the claim without its final period. A claim with no applicable rule
cannot occur (the three prefix rules always apply). The knowledge editor is
trained with `TRAIN_RULES` only, so GR on the other rules measures
generalization to phrasings never seen in training.

Edit cases (`edit_cases`): claims of the test split whose predicted verdict
is flipped: SR is the % of edits after which the edited model predicts the
new verdict on the claim, GR the % of the claim's rewrites that get the new
verdict (`gr_heldout_rules`: only rewrites by rules outside TRAIN_RULES), DD
the drop in accuracy (points) on the test claims other than the edit cases,
and `retained_verdicts` the % of those claims whose verdict did not change
(stricter than DD: changed verdicts can cancel out in the accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Sequence

import numpy as np

from keditjax import data, errors
from keditjax import progress as progress_lib

LABELS = ("SUPPORTS", "REFUTES")
NEI = "NOT ENOUGH INFO"
RULES = ("true_that", "the_case_that", "indeed", "contraction")
TRAIN_RULES = ("true_that", "contraction")

_AUX = ("is", "are", "was", "were", "does", "do", "did", "has", "have", "had",
        "could", "would", "should")
_EXPAND = re.compile(r"\b(" + "|".join(_AUX) + r") not\b", re.IGNORECASE)
_CONTRACT = re.compile(r"\b(" + "|".join(_AUX) + r")n't\b", re.IGNORECASE)
_CANNOT = re.compile(r"\bcannot\b", re.IGNORECASE)
_CANT = re.compile(r"\bcan't\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Claim:
  """One FEVER claim: `label` 0 = SUPPORTS, 1 = REFUTES."""
  id: int
  claim: str
  label: int


def load(path: str) -> list[Claim]:
  """The SUPPORTS/REFUTES claims of a FEVER jsonl file, unique texts.

  Args:
    path: a FEVER 1.0 jsonl file (`id`, `claim`, `label`, ... per line;
      optionally .gz) or a `keditjax.data` name ("fever": the bundled dev).

  Returns:
    `Claim`s in file order (first occurrence of each text).

  Raises:
    InputError: a missing or empty file, a row that is not a JSON object, or
      a row whose `id`, `claim` or `label` is missing or malformed.
  """
  path = data.path(path, kind="dataset")  # kind applies to names only
  by_text: dict[str, Claim] = {}
  conflicting: set[str] = set()
  rows = 0
  with data.open_text(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      rows += 1
      where = f"{path}:{line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.InputError(f"{where}: not valid JSON ({e}).") from e
      if not isinstance(row, dict):
        raise errors.InputError(f"{where}: a row must be a JSON object.")
      cid, text, label = row.get("id"), row.get("claim"), row.get("label")
      if not isinstance(cid, int) or isinstance(cid, bool):
        raise errors.InputError(f"{where}: 'id' must be an integer, got {cid!r}.")
      if not isinstance(text, str) or not text.strip():
        raise errors.InputError(
            f"{where}: 'claim' must be a non-empty string, got {text!r}.")
      if label not in LABELS + (NEI,):
        raise errors.InputError(
            f"{where}: 'label' is {label!r}; valid: {LABELS + (NEI,)}.")
      if label == NEI:
        continue
      text = " ".join(text.split())
      claim = Claim(cid, text, LABELS.index(label))
      if text in by_text and by_text[text].label != claim.label:
        conflicting.add(text)
      by_text.setdefault(text, claim)
  if not rows:
    raise errors.InputError(f"FEVER file {path!r} has no rows.")
  claims = [c for t, c in by_text.items() if t not in conflicting]
  if not claims:
    raise errors.InputError(f"FEVER file {path!r} has no SUPPORTS/REFUTES claim.")
  return claims


def split(claims: Sequence[Claim], *, seed: int = 0,
          fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> dict:
  """A seeded train/dev/test split (see the module docstring).

  Returns:
    {"train": [...], "dev": [...], "test": [...]} lists of `Claim`.

  Raises:
    ConfigError: fractions that are not three positive numbers summing to 1.
  """
  if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
    raise errors.ConfigError(
        f"fractions={fractions} must be three positive numbers summing to 1.")
  ordered = sorted(claims, key=lambda c: c.id)
  order = np.random.default_rng(seed).permutation(len(ordered))
  n_train = int(round(fractions[0] * len(ordered)))
  n_dev = int(round(fractions[1] * len(ordered)))
  pick = lambda idx: [ordered[i] for i in idx]
  return {"train": pick(order[:n_train]),
          "dev": pick(order[n_train:n_train + n_dev]),
          "test": pick(order[n_train + n_dev:])}


def _body(claim: str) -> str:
  claim = claim.strip()
  return claim[:-1].rstrip() if claim.endswith(".") else claim


def _contraction(claim: str) -> str | None:
  """Expands the first contracted negation, else contracts the first
  expanded one; None when the claim has neither."""
  for pattern, repl in ((_CONTRACT, lambda m: m.group(1) + " not"),
                        (_CANT, lambda m: m.group(0)[:2] + "nnot"),
                        (_EXPAND, lambda m: m.group(1) + "n't"),
                        (_CANNOT, lambda m: m.group(0)[:2] + "n't")):
    if pattern.search(claim):
      return pattern.sub(repl, claim, count=1)
  return None


def rewrites(claim: str, rules: Sequence[str] = RULES) -> dict[str, str]:
  """The meaning-preserving rewrites of `claim` under `rules`.

  Returns:
    rule name -> rewritten claim, for the rules that apply.

  Raises:
    ConfigError: an unknown rule name.
  """
  unknown = sorted(set(rules) - set(RULES))
  if unknown:
    raise errors.ConfigError(f"unknown rewrite rules {unknown}; valid: {RULES}.")
  body, out = _body(claim), {}
  for rule in rules:
    if rule == "true_that":
      out[rule] = f"It is true that {body}."
    elif rule == "the_case_that":
      out[rule] = f"It is the case that {body}."
    elif rule == "indeed":
      out[rule] = f"Indeed, {body}."
    else:
      contracted = _contraction(claim)
      if contracted is not None:
        out[rule] = contracted
  return out


@dataclasses.dataclass(frozen=True)
class EditCase:
  """A verdict flip: the model predicted `old` on `claim`; make it `new`."""
  claim: Claim
  old: int
  new: int
  rewrites: dict

  def request(self) -> dict:
    """The request editors take: the claim and the new verdict."""
    return {"claim": self.claim.claim, "label": self.new,
            "case_id": self.claim.id}


def edit_cases(test: Sequence[Claim], predictions: np.ndarray, n: int, *,
               seed: int = 0) -> list[EditCase]:
  """`n` test claims (a seeded choice) with their predicted verdict flipped.

  Args:
    test: the test claims.
    predictions: the unedited model's predicted label of each test claim.
    n: number of edit cases.
    seed: seed of the choice.

  Raises:
    ConfigError: n outside [1, len(test)], or predictions of the wrong shape.
  """
  predictions = np.asarray(predictions)
  if predictions.shape != (len(test),):
    raise errors.ConfigError(
        f"predictions shape {predictions.shape} != ({len(test)},).")
  if not 1 <= n <= len(test):
    raise errors.ConfigError(f"n={n} edits must be in [1, {len(test)}].")
  chosen = np.random.default_rng(seed).permutation(len(test))[:n]
  return [EditCase(test[i], int(predictions[i]), 1 - int(predictions[i]),
                   rewrites(test[i].claim)) for i in sorted(chosen)]


def summarize(per_edit: Sequence[dict]) -> dict:
  """SR, GR (%) and DD (points) from per-edit records.

  Each record has `success` (bool), `rewrites_hit`/`rewrites` (counts) and
  `acc_before`/`acc_after` (fractions on the retained test claims); when
  every record has them, `heldout_hit`/`heldout` (rewrites by rules outside
  `TRAIN_RULES`) give `gr_heldout_rules` (%), and `retained` (the fraction
  of retained claims whose verdict did not change) `retained_verdicts` (%).
  """
  if not per_edit:
    raise errors.InputError("no edits to summarize.")
  ratio = lambda hit, total: 100.0 * sum(r.get(hit, 0) for r in per_edit) / max(
      sum(r.get(total, 0) for r in per_edit), 1)
  out = {"sr": 100.0 * float(np.mean([r["success"] for r in per_edit])),
         "gr": ratio("rewrites_hit", "rewrites"),
         "dd": 100.0 * float(np.mean([r["acc_before"] - r["acc_after"]
                                      for r in per_edit])),
         "edits": len(per_edit)}
  if all("heldout" in r for r in per_edit):
    out["gr_heldout_rules"] = ratio("heldout_hit", "heldout")
  if all("retained" in r for r in per_edit):
    out["retained_verdicts"] = 100.0 * float(np.mean([r["retained"]
                                                      for r in per_edit]))
  return out


class EditEvaluation:
  """SR, GR and DD of single, non-successive edits of a fact checker.

  Every edit starts from the same `params`; the edited model is scored on
  the hidden states entering block `start`, computed once under `params`,
  which is exact as long as an edit changes only blocks >= `start` and the
  head (checked on every edit). The retained claims (DD) are grouped by
  16-token length bucket so each group runs at its own length.

  Args:
    checker: a `models.fact_checker.FactChecker`.
    params: the unedited weights.
    cases: the `EditCase`s.
    retained: the claims DD is measured on (the test claims minus the cases).
    start: the lowest encoder block any evaluated editor changes.
  """

  def __init__(self, checker, params, cases, retained, *, start: int):
    self.checker, self.params, self.cases, self.start = (checker, params,
                                                         list(cases), start)
    self.cases_x = checker.hidden(params, [c.claim.claim for c in cases], start)
    texts = [r for c in cases for r in c.rewrites.values()]
    self.owner = np.asarray([i for i, c in enumerate(cases)
                             for _ in c.rewrites], np.int64)
    self.heldout = np.asarray([rule not in TRAIN_RULES for c in cases
                               for rule in c.rewrites], bool)
    self.rewrites_x = checker.hidden(params, texts, start) if texts else None
    lengths = np.asarray([len(t) for t in checker.tokenize(
        [c.claim for c in retained])])
    buckets = -(-lengths // 16) * 16
    self.groups = []
    for length in sorted(set(buckets.tolist())):
      idx = np.flatnonzero(buckets == length)
      group = checker.hidden(params, [retained[i].claim for i in idx], start,
                             length=int(length))
      self.groups.append((group, np.asarray([retained[i].label for i in idx])))
    self.frozen_prefix = [("encoder", "embeddings")] + [
        ("encoder", f"layer_{i}") for i in range(start)]
    self.preds_before = self.predictions(params)
    self.labels = np.concatenate([y for _, y in self.groups])
    self.acc_before = float(np.mean(self.preds_before == self.labels))

  def predictions(self, params) -> np.ndarray:
    """Verdicts on the retained claims (in group order)."""
    return np.concatenate([self.checker.predict(params, g)
                           for g, _ in self.groups])

  def _check_frozen(self, new_params):
    for outer, inner in self.frozen_prefix:
      old, new = self.params[outer][inner], new_params[outer][inner]
      for a, b in zip(jax_leaves(old), jax_leaves(new)):
        if a is not b and not np.array_equal(np.asarray(a), np.asarray(b)):
          raise errors.ConfigError(
              f"an editor changed {outer}/{inner}, below block {self.start}; "
              "this evaluation assumes blocks < start are untouched.")

  def run(self, edit_fn, *, progress: bool = True, desc: str = "edits"):
    """Applies `edit_fn(params, case) -> new_params` to every case.

    Returns:
      (summary, per_edit): `summarize`'s dict and one record per edit.
    """
    records = []
    for i, case in enumerate(progress_lib.bar(self.cases, desc=desc,
                                       disable=not progress)):
      new_params = edit_fn(self.params, case)
      self._check_frozen(new_params)
      row = {k: v[i:i + 1] for k, v in self.cases_x.items()}
      success = int(self.checker.predict(new_params, row)[0]) == case.new
      mine = np.flatnonzero(self.owner == i)
      hits = np.zeros(len(mine), bool)
      if len(mine):
        batch = {k: v[mine] for k, v in self.rewrites_x.items()}
        hits = self.checker.predict(new_params, batch) == case.new
      preds = self.predictions(new_params)
      records.append({
          "case_id": case.claim.id, "success": bool(success),
          "rewrites_hit": int(hits.sum()), "rewrites": len(mine),
          "heldout_hit": int(hits[self.heldout[mine]].sum()),
          "heldout": int(self.heldout[mine].sum()),
          "acc_before": self.acc_before,
          "acc_after": float(np.mean(preds == self.labels)),
          "retained": float(np.mean(preds == self.preds_before))})
    return summarize(records), records


def jax_leaves(tree):
  """The leaves of a nested dict in a fixed order (no jax import needed)."""
  if isinstance(tree, dict):
    return [leaf for k in sorted(tree) for leaf in jax_leaves(tree[k])]
  return [tree]


def make_evaluation(checker, claims, n: int, *, seed: int = 0,
                    retained: int = 0, start: int | None = None):
  """An `EditEvaluation` of `n` seeded flips of `claims` (the checker's own
  predictions flipped), DD on the other claims (the first `retained` of
  them; 0: all), from block `start` (default: the top block)."""
  preds = checker.predict(checker.params,
                          checker.text_batch([c.claim for c in claims]))
  cases = edit_cases(claims, preds, n, seed=seed)
  edited = {c.claim.id for c in cases}
  kept = [c for c in claims if c.id not in edited]
  kept = kept[:retained or len(kept)]
  start = checker.config.encoder.num_layers - 1 if start is None else start
  return EditEvaluation(checker, checker.params, cases, kept, start=start)


def choose(sweep: dict, max_dd: float = 2.0):
  """The sweep key with the best SR among those with DD <= `max_dd` (ties:
  lower DD); the lowest-DD key when none qualifies."""
  ok = [k for k in sweep if sweep[k]["dd"] <= max_dd] or [
      min(sweep, key=lambda k: sweep[k]["dd"])]
  return max(ok, key=lambda k: (sweep[k]["sr"], -sweep[k]["dd"]))


def summary_markdown(results: dict, num_edits: int) -> str:
  """A results.json as a markdown table."""
  lines = [f"Fact checker test accuracy: "
           f"{results['classifier']['test_accuracy']:.1f}%; {num_edits} "
           "single edits (flipped verdicts).", "",
           "| method | SR % | GR % | GR held-out rules % | DD (points) | "
           "unchanged verdicts % |", "| --- | --- | --- | --- | --- | --- |"]
  for name, method in results["methods"].items():
    m = method["metrics"]
    extra = lambda k: f"{m[k]:.1f}" if k in m else "-"
    lines.append(f"| {name} | {m['sr']:.1f} | {m['gr']:.1f} | "
                 f"{extra('gr_heldout_rules')} | {m['dd']:.2f} | "
                 f"{extra('retained_verdicts')} |")
  return "\n".join(lines) + "\n"


def accuracy(checker, claims, params=None) -> float:
  """% of `claims` whose verdict the checker gets right (full forward)."""
  params = checker.params if params is None else params
  preds = checker.predict(params, checker.text_batch([c.claim for c in claims]))
  return 100.0 * float(np.mean(preds == np.asarray([c.label for c in claims])))
