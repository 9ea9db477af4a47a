"""WILD decoding and its metrics: context forms, the chat template, greedy
decoding with a fixed budget, and the per-case verdicts (hand-built
generations), plus a real greedy generation on the tiny model."""

import types

import numpy as np
import pytest

from keditjax import errors
from keditjax.editors import base
from keditjax.evaluation import cases as C
from keditjax.evaluation import wild_eval
from keditjax.models import tiny


def _fake_model(generations, calls, chatml=True):
  """A model whose `generate` answers from a table prompt -> text."""
  ids = {"<|im_start|>": 1, "<|im_end|>": 2}
  tok = types.SimpleNamespace(
      token_to_id=lambda t: ids.get(t) if chatml else None)

  def generate(params, prompts, max_new_tokens, temperature=1.0):
    calls.append((len(prompts), max_new_tokens, temperature))
    return [generations.get(p, " no idea.") for p in prompts]

  return types.SimpleNamespace(tokenizer=tok, generate=generate)


def _case():
  req = base.make_request({"prompt": "who won?", "subject": "who",
                           "target_new": "Wilt Chamberlain *"})
  return C.EditCase(5, (req,), paraphrase_prompts=("who was the winner?",
                                                   "name the winner"),
                    neighborhood=(("when was the cup?", "1994"),
                                  ("where is Capel?", "Kent")))


def test_context_forms_and_chat_template():
  m = _fake_model({}, [])
  assert wild_eval.context(m, "who won?", "question") == "who won?"
  qa = wild_eval.context(m, "who won?", "qa")
  assert qa.startswith("Answer the question") and qa.endswith(
      "Question: who won?\nAnswer:")
  assert wild_eval.context(m, "who won?", "chat") == (
      "<|im_start|>user\nwho won?<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(errors.ConfigError, match="ChatML"):
    wild_eval.context(_fake_model({}, [], chatml=False), "q", "chat")
  with pytest.raises(errors.ConfigError, match="form"):
    wild_eval.context(m, "q", "poem")


def test_verdicts_reliability_generality_and_locality():
  q = wild_eval.context
  m0 = _fake_model({}, [])
  edited = {
      # Runs on past the answer: exact on the first clause, contains too.
      q(m0, "who won?", "question"): " Wilt Chamberlain, who scored 100.",
      # Right answer inside a sentence: contains only.
      q(m0, "who was the winner?", "question"):
          " It was Wilt Chamberlain in 1962.",
      # Sub-word: neither.
      q(m0, "name the winner", "question"): " Wilt Chamberlainson.",
      # Locality: first clause kept vs changed.
      q(m0, "when was the cup?", "question"): " 1994, in the USA.",
      q(m0, "where is Capel?", "question"): " Surrey.",
  }
  unedited = {q(m0, "when was the cup?", "question"): " 1994.\nMore text",
              q(m0, "where is Capel?", "question"): " Kent."}
  calls = []
  ref = wild_eval.reference(_fake_model(unedited, calls), None, [_case()],
                            forms=("question",), max_new_tokens=24)
  rows, summary = wild_eval.evaluate(
      _fake_model(edited, calls), None, [_case()], ref, forms=("question",),
      max_new_tokens=24, hook=lambda question, answer, targets: "Wilt" in answer)
  row = rows[0]
  assert row["question/reliability_exact"] == 1.0
  assert row["question/reliability_contains"] == 1.0
  assert row["question/answer"] == "Wilt Chamberlain, who scored 100"
  assert row["question/generality_exact"] == 0.0
  assert row["question/generality_contains"] == 0.5
  assert row["question/generality_judge"] == 1.0  # the hook, beside
  assert row["question/locality"] == 0.5
  assert summary["question/locality"] == 50.0
  # Greedy, one fixed budget whatever the target's length; rows padded to
  # a power of two.
  assert {(t, n) for _, n, t in calls} == {(0.0, 24)}
  assert all(rows_ & (rows_ - 1) == 0 for rows_, _, _ in calls)


def test_unedited_reuses_the_reference_locality_answers():
  q = wild_eval.context
  m0 = _fake_model({}, [])
  table = {q(m0, "who won?", "question"): " Wilt Chamberlain.",
           q(m0, "when was the cup?", "question"): " 1994.",
           q(m0, "where is Capel?", "question"): " Kent."}
  calls = []
  ref = wild_eval.reference(_fake_model(table, calls), None, [_case()],
                            forms=("question",))
  assert [n for n, _, _ in calls] == [2]  # the 2 locality questions
  again, _ = wild_eval.evaluate(_fake_model(table, calls), None, [_case()],
                                ref, forms=("question",))
  # 1 edit + 2 rephrase + 2 locality = 5 rows, padded to a power of two.
  assert [n for n, _, _ in calls] == [2, 8]
  reused, _ = wild_eval.evaluate(_fake_model(table, calls), None, [_case()],
                                 ref, forms=("question",), unedited=True)
  assert [n for n, _, _ in calls] == [2, 8, 4]  # 3 rows: no locality
  assert reused == again and reused[0]["question/locality"] == 1.0


def test_greedy_generation_on_a_tiny_model_is_deterministic():
  model = tiny.tiny_lm(embed_std=1.0)
  prompts = ["ab", "abc", "hello"]
  a = wild_eval.answers(model, model.params, prompts, max_new_tokens=4)
  b = wild_eval.answers(model, model.params, prompts[::-1], max_new_tokens=4)
  assert a == b[::-1] and len(a) == 3
  ids = model.generate(model.params, prompts, 4, temperature=0.0,
                       return_ids=True)
  assert [model.tokenizer.decode(i) for i in ids] == a
  assert all(len(i) <= 4 for i in ids)


def test_repeated_case_ids_are_refused_before_any_generation():
  calls = []
  case = _case()
  with pytest.raises(errors.InputError, match="unique"):
    wild_eval.reference(_fake_model({}, calls), None, [case, case])
  assert not calls
