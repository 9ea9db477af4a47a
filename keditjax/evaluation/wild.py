"""Judging generated answers "in the wild" (Yang et al., ACL 2025).

Teacher-forced metrics score the target's tokens given the right prefix; a
user instead reads what the edited model *generates*. This module holds the
rules that turn a free generation into a verdict; decoding itself is
`LanguageModel.generate` (greedy, a token budget that does not depend on the
answer's length).

Two failures the rules must not hide (both seen on the default model):
  * running on past the answer: " 1977, 1977, 1980, 1987," — exact match on
    the whole generation is blind to the correct first clause;
  * containment fooled by sub-words: "Capelon" contains "Capel".

So:
  `cut(text)`       the answer span: up to end-of-text, a newline or the end
                    of the first sentence (".", "!" or "?" followed by a
                    space or the end; not after a one-letter initial or a
                    common abbreviation such as "St.", and not inside a
                    number such as "3.5").
  `first_clause`    that span up to its first "," or ";" (the answer a
                    listing model gives first).
  `normalize`       NFKC, lower case, punctuation to spaces, articles
                    ("a", "an", "the") dropped, whitespace collapsed (the
                    SQuAD rule).
  `exact`           normalize(first_clause(cut(generation))) equals a
                    normalized target.
  `contains`        a normalized target occurs in normalize(cut(generation))
                    as whole words ("capel" is not in "capelon").
  A target that `normalize` empties (QAEdit has ")", "*" and "the") is
  compared, on both sides, under `light` (case and spaces only) instead.
Both are reported; `judge` adds a user's own verdict (e.g. an LLM judge)
through a hook, beside them, never instead of them.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Callable, Iterable, Sequence

from keditjax import errors

ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "mt", "ft", "vs",
    "etc", "inc", "ltd", "co", "no", "vol", "gen", "col", "lt", "sgt",
    "capt", "gov", "sen", "rep", "rev", "u.s", "u.k", "e.g", "i.e"})
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "“”‘’«»—–…]")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")

Judge = Callable[[str, str, Sequence[str]], bool]


def _check_text(text, what: str) -> str:
  if not isinstance(text, str):
    raise errors.InputError(f"{what} must be a string; got {type(text).__name__}.")
  return text


def normalize(text: str) -> str:
  """NFKC, lower case, punctuation to spaces, no articles, single spaces."""
  text = unicodedata.normalize("NFKC", _check_text(text, "text")).lower()
  text = _PUNCT.sub(" ", text)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def cut(text: str) -> str:
  """The answer span of a generation: up to a newline or the first
  sentence end (module docstring); leading whitespace dropped."""
  text = _check_text(text, "generation").lstrip()
  text = text.split("\n", 1)[0]
  for match in _SENTENCE_END.finditer(text):
    end = match.start()
    if text[end] == ".":
      word = text[:end].split()[-1] if text[:end].split() else ""
      bare = word.lower().strip(string.punctuation.replace(".", ""))
      if (len(bare) == 1 and bare.isalpha()) or bare in ABBREVIATIONS:
        continue  # "J. R. R. Tolkien", "St. Louis"
    return text[:end].rstrip()
  return text.rstrip()


def first_clause(text: str) -> str:
  """`text` up to its first "," or ";" (a comma inside a number such as
  "10,000" does not end it)."""
  text = _check_text(text, "text")
  match = re.search(r"[;]|,(?!\d)", text)
  return (text[:match.start()] if match else text).strip()


def light(text: str) -> str:
  """NFKC, lower case, single spaces: punctuation and articles kept (for
  targets that `normalize` empties, e.g. QAEdit's ")", "*" or "the")."""
  text = unicodedata.normalize("NFKC", _check_text(text, "text")).lower()
  return " ".join(text.split())


def _targets(targets) -> list[tuple[str, Callable[[str], str]]]:
  """`(normalised target, the normalisation to apply to the answer)`."""
  if isinstance(targets, str):
    targets = [targets]
  out = []
  for t in targets:
    if normalize(t):
      out.append((normalize(t), normalize))
    elif light(t):
      out.append((light(t), light))
  if not out:
    raise errors.InputError("a wild judgement needs a non-empty target.")
  return out


def exact(generation: str, targets: str | Iterable[str]) -> bool:
  """The first clause of the answer span equals a target (normalized)."""
  clause = first_clause(cut(generation))
  return any(norm(clause) == t for t, norm in _targets(targets))


def contains(generation: str, targets: str | Iterable[str]) -> bool:
  """A target occurs as whole words in the answer span (normalized)."""
  span = cut(generation)
  return any(f" {t} " in f" {norm(span)} " for t, norm in _targets(targets))


def judge(question: str, generation: str, targets: str | Iterable[str],
          hook: Judge | None = None) -> dict:
  """The verdicts on one generation: `exact`, `contains`, the `answer` span
  judged, and `hook`'s verdict (`judge`) when one is given."""
  out = {"answer": cut(generation), "exact": exact(generation, targets),
         "contains": contains(generation, targets)}
  if hook is not None:
    names = [targets] if isinstance(targets, str) else list(targets)
    out["judge"] = bool(hook(question, out["answer"], names))
  return out
