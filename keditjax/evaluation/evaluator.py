"""Scores `EditCase`s under a parameter pytree: every metric family at once.

  ref = reference(model, model.params, cases)        # unedited top-1 tokens
  per_case, summary = evaluate(model, new_params, cases, ref)

All (prompt, target) pairs of all cases go through one batched, jitted
teacher-forced pass (`scoring.teacher_forced`); the metric families then read
what they need:

  counterfact  efficacy/paraphrase/neighborhood `_score` (mean per-token
               log-prob comparison, ROME), `_score_sum` (summed log-prob),
               `_magnitude` (probability difference), `_margin` (log-prob
               difference, nats)
  token        EasyEdit's teacher-forced accuracies: rewrite_acc,
               rephrase_acc, locality_acc (agreement with the unedited
               model's top-1 tokens), portability_acc
  zsre         zsre_efficacy, zsre_paraphrase (token accuracy of the new
               answer), zsre_specificity (token accuracy of the neighbourhood
               question's true answer), as ROME and MEND report them
  survey       sr and gr (exact match: greedy decoding yields the target)

Per-case values are fractions (or nats for margins); `summarize` averages
over the cases that have a value and reports percentages.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from keditjax import errors
from keditjax.evaluation import metrics as M
from keditjax.evaluation import scoring
from keditjax.evaluation.cases import EditCase, Fact

FAMILIES = ("counterfact", "token", "zsre", "survey")

# Keys whose per-case values are not fractions (not scaled to percent).
_RAW = ("_margin",)


@dataclasses.dataclass(frozen=True)
class Reference:
  """The unedited model's top-1 tokens on every neighbourhood pair (for
  EasyEdit's locality), keyed by (case_id, neighbourhood index)."""
  argmax: dict


def _check_families(families):
  unknown = sorted(set(families) - set(FAMILIES))
  if unknown:
    raise errors.ConfigError(f"unknown metric families {unknown}; use {FAMILIES}.")


def reference(model, params, cases: Sequence[EditCase],
              batch_size: int = 64) -> Reference:
  """Top-1 tokens of the (unedited) `params` on the neighbourhood pairs.

  Raises:
    InputError: two cases share an id (their references would collide).
  """
  check_unique_ids(cases)
  keys, prompts, targets = [], [], []
  for case in cases:
    for j, (p, a) in enumerate(case.neighborhood):
      keys.append((case.case_id, j))
      prompts.append(p)
      targets.append(a)
  scored = scoring.teacher_forced(model, params, prompts, targets, batch_size)
  return Reference({k: s.argmax for k, s in zip(keys, scored)})


def check_unique_ids(cases: Sequence[EditCase]) -> None:
  """InputError naming the repeated case ids, if any."""
  seen, repeated = set(), []
  for case in cases:
    key = str(case.case_id)
    if key in seen:
      repeated.append(case.case_id)
    seen.add(key)
  if repeated:
    raise errors.InputError(
        f"case ids must be unique; repeated: {repeated[:5]}"
        f"{' ...' if len(repeated) > 5 else ''} (QAEdit repeats ids across "
        "its sources: give the cases unique ids).")


def _pairs(case: EditCase, families):
  """(kind, index, prompt, target) for everything the families read."""
  out = []
  cf = "counterfact" in families
  for i, q in enumerate(case.requests):
    out.append(("edit_new", i, q.text, q.target_new))
    if cf and q.target_true:
      out.append(("edit_true", i, q.text, q.target_true))
  for j, p in enumerate(case.paraphrase_prompts):
    out.append(("para_new", j, p, case.target_new))
    if cf and case.target_true:
      out.append(("para_true", j, p, case.target_true))
  for j, (p, a) in enumerate(case.neighborhood):
    out.append(("neigh_ans", j, p, a))
    if cf:
      out.append(("neigh_new", j, p, case.target_new))
  for j, (p, a, old) in enumerate(case.portability):
    out.append(("port_new", j, p, a))
    if cf and old:
      out.append(("port_old", j, p, old))
  return out


def _case_metrics(case, got, families, ref):
  """Per-case metric values from the scored pairs `got[(kind, index)]`."""
  m = {}

  def mean_lp(kind, i, red="mean"):
    return M.logprob(got[(kind, i)].logprobs, red)

  def comparisons(name, wanted, other, n):
    rows = [i for i in range(n) if (other, i) in got]
    if not rows:
      return
    m[f"{name}_score"] = np.mean([M.prefers(mean_lp(wanted, i), mean_lp(other, i))
                                  for i in rows])
    m[f"{name}_score_sum"] = np.mean([
        M.prefers(mean_lp(wanted, i, "sum"), mean_lp(other, i, "sum"))
        for i in rows])
    m[f"{name}_magnitude"] = np.mean([
        M.magnitude(mean_lp(wanted, i), mean_lp(other, i)) for i in rows])
    m[f"{name}_margin"] = np.mean([mean_lp(wanted, i) - mean_lp(other, i)
                                   for i in rows])

  n_req, n_para = len(case.requests), len(case.paraphrase_prompts)
  n_neigh, n_port = len(case.neighborhood), len(case.portability)
  if "counterfact" in families:
    comparisons("efficacy", "edit_new", "edit_true", n_req)
    comparisons("paraphrase", "para_new", "para_true", n_para)
    comparisons("neighborhood", "neigh_ans", "neigh_new", n_neigh)
    comparisons("portability", "port_new", "port_old", n_port)

  def acc(kind, n):
    return np.mean([M.token_accuracy(got[(kind, i)].correct) for i in range(n)])

  if "token" in families:
    m["rewrite_acc"] = acc("edit_new", n_req)
    if n_para:
      m["rephrase_acc"] = acc("para_new", n_para)
    if n_neigh and ref is not None:
      m["locality_acc"] = np.mean([
          M.agreement(got[("neigh_ans", j)].argmax,
                      ref.argmax[(case.case_id, j)]) for j in range(n_neigh)])
    if n_port:
      m["portability_acc"] = acc("port_new", n_port)
  if "zsre" in families:
    m["zsre_efficacy"] = acc("edit_new", n_req)
    if n_para:
      m["zsre_paraphrase"] = acc("para_new", n_para)
    if n_neigh:
      m["zsre_specificity"] = acc("neigh_ans", n_neigh)
  if "survey" in families:
    m["sr"] = M.rate(M.exact_match(got[("edit_new", i)].correct)
                     for i in range(n_req))
    if n_para:
      m["gr"] = M.rate(M.exact_match(got[("para_new", j)].correct)
                       for j in range(n_para))
  return {k: float(v) for k, v in m.items()}


def evaluate(model, params, cases: Sequence[EditCase],
             ref: Reference | None = None,
             families: Sequence[str] = FAMILIES,
             batch_size: int = 64) -> tuple[list[dict], dict]:
  """Per-case metric dicts and their summary (percentages) under `params`.

  Args:
    model: the `LanguageModel`.
    params: the (edited) parameters.
    cases: the cases to score.
    ref: the unedited model's `reference` (locality_acc needs it).
    families: metric families to compute (see the module docstring).
    batch_size: rows per forward pass.
  """
  _check_families(families)
  keys, prompts, targets = [], [], []
  for c, case in enumerate(cases):
    for kind, i, p, t in _pairs(case, families):
      keys.append((c, kind, i))
      prompts.append(p)
      targets.append(t)
  scored = scoring.teacher_forced(model, params, prompts, targets, batch_size)
  got = [dict() for _ in cases]
  for (c, kind, i), s in zip(keys, scored):
    got[c][(kind, i)] = s
  per_case = [_case_metrics(case, g, families, ref)
              for case, g in zip(cases, got)]
  return per_case, summarize(per_case)


def summarize(per_case: Sequence[dict]) -> dict:
  """Mean of each metric over the cases that have it: percentages for rates,
  scores and magnitudes (probability points), nats for margins."""
  keys = sorted({k for m in per_case for k in m})
  out = {}
  for k in keys:
    values = [m[k] for m in per_case if k in m and not np.isnan(m[k])]
    if values:
      scale = 1.0 if k.endswith(_RAW) else 100.0
      out[k] = float(np.mean(values) * scale)
  return out


def edit_success(model, params, cases: Sequence[EditCase],
                 batch_size: int = 64) -> np.ndarray:
  """Per request of every case (flattened): does greedy decoding from the
  edit prompt yield target_new (exact match)? Used for SR at edit time and RR."""
  requests = [q for case in cases for q in case.requests]
  scored = scoring.teacher_forced(model, params, [q.text for q in requests],
                                  [q.target_new for q in requests], batch_size)
  return np.array([M.exact_match(s.correct) for s in scored], bool)


def fact_accuracy(model, params, facts: Sequence[Fact],
                  batch_size: int = 64) -> dict:
  """Held-out accuracy (percent): exact match (the model's greedy answer is
  the fact's answer) and teacher-forced token accuracy."""
  if not facts:
    raise errors.InputError("the held-out set is empty.")
  scored = scoring.teacher_forced(model, params, [f.text for f in facts],
                                  [f.answer for f in facts], batch_size)
  return {"accuracy": 100.0 * float(np.mean([M.exact_match(s.correct)
                                             for s in scored])),
          "token_accuracy": 100.0 * float(np.mean([M.token_accuracy(s.correct)
                                                   for s in scored]))}


def generations(model, params, prompts: Sequence[str], max_new_tokens: int = 50,
                seed: int = 0, batch_size: int = 32, temperature: float = 1.0,
                top_p: float = 0.9) -> list[str]:
  """prompt + sampled continuation for each prompt (nucleus sampling with a
  fixed seed, so an edited and an unedited model are compared on the same
  random stream)."""
  texts = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    rows = 1 << (len(chunk) - 1).bit_length()
    padded = chunk + [chunk[-1]] * (rows - len(chunk))
    out = model.generate(params, padded, max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed + start)
    texts += [p + o for p, o in zip(chunk, out)]
  return texts


def generation_metrics(model, params, cases: Sequence[EditCase],
                       max_new_tokens: int = 50, seed: int = 0,
                       tfidf: M.TfIdf | None = None) -> list[dict]:
  """Per-case fluency (ROME's n-gram entropy x100) of generations from the
  case's generation prompts (default: its edit prompt), and consistency
  (TF-IDF similarity to its reference texts, x100) when it has references."""
  prompts, owner = [], []
  for c, case in enumerate(cases):
    for p in case.generation_prompts or (case.prompt,):
      prompts.append(p)
      owner.append(c)
  texts = generations(model, params, prompts, max_new_tokens, seed)
  per_case = [dict() for _ in cases]
  grouped = [[] for _ in cases]
  for c, t in zip(owner, texts):
    grouped[c].append(t)
  for c, case in enumerate(cases):
    per_case[c]["fluency"] = M.fluency(grouped[c])
    if case.reference_texts:
      vectorizer = tfidf or M.TfIdf(list(case.reference_texts) + grouped[c])
      per_case[c]["consistency"] = M.consistency(
          vectorizer, grouped[c], case.reference_texts)
    per_case[c]["generations"] = grouped[c]
  return per_case
