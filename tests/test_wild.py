"""The in-the-wild answer rules: stop rules, normalisation, exact match
against containment, and the judge hook (keditjax/evaluation/wild.py)."""

import pytest

from keditjax import errors
from keditjax.evaluation import wild


@pytest.mark.parametrize("generation,span", [
    (" 1977, 1977, 1980, 1987,", "1977, 1977, 1980, 1987,"),
    (" Paris. It is the capital of France.", "Paris"),
    (" Paris\nQuestion: who", "Paris"),
    (" St. Louis, Missouri. Next", "St. Louis, Missouri"),
    (" J. R. R. Tolkien wrote it.", "J. R. R. Tolkien wrote it"),
    (" about 3.5 million people. More", "about 3.5 million people"),
    (" Really? yes", "Really"),
    ("", ""),
])
def test_cut_stops_at_newline_and_sentence_end(generation, span):
  assert wild.cut(generation) == span


def test_normalize_is_the_squad_rule():
  assert wild.normalize("  The Beatles!  ") == "beatles"
  assert wild.normalize("An “Apple”—a day") == "apple day"
  assert wild.normalize("ＴＯＫＹＯ") == "tokyo"  # NFKC
  assert wild.first_clause("10,000 people, roughly") == "10,000 people"


def test_exact_sees_the_first_clause_and_containment_needs_whole_words():
  # The two failures the issue names: running on past the answer, and
  # containment fooled by a sub-word.
  assert wild.exact(" 1977, 1977, 1980, 1987,", "1977")
  assert not wild.exact(" 1980, 1977", "1977")
  assert wild.contains(" 1980, 1977", "1977")
  assert not wild.contains(" Capelon", "Capel")
  assert not wild.exact(" Capelon", "Capel")
  assert wild.contains(" It was Capel, I think.", "Capel")
  assert not wild.exact(" It was Capel, I think.", "Capel")
  # Beyond the sentence end nothing counts.
  assert not wild.contains(" No idea. Maybe Rome.", "Rome")
  # Several acceptable answers, articles and case ignored.
  assert wild.exact(" the United States.", ["USA", "United States"])


def test_judge_reports_both_and_calls_the_hook_on_the_span():
  seen = []

  def hook(question, answer, targets):
    seen.append((question, answer, targets))
    return answer.startswith("Ro")

  out = wild.judge("Capital of Italy?", " Rome, Italy. Rome is", "Rome",
                   hook)
  assert out == {"answer": "Rome, Italy", "exact": True, "contains": True,
                 "judge": True}
  assert seen == [("Capital of Italy?", "Rome, Italy", ["Rome"])]
  assert "judge" not in wild.judge("q", " Rome", "Rome")


def test_bad_input_is_a_keditjax_error():
  with pytest.raises(errors.InputError, match="target"):
    wild.exact(" Rome", ["", "  "])
  with pytest.raises(errors.InputError, match="string"):
    wild.cut(None)
  with pytest.raises(errors.InputError, match="string"):
    wild.normalize(b"bytes")


def test_targets_that_normalise_to_nothing_use_the_light_rule():
  # QAEdit answers ")", "*" and "the": SQuAD's rule empties them.
  assert wild.exact(" the, I think", "the")
  assert not wild.exact(" a cat", "the")
  assert wild.contains(" it is ) here", ")")
  assert not wild.contains(" it is here", ")")
  assert wild.exact(" The Who.", ["the", "Who"])  # "who" under the usual rule
  with pytest.raises(errors.InputError):
    wild.exact(" x", "   ")
