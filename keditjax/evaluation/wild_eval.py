"""Evaluation in the wild: the edited model must *generate* the answer.

Beside the teacher-forced metrics (never instead of them), as in "The Mirage
of Model Editing" (Yang et al., ACL 2025):

  - decoding is greedy, with a fixed token budget (`max_new_tokens`, not
    derived from the answer's length); a generation ends at end-of-text and
    is then cut at a newline or the end of a sentence (`wild.cut`);
  - each question is asked in three *context forms* (`CONTEXTS`):
      question  the question alone,
      qa        a QA instruction: `QA_TEMPLATE` around the question,
      chat      the model's chat template (ChatML: `<|im_start|>user ...`);
  - every answer is judged by normalised exact match of its first clause and
    by whole-word containment (`wild.exact`, `wild.contains`), and by a
    user's judge hook when one is given;
  - reliability (the edit question, `target_new`), generalisation (its
    rephrasings) and locality: an unrelated question keeps the *unedited*
    model's answer (its cut, normalised first clause; the unedited answers
    are generated once, `reference`).

  ref = reference(model, model.params, cases)
  rows, summary = evaluate(model, edited_params, cases, ref)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from keditjax import errors
from keditjax import progress as progress_lib
from keditjax.evaluation import evaluator, wild
from keditjax.evaluation.cases import EditCase

CONTEXTS = ("question", "qa", "chat")
QA_TEMPLATE = "Answer the question in a few words.\nQuestion: {}\nAnswer:"
CHATML = ("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def context(model, question: str, form: str) -> str:
  """`question` in context `form` (module docstring).

  Raises:
    ConfigError: an unknown form, or "chat" for a tokenizer without the
      ChatML tokens.
  """
  if form == "question":
    return question
  if form == "qa":
    return QA_TEMPLATE.format(question)
  if form == "chat":
    tok = model.tokenizer
    ids = [tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")]
    if any(i is None for i in ids):
      raise errors.ConfigError(
          "context form 'chat' needs a ChatML tokenizer (<|im_start|>, "
          "<|im_end|>); this model has none: use 'question' or 'qa'.")
    return CHATML.format(question)
  raise errors.ConfigError(f"context form {form!r}; use one of {CONTEXTS}.")


def answers(model, params, prompts: Sequence[str], max_new_tokens: int = 32,
            batch_size: int = 32) -> list[str]:
  """Greedy generations (stopped at end-of-text), batch rows padded to a
  power of two so a few shapes compile."""
  out = []
  starts = range(0, len(prompts), batch_size)
  for start in progress_lib.bar(starts, desc="generate", unit="batch",
                                disable=len(starts) < 4):
    chunk = list(prompts[start:start + batch_size])
    rows = 1 << (len(chunk) - 1).bit_length()
    padded = chunk + [chunk[-1]] * (rows - len(chunk))
    gen = model.generate(params, padded, max_new_tokens, temperature=0.0)
    out += gen[:len(chunk)]
  return out


def _questions(case: EditCase):
  """`(kind, index, question)` of one case."""
  out = [("edit", 0, case.prompt)]
  out += [("rephrase", j, p) for j, p in enumerate(case.paraphrase_prompts)]
  out += [("locality", j, p) for j, (p, _) in enumerate(case.neighborhood)]
  return out


def _generate(model, params, cases, forms, kinds, max_new_tokens):
  """`{(case_id, form, kind, j): generation}` (ids must be unique)."""
  evaluator.check_unique_ids(cases)
  keys, prompts = [], []
  for case in cases:
    for kind, j, q in _questions(case):
      if kind not in kinds:
        continue
      for form in forms:
        keys.append((case.case_id, form, kind, j))
        prompts.append(context(model, q, form))
  return dict(zip(keys, answers(model, params, prompts, max_new_tokens)))


def reference(model, params, cases: Sequence[EditCase],
              forms: Sequence[str] = CONTEXTS,
              max_new_tokens: int = 32) -> dict:
  """The unedited model's answers to every locality question."""
  return _generate(model, params, cases, forms, ("locality",), max_new_tokens)


def _same(a: str, b: str) -> bool:
  return (wild.normalize(wild.first_clause(wild.cut(a))) ==
          wild.normalize(wild.first_clause(wild.cut(b))))


def evaluate(model, params, cases: Sequence[EditCase], ref: dict,
             forms: Sequence[str] = CONTEXTS, max_new_tokens: int = 32,
             hook: wild.Judge | None = None, *, unedited: bool = False
             ) -> tuple[list[dict], dict]:
  """Per-case WILD metrics and their means (percent) under `params`.

  `unedited=True` says `params` are the ones `ref` was generated with (the
  unedited model): the locality answers are taken from `ref` instead of
  being generated again (greedy decoding gives the same text), so locality
  is 100 by definition and only the edit and rephrase questions are decoded.

  Per case and form: `{form}/reliability_exact|contains`,
  `{form}/generality_exact|contains` (mean over rephrasings),
  `{form}/locality` (share of locality questions whose answer equals the
  unedited one), `{form}/reliability_judge` etc. with a hook, and the edit
  question's answer span (`{form}/answer`).
  """
  for form in forms:
    if form not in CONTEXTS:
      raise errors.ConfigError(f"context form {form!r}; use one of {CONTEXTS}.")
  kinds = ("edit", "rephrase") + (() if unedited else ("locality",))
  gen = _generate(model, params, cases, forms, kinds, max_new_tokens)
  if unedited:
    gen.update(ref)
  rows = []
  for case in cases:
    row = {"case_id": case.case_id}
    for form in forms:
      for kind, name in (("edit", "reliability"), ("rephrase", "generality")):
        verdicts = [wild.judge(q, gen[(case.case_id, form, kind, j)],
                               case.target_new, hook)
                    for k, j, q in _questions(case) if k == kind]
        if not verdicts:
          continue
        for v in ("exact", "contains", "judge"):
          if v in verdicts[0]:
            row[f"{form}/{name}_{v}"] = float(np.mean([d[v] for d in verdicts]))
        if kind == "edit":
          row[f"{form}/answer"] = verdicts[0]["answer"]
      same = [_same(gen[(case.case_id, form, "locality", j)],
                    ref[(case.case_id, form, "locality", j)])
              for j in range(len(case.neighborhood))]
      if same:
        row[f"{form}/locality"] = float(np.mean(same))
    rows.append(row)
  keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
  summary = {k: 100.0 * float(np.mean([r[k] for r in rows if k in r]))
             for k in keys}
  return rows, summary


__all__ = ["CHATML", "CONTEXTS", "QA_TEMPLATE", "answers", "context",
           "evaluate", "reference"]
