"""Generated edit requests, good and bad, for fuzzing editors and the loop.

  cases = fuzz_cases.generate(1000, seed=0)                   # requests only
  cases = fuzz_cases.generate(75, seed=3, hparams_class=cls)  # + overrides

Each `FuzzCase` is what a user could hand over: `requests` as given to
`editor.apply` (a dict, a `Request`, a list of them, or garbage: None, an
int, bytes, nested lists...) and, for hyper-parameter cases, `hparams`
overrides for `keditjax.editors.get(name, **hparams)` (NaN, inf, negative,
huge and wrong-type values, unknown fields). `expect` says what a correct
editor does with it:

  "refused": raise a `keditjax.errors.KeditError` whose message contains one
    of `words` (case-insensitive), before any work;
  "ok": succeed (a small, valid request);
  "either": succeed or be refused as above (unicode-heavy text, NUL bytes,
    duplicate edits, negative or huge hyper-parameters).

Cases that may succeed run real edits, so `max_valid` caps them (the first
is always a plain valid request); every other case should be refused in
validation, which costs microseconds. Generation is deterministic given
`(n, seed, hparams_class, max_valid)`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

from keditjax.editors.base import Request

# Short valid requests: they share the editors' length buckets, so the few
# real edits compile once.
VALID = ({"prompt": "{} lives in", "subject": "Kalomi", "target_new": "Paris"},
         {"prompt": "{} speaks", "subject": "Zetano", "target_new": "Greek"},
         {"prompt": "{} plays the", "subject": "Rupoka", "target_new": "harp"})
HUGE = 100_000  # characters: far past any model's context
LENGTH_WORDS = ("token", "context", "max_position", "long")
UTF8_WORDS = ("utf-8", "surrogate")
BRACE_WORDS = ("{}", "brace")
GARBAGE = (None, 42, 3.5, True, float("nan"), "just a string", b"bytes",
           bytearray(b"x"), object(), {1, 2}, [None], [42], [[dict(VALID[0])]],
           [b"Kalomi lives in"], {"foo": 1}, ({"prompt": None},))


@dataclasses.dataclass(frozen=True)
class FuzzCase:
  """One generated input.

  Attributes:
    kind: a label like "huge/prompt" (the family before the slash).
    requests: what is passed to `editor.apply` as `requests`.
    hparams: overrides for `editors.get` (None: the test's defaults).
    expect: "ok", "refused" or "either" (module docstring).
    words: lowercase words one of which a refusal must contain.
  """
  kind: str
  requests: Any
  hparams: dict | None = None
  expect: str = "refused"
  words: tuple = ()


def _valid(rng) -> dict:
  return dict(rng.choice(VALID))


def _with(rng, **fields) -> dict:
  out = _valid(rng)
  out.update(fields)
  return out


def _surrogate(rng, text: str) -> str:
  i = rng.randrange(len(text) + 1)
  return text[:i] + rng.choice(("\ud800", "\udfff", "\udc80")) + text[i:]


def _filler(rng, size: int) -> str:
  words = ("the", "of", "Kalomi", "zeta", "ü", "猫", "🦊", "\u05d0")
  out, n = [], 0
  while n < size:
    word = rng.choice(words)
    out.append(word)
    n += len(word) + 1
  return " ".join(out)[:size]


# -- cases that must be refused ----------------------------------------------

def _refused(rng) -> list[tuple]:
  """`(kind, requests, words)` of every refusal family (a fresh draw)."""
  base = _valid(rng)
  subject = base["subject"]
  out = [
      ("empty/subject", _with(rng, subject=""), ("subject",)),
      ("empty/prompt", _with(rng, prompt=""), ("prompt",)),
      ("empty/target", _with(rng, target_new=""), ("target",)),
      ("empty/batch", [], ("no edit",)),
      ("empty/tuple", (), ("no edit",)),
      ("whitespace/subject", _with(rng, subject=rng.choice(
          (" ", "\t\n", "\u3000", "\u00a0 "))), ("subject",)),
      ("whitespace/prompt", _with(rng, prompt=" \n "), ("prompt",)),
      ("whitespace/target", _with(rng, target_new=rng.choice(
          (" ", "\t", "\u2003\n"))), ("target",)),
      ("huge/prompt", _with(rng, prompt=_filler(rng, HUGE) + " {} is"),
       LENGTH_WORDS),
      ("huge/subject", _with(rng, subject=subject + _filler(rng, HUGE)),
       LENGTH_WORDS),
      ("huge/target", _with(rng, target_new=_filler(rng, HUGE)),
       LENGTH_WORDS),
      ("surrogate/subject", dict(base, prompt="{} is",
                                 subject=_surrogate(rng, subject)),
       UTF8_WORDS),
      ("surrogate/prompt", dict(base, prompt=_surrogate(rng, base["prompt"])),
       UTF8_WORDS),
      ("surrogate/target", dict(base, target_new=_surrogate(
          rng, base["target_new"])), UTF8_WORDS),
      ("surrogate/target_true", dict(base, target_true=_surrogate(rng, "Rome")),
       UTF8_WORDS),
      ("bytes/request", rng.choice((b"Kalomi lives in Paris",
                                    bytearray(b"x"))), ("request",)),
      ("bytes/subject", _with(rng, subject=subject.encode()), ("subject",)),
      ("bytes/target", _with(rng, target_new=b"Paris"), ("target",)),
      ("subject/not_in_prompt", _with(rng, prompt="Somebody lives in",
                                      subject="Nobody"), ("subject",)),
      ("subject/other_case", dict(base, prompt=base["prompt"].replace(
          "{}", subject.upper()), subject=subject.lower()), ("subject",)),
      ("format/two_fields", _with(rng, prompt="{} and {} live in"),
       BRACE_WORDS),
      ("format/indexed", _with(rng, prompt="{0} lives in"), BRACE_WORDS),
      ("format/named", _with(rng, prompt="{} lives in {city}"), BRACE_WORDS),
      ("format/stray_open", _with(rng, prompt="{} lives { in"), BRACE_WORDS),
      ("format/stray_close", _with(rng, prompt="} {} lives in"), BRACE_WORDS),
      ("format/escaped", _with(rng, prompt="{} lives in {{x}}"), BRACE_WORDS),
      ("format/spec", _with(rng, prompt="{:>10} lives in", subject="Kalomi"),
       BRACE_WORDS),
      ("format/written_out_with_brace", _with(
          rng, prompt="Kalomi lives in {x}", subject="Kalomi"), BRACE_WORDS),
      ("type/int_subject", _with(rng, subject=rng.choice((7, 0, -1))),
       ("subject",)),
      ("type/list_target", _with(rng, target_new=["Paris"]), ("target",)),
      ("type/none_prompt", _with(rng, prompt=None), ("prompt",)),
      ("type/float_target", _with(rng, target_new=math.inf), ("target",)),
      ("type/dict_target", _with(rng, target_new={"str": 5}), ("target",)),
      ("type/int_target_true", _with(rng, target_true=3), ("target",)),
      ("type/missing_target", {"prompt": "{} is", "subject": subject},
       ("target",)),
      ("type/missing_subject", {"prompt": "{} is", "target_new": "x"},
       ("subject",)),
      ("type/unknown_keys", {"question": "Who?", "answer": "Me"},
       ("subject",)),
      ("type/request_bad_field", Request("{} lives in", 5, "Paris"),
       ("subject",)),
      ("rewrite/string", {"requested_rewrite": "Kalomi lives in Paris"},
       ("requested_rewrite",)),
      ("rewrite/empty_list", {"requested_rewrite": []},
       ("requested_rewrite",)),
      ("rewrite/list_of_int", {"requested_rewrite": [5]},
       ("requested_rewrite",)),
      ("rewrite/bad_target", {"requested_rewrite": {
          "prompt": "{} lives in", "subject": subject,
          "target_new": {"str": None}}}, ("target",)),
      ("garbage/value", rng.choice(GARBAGE), ("request",)),
      ("batch/last_bad", [_valid(rng) for _ in range(rng.randrange(2, 40))]
       + [_with(rng, subject="")], ("subject",)),
      ("batch/first_bad", [_with(rng, target_new=None)] + [_valid(rng)],
       ("target",)),
      ("batch/nested", [[_valid(rng)], _valid(rng)], ("request",)),
      ("batch/conflicting", [dict(base), dict(base, target_new="Oslo")],
       ("conflict",)),
      ("batch/conflicting_layouts", [
          dict(base), {"prompt": base["prompt"].replace("{}", subject),
                       "subject": subject, "target_new": "Oslo"}],
       ("conflict",)),
  ]
  return out


# -- cases that may succeed (real edits: capped) ------------------------------

def _either() -> list[tuple]:
  """`(kind, requests, expect)` of the families that may succeed.

  Each has `VALID[0]`'s shape in UTF-8 bytes (subject <= 6, target 4-7,
  prompt tail <= 9): a byte-level tokenizer puts it in the same length
  buckets, so it reuses the valid request's compilations.
  """
  base = dict(VALID[0])
  subject = base["subject"]
  return [
      ("valid/request", Request(base["prompt"], subject, base["target_new"]),
       "ok"),
      ("valid/written_out", {"prompt": base["prompt"].replace("{}", subject),
                             "subject": subject,
                             "target_new": base["target_new"]}, "ok"),
      ("valid/rome_layout", {"case_id": 7, "requested_rewrite": {
          "prompt": base["prompt"], "subject": subject,
          "target_new": {"str": base["target_new"]},
          "target_true": {"str": "Rome"}}}, "ok"),
      ("unicode/rtl", {"prompt": "{} \u05d2\u05e8 \u05d1",
                       "subject": "\u05d6\u05d0\u05d1",
                       "target_new": "\u05e7\u05d4\u05e8"}, "either"),
      ("unicode/emoji", dict(base, subject="\U0001f98aa",
                             target_new="\U0001f3b9"), "either"),
      ("unicode/combining", dict(base, subject="Z\u0337a\u0334",
                                 target_new="o\u0308\u0301"), "either"),
      ("unicode/zero_width", dict(base, subject="K\u200blo",
                                  target_new="\ufeffx"), "either"),
      ("batch/duplicate", [dict(base), dict(base)], "either"),
      ("nul/subject", dict(base, subject="Ka\x00lo"), "either"),
      ("nul/target", dict(base, target_new="P\x00ss"), "either"),
  ]


# -- hyper-parameter overrides -----------------------------------------------

def _field_kind(default) -> str:
  if isinstance(default, bool):
    return "bool"
  if isinstance(default, int):
    return "int"
  if isinstance(default, float):
    return "float"
  if isinstance(default, str):
    return "str"
  if isinstance(default, tuple):
    return "tuple"
  return "other"


def _hparams_cases(rng, cls, n: int) -> list[FuzzCase]:
  """`n` override cases for the dataclass `cls` (fields drawn at random)."""
  defaults = cls()
  fields = [(f.name, _field_kind(getattr(defaults, f.name)))
            for f in dataclasses.fields(cls)]
  numeric = [f for f in fields if f[1] in ("int", "float")]
  families = []
  for name, kind in fields:
    wrong = [{"a": 1}, object(), b"1"]  # wrong for every annotation here
    wrong += {"int": ["0.5", [1.0]], "float": ["0.5", [1.0]],
              "bool": ["0.5"], "str": [[1.0]]}.get(kind, [])
    refused = [("hparams/wrong_type", rng.choice(wrong))]
    if kind in ("int", "float"):
      refused += [("hparams/nan", math.nan), ("hparams/inf", math.inf),
                  ("hparams/-inf", -math.inf), ("hparams/bool", True)]
      if kind == "int":
        refused += [("hparams/fraction", 1.5), ("hparams/huge_int", 2 ** 63)]
    elif kind == "bool":
      refused += [("hparams/wrong_type", "yes"), ("hparams/wrong_type", 2)]
    elif kind == "str":
      refused += [("hparams/wrong_type", 5), ("hparams/surrogate", "\ud800")]
    elif kind == "tuple":
      refused += [("hparams/nan", (math.nan,)),
                  ("hparams/wrong_type", ("a",)),
                  ("hparams/list", list(getattr(defaults, name)))]
    families += [(k, {name: v}, "refused", (name.lower(),))
                 for k, v in refused]
  families.append(("hparams/unknown_field", {"no_such_field": 1}, "refused",
                   ("no_such_field",)))
  for name, kind in fields:
    if kind == "str":
      families.append(("hparams/odd_string", {name: "nonsense"}, "either",
                       (name.lower(),)))
    elif kind == "tuple":
      families.append(("hparams/empty_tuple", {name: ()}, "either",
                       (name.lower(),)))
  for name, kind in numeric:
    families += [("hparams/negative", {name: -1 if kind == "int" else -1.0},
                  "either", (name.lower(),)),
                 ("hparams/zero", {name: 0 if kind == "int" else 0.0},
                  "either", (name.lower(),))]
    if kind == "float":
      families.append(("hparams/huge", {name: 1e30}, "either",
                       (name.lower(),)))
  rng.shuffle(families)
  # Refusals first (cheap), then at most a third that may be accepted.
  refused = [f for f in families if f[2] == "refused"]
  either = [f for f in families if f[2] == "either"]
  take = refused[:n - n // 3] + either[:n // 3]
  take += refused[len(take):][:n - len(take)]
  return [FuzzCase(kind, dict(VALID[0]), overrides, expect, words)
          for kind, overrides, expect, words in take[:n]]


def generate(n: int, seed: int = 0, *, hparams_class=None,
             hparams_fraction: float = 0.15,
             max_valid: int | None = None) -> list[FuzzCase]:
  """`n` fuzz cases, deterministic given the arguments.

  Args:
    n: how many cases.
    seed: the random seed.
    hparams_class: a method's hyper-parameter dataclass; with it,
      `hparams_fraction` of the cases override its fields (each with the
      valid request `VALID[0]`), otherwise none do.
    hparams_fraction: the share of hyper-parameter cases.
    max_valid: at most this many request cases that may succeed (default a
      tenth of `n`): a plain valid request, then the other families in turn
      from the `seed`-th (so consecutive seeds cover them all).

  Returns:
    A list of `FuzzCase`s: every refusal family appears once before any
    repeats (when `n` allows), in a seeded order.
  """
  rng = random.Random(seed)
  n_hparams = round(n * hparams_fraction) if hparams_class else 0
  n_valid = min(n - n_hparams, round(n / 10) if max_valid is None
                else max_valid)
  cases = []
  if n_valid > 0:
    cases.append(FuzzCase("valid/dict", dict(VALID[0]), expect="ok"))
    pool = _either()
    while len(cases) < n_valid:
      kind, requests, expect = pool[(seed + len(cases) - 1) % len(pool)]
      cases.append(FuzzCase(kind, requests, expect=expect))
  if n_hparams:
    cases += _hparams_cases(rng, hparams_class, n_hparams)
  while len(cases) < n:
    draw = _refused(rng)
    rng.shuffle(draw)
    cases += [FuzzCase(kind, requests, words=words)
              for kind, requests, words in draw[:n - len(cases)]]
  return cases


__all__ = ["FuzzCase", "GARBAGE", "HUGE", "VALID", "generate"]
