"""Metric definitions: pure functions of scores, texts and outcomes.

Each function's docstring is its definition; `docs/metrics.md` collects them.
Inputs are what `keditjax.evaluation.scoring` computes for a (prompt, target)
pair under teacher forcing: the per-token log-probabilities of the target and
whether each target token is the model's top-1 prediction.

Conventions: rates come back as fractions in [0, 1] (the harness reports
percentages); a comparison that ties counts as a failure.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Iterable, Sequence

import numpy as np

from keditjax import errors


# -- CounterFact probability comparisons (ROME, Meng et al. 2022, §3.2) -------

def logprob(token_logprobs: np.ndarray, reduction: str = "mean") -> float:
  """A target's log-probability: the mean over its tokens (as the ROME
  evaluation code compares multi-token targets) or the sum (the joint
  log-probability of the whole target)."""
  token_logprobs = np.asarray(token_logprobs, np.float64)
  if token_logprobs.size == 0:
    raise errors.InputError("a target with no tokens has no log-probability.")
  if reduction == "mean":
    return float(token_logprobs.mean())
  if reduction == "sum":
    return float(token_logprobs.sum())
  raise errors.InputError(f"reduction={reduction!r}; use 'mean' or 'sum'.")


def prefers(lp_wanted: float, lp_other: float) -> bool:
  """Score of one comparison: True when log p(wanted) > log p(other).

  Efficacy/paraphrase compare wanted = target_new against target_true;
  neighbourhood compares wanted = the prompt's true answer against target_new.
  Ties fail.
  """
  return bool(lp_wanted > lp_other)


def magnitude(lp_wanted: float, lp_other: float) -> float:
  """Magnitude of one comparison: P(wanted) - P(other), each probability the
  exponential of the target's mean per-token log-probability (ROME's
  `summarize` convention; the harness reports it in percentage points)."""
  return float(math.exp(lp_wanted) - math.exp(lp_other))


# -- teacher-forced token metrics (EasyEdit; zsRE as in ROME/MEND) -------------

def token_accuracy(correct: np.ndarray) -> float:
  """Fraction of target tokens that are the top-1 prediction given the prompt
  and the target's earlier tokens (teacher forcing). This is EasyEdit's
  rewrite/rephrase/portability accuracy and the zsRE efficacy/paraphrase/
  specificity of ROME and MEND."""
  correct = np.asarray(correct, bool)
  if correct.size == 0:
    raise errors.InputError("token accuracy of an empty target.")
  return float(correct.mean())


def exact_match(correct: np.ndarray) -> bool:
  """True when every target token is the top-1 prediction, i.e. greedy
  decoding from the prompt produces the target: the survey's "yields its
  target" for a language model (SR, GR and held-out accuracy)."""
  correct = np.asarray(correct, bool)
  if correct.size == 0:
    raise errors.InputError("exact match of an empty target.")
  return bool(correct.all())


def agreement(argmax_after: np.ndarray, argmax_before: np.ndarray) -> float:
  """EasyEdit's locality: the fraction of target positions where the edited
  model's top-1 token equals the unedited model's (teacher-forced on the
  neighbourhood prompt and its answer)."""
  a, b = np.asarray(argmax_after), np.asarray(argmax_before)
  if a.shape != b.shape or a.size == 0:
    raise errors.InputError(
        f"agreement needs equal non-empty shapes, got {a.shape} and {b.shape}.")
  return float((a == b).mean())


# -- the survey's metrics (Mazzia et al. 2023) --------------------------------

def rate(outcomes: Iterable[bool]) -> float:
  """Success rate SR (or generalization rate GR): the fraction of edit inputs
  (or of their equivalence-neighbourhood inputs) whose output after editing is
  the edit target."""
  outcomes = [bool(o) for o in outcomes]
  if not outcomes:
    return float("nan")
  return sum(outcomes) / len(outcomes)


def drawdown(accuracy_before: float, accuracy_after: float) -> float:
  """Drawdown DD: accuracy on held-out data unrelated to the edits before
  editing minus after (positive = the edit cost accuracy). In points when
  the accuracies are percentages."""
  return float(accuracy_before - accuracy_after)


def retain_rate(held_at_edit: Sequence[bool], held_now: Sequence[bool]) -> float:
  """Retain rate RR in successive editing: among earlier edits that held right
  after they were made, the fraction that still hold now (after later edits).
  NaN when no earlier edit ever held."""
  held_at_edit = np.asarray(held_at_edit, bool)
  held_now = np.asarray(held_now, bool)
  if held_at_edit.shape != held_now.shape:
    raise errors.InputError("retain_rate needs one outcome per edit in both.")
  if not held_at_edit.any():
    return float("nan")
  return float(held_now[held_at_edit].mean())


# -- generation metrics ---------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
  """Word tokens: runs of word characters and single punctuation marks (a
  dependency-free stand-in for NLTK's `word_tokenize`, which ROME uses)."""
  return _WORD.findall(text.lower())


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
  """ROME's generation entropy of one text: for each n, the entropy in bits
  of the n-gram frequency distribution, H_n = -sum p log2 p; the result is
  the mean of weights[i] * H_ns[i] (bi- and tri-grams weighted 2/3 and 4/3).
  Repetitive text has low entropy; 0 for a text shorter than the largest n."""
  tokens = words(text)
  values = []
  for n, w in zip(ns, weights):
    grams = collections.Counter(tuple(tokens[i:i + n])
                                for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    h = 0.0 if total == 0 else -sum(
        c / total * math.log2(c / total) for c in grams.values())
    values.append(w * h)
  return float(np.mean(values))


def fluency(texts: Sequence[str]) -> float:
  """Fluency: the mean `ngram_entropy` of generated texts (the harness
  reports it x100, the scale of the ROME and MEMIT tables)."""
  if not texts:
    return float("nan")
  return float(np.mean([ngram_entropy(t) for t in texts]))


class TfIdf:
  """TF-IDF vectors with IDF fitted on a corpus: idf(w) = ln((1 + N) /
  (1 + df(w))) + 1 (scikit-learn's smoothed form), tf = raw counts, vectors
  L2-normalised; words unseen in the corpus are ignored."""

  def __init__(self, corpus: Sequence[str]):
    if not corpus:
      raise errors.InputError("TF-IDF needs a non-empty corpus.")
    df = collections.Counter()
    for doc in corpus:
      df.update(set(words(doc)))
    self.vocab = {w: i for i, w in enumerate(sorted(df))}
    n = len(corpus)
    self.idf = np.array([math.log((1 + n) / (1 + df[w])) + 1
                         for w in sorted(df)])

  def vector(self, text: str) -> np.ndarray:
    v = np.zeros(len(self.vocab))
    for w in words(text):
      if w in self.vocab:
        v[self.vocab[w]] += 1
    v *= self.idf
    norm = np.linalg.norm(v)
    return v / norm if norm else v

  def similarity(self, a: str, b: str) -> float:
    """Cosine similarity of the TF-IDF vectors of `a` and `b`."""
    return float(self.vector(a) @ self.vector(b))


def consistency(tfidf: TfIdf, generations: Sequence[str],
                references: Sequence[str]) -> float:
  """Consistency (ROME's reference score): TF-IDF cosine similarity between
  the generations about the edited subject (joined) and the reference texts
  about the new target (joined)."""
  if not generations or not references:
    return float("nan")
  return tfidf.similarity(" ".join(generations), " ".join(references))
