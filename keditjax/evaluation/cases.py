"""Edit cases: every dataset becomes one `EditCase` type.

An `EditCase` holds the edit requests (usually one; MQuAKE cases carry up to
four) and everything the metrics look at after the edit:

  paraphrase_prompts   the equivalence neighbourhood of the edit prompt (GR,
                       paraphrase score, rephrase accuracy), expected answer:
                       the first request's `target_new`;
  neighborhood         (prompt, answer) pairs the edit should leave alone
                       (neighbourhood score, locality accuracy, specificity);
  attribute_prompts    prompts about other subjects whose true answer is
                       `target_new` (ROME schema only, kept for analyses);
  generation_prompts   prompts for fluency/consistency generations;
  portability          (prompt, new answer, old answer or None): questions
                       whose answer should follow from the edit (MQuAKE
                       multi-hop questions, zsRE's one-hop portability);
  reference_texts      texts about `target_new` for the consistency metric.

Loaders (all raise `InputError` naming the file, record index and field):

  load_cases("counterfact", path)  # flattened (bundled) or ROME schema
  load_cases("zsre", path)         # MEND schema (src/alt/rephrase/loc/...)
  load_cases("mquake", path)       # requested_rewrite list + questions
  load_cases("qaedit", path)       # QAEdit questions (prompt/target/locality)
  load_cases("jsonl", path)        # our own format, see docs/metrics.md
  load_facts("known_1000", path)   # `Fact`s (prompt, subject, answer)
  load_claims(path)                # FEVER `Claim`s (SUPPORTS / REFUTES)

`path` defaults to the bundled file of the dataset; it may be any name,
path (.json/.jsonl, optionally .gz) or `hf:<id>[:<split>]` that
`keditjax.data` resolves; the rows are then parsed like the files.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Mapping, Sequence

from keditjax import data
from keditjax import errors
from keditjax.editors.base import Request, make_request

def default_path(dataset: str) -> str:
  """The file a dataset name resolves to (`keditjax.data.path`)."""
  return data.path(dataset, kind="dataset")


@dataclasses.dataclass(frozen=True)
class EditCase:
  """One evaluation case: the edit(s) and what to measure afterwards."""
  case_id: Any
  requests: tuple[Request, ...]
  paraphrase_prompts: tuple[str, ...] = ()
  neighborhood: tuple[tuple[str, str], ...] = ()
  attribute_prompts: tuple[str, ...] = ()
  generation_prompts: tuple[str, ...] = ()
  portability: tuple[tuple[str, str, str | None], ...] = ()
  reference_texts: tuple[str, ...] = ()
  source: str = ""

  @property
  def request(self) -> Request:
    """The first (main) request."""
    return self.requests[0]

  @property
  def prompt(self) -> str:
    return self.request.text

  @property
  def subject(self) -> str:
    return self.request.subject

  @property
  def target_new(self) -> str:
    return self.request.target_new

  @property
  def target_true(self) -> str | None:
    return self.request.target_true

  def true_fact(self) -> "Fact":
    """The unedited fact (prompt -> target_true), e.g. for held-out sets."""
    if self.target_true is None:
      raise errors.InputError(f"case {self.case_id!r} has no true target.")
    return Fact(self.request.prompt, self.subject, self.target_true,
                self.case_id)


@dataclasses.dataclass(frozen=True)
class Fact:
  """A known fact: `prompt.format(subject)` continues with `answer`."""
  prompt: str
  subject: str
  answer: str
  case_id: Any = None

  @property
  def text(self) -> str:
    return self.prompt.format(self.subject) if "{}" in self.prompt else self.prompt


@dataclasses.dataclass(frozen=True)
class Claim:
  """A FEVER claim with its verdict."""
  case_id: Any
  claim: str
  label: str


# -- parsing helpers ----------------------------------------------------------

class _Record:
  """Field access that names the file, record and field in its errors."""

  def __init__(self, where: str, record):
    if not isinstance(record, Mapping):
      raise errors.InputError(f"{where}: expected a JSON object, got "
                              f"{type(record).__name__}.")
    self.where, self.record = where, record

  def error(self, field, problem):
    return errors.InputError(f"{self.where}: field {field!r} {problem}.")

  def str(self, field, *, required=True, default=None):
    value = self.record.get(field, default)
    if isinstance(value, Mapping) and "str" in value:  # ROME {"str", "id"}
      value = value["str"]
    if value is None and not required:
      return None
    if not isinstance(value, str) or not value.strip():
      raise self.error(field, "is missing or empty" if value in (None, "")
                       else f"must be a non-empty string, got {value!r}")
    return value

  def strs(self, field, *, required=False):
    value = self.record.get(field)
    if value is None and not required:
      return ()
    if isinstance(value, str):
      value = [value]
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v.strip() for v in value):
      raise self.error(field, f"must be a list of non-empty strings, got {value!r}")
    return tuple(value)

  def request(self, item: Mapping, field: str) -> Request:
    try:
      return make_request(dict(item, case_id=self.record.get("case_id")))
    except errors.InputError as e:
      raise errors.InputError(f"{self.where}: field {field!r}: {e}") from None


def detect_schema(record: Mapping) -> str:
  """Which layout a record uses (from its keys)."""
  if not isinstance(record, Mapping):
    return "unknown"
  if "requested_rewrite" in record:
    return "mquake" if "questions" in record else "counterfact_rome"
  if "rephrase_prompt" in record or "locality_prompt" in record:
    return "counterfact_flat"
  if "src" in record and "alt" in record:
    return "zsre"
  if "known_id" in record or ("attribute" in record and "template" in record):
    return "known"
  if "claim" in record and "label" in record:
    return "fever"
  if "target" in record and "rephrase" in record and "locality" in record:
    return "qaedit"
  if "requests" in record or ("prompt" in record and "target_new" in record):
    return "jsonl"
  return "unknown"


# -- one parser per schema ----------------------------------------------------

def _counterfact_flat(r: _Record) -> EditCase:
  request = r.request(dict(prompt=r.str("prompt"), subject=r.str("subject"),
                           target_new=r.str("target_new"),
                           target_true=r.str("ground_truth")), "prompt")
  neighborhood = ()
  if r.record.get("locality_prompt") is not None:
    neighborhood = ((r.str("locality_prompt"),
                     r.str("locality_ground_truth", required=False)
                     or request.target_true.strip()),)
  return EditCase(r.record.get("case_id"), (request,),
                  paraphrase_prompts=r.strs("rephrase_prompt"),
                  neighborhood=neighborhood, source="counterfact")


def _counterfact_rome(r: _Record) -> EditCase:
  rewrite = r.record["requested_rewrite"]
  if isinstance(rewrite, list):
    if len(rewrite) != 1:
      raise r.error("requested_rewrite", "must hold one rewrite in CounterFact")
    rewrite = rewrite[0]
  rw = _Record(r.where + " requested_rewrite", rewrite)
  request = r.request(dict(prompt=rw.str("prompt"), subject=rw.str("subject"),
                           target_new=rw.str("target_new"),
                           target_true=rw.str("target_true")),
                      "requested_rewrite")
  true = request.target_true.strip()
  return EditCase(
      r.record.get("case_id"), (request,),
      paraphrase_prompts=r.strs("paraphrase_prompts"),
      neighborhood=tuple((p, true) for p in r.strs("neighborhood_prompts")),
      attribute_prompts=r.strs("attribute_prompts"),
      generation_prompts=r.strs("generation_prompts"),
      reference_texts=r.strs("reference_texts"),
      source="counterfact")


def _zsre(r: _Record) -> EditCase:
  answers = r.record.get("answers")
  true = answers[0] if isinstance(answers, list) and answers else None
  if true is not None and (not isinstance(true, str) or not true.strip()):
    raise r.error("answers", f"must hold non-empty strings, got {answers!r}")
  request = r.request(dict(prompt=r.str("src"), subject=r.str("subject"),
                           target_new=r.str("alt"), target_true=true), "src")
  portability = ()
  port = r.record.get("portability")
  if port is not None:
    pr = _Record(r.where + " portability", port)
    portability = ((pr.str("New Question"), pr.str("New Answer"), None),)
  neighborhood = ()
  if r.record.get("loc") is not None:
    loc = r.str("loc")
    if loc.startswith("nq question: "):  # MEND's prefix, as ROME strips it
      loc = loc[len("nq question: "):]
    neighborhood = ((loc + "?", r.str("loc_ans")),)
  return EditCase(r.record.get("case_id"),
                  (request,), paraphrase_prompts=r.strs("rephrase"),
                  neighborhood=neighborhood, portability=portability,
                  source="zsre")


def _mquake(r: _Record) -> EditCase:
  rewrites = r.record.get("requested_rewrite")
  if not isinstance(rewrites, list) or not rewrites:
    raise r.error("requested_rewrite", "must be a non-empty list")
  requests = []
  for i, rewrite in enumerate(rewrites):
    rw = _Record(f"{r.where} requested_rewrite[{i}]", rewrite)
    requests.append(r.request(dict(
        prompt=rw.str("prompt"), subject=rw.str("subject"),
        target_new=rw.str("target_new"), target_true=rw.str("target_true")),
        f"requested_rewrite[{i}]"))
  new, old = r.str("new_answer"), r.str("answer", required=False)
  questions = r.strs("questions", required=True)
  # The question form of the first edited hop (from MQuAKE's own
  # `new_single_hops`) is its paraphrase.
  first = requests[0].target_new.strip()
  paraphrases = tuple(
      hop["question"] for hop in r.record.get("new_single_hops") or ()
      if isinstance(hop, Mapping) and hop.get("answer") == first
      and isinstance(hop.get("question"), str))[:1]
  return EditCase(
      r.record.get("case_id"), tuple(requests), paraphrase_prompts=paraphrases,
      portability=tuple((q, new, old) for q in questions), source="mquake")


def _qaedit(r: _Record) -> EditCase:
  """QAEdit (Yang et al. 2025): a question, the answer to teach, a
  paraphrase and unrelated (question, answer) pairs for locality. There is no
  old answer: the edit corrects what the model gets wrong."""
  request = r.request(dict(prompt=r.str("prompt"), subject=r.str("subject"),
                           target_new=r.str("target")), "prompt")
  locality = r.record.get("locality") or []
  if not isinstance(locality, list):
    raise r.error("locality", "must be a list of {loc, loc_ans} objects")
  neighborhood = []
  for j, item in enumerate(locality):
    it = _Record(f"{r.where} locality[{j}]", item)
    neighborhood.append((it.str("loc"), it.str("loc_ans")))
  case_id = r.record.get("id", r.record.get("case_id"))
  return EditCase(case_id, (dataclasses.replace(request, case_id=case_id),),
                  paraphrase_prompts=r.strs("rephrase"),
                  neighborhood=tuple(neighborhood), source="qaedit")


def _user(r: _Record) -> EditCase:
  items = r.record.get("requests") or [r.record]
  if not isinstance(items, list):
    raise r.error("requests", "must be a list of requests")
  requests = tuple(
      r.request(dict(prompt=_Record(r.where, it).str("prompt"),
                     subject=_Record(r.where, it).str("subject"),
                     target_new=_Record(r.where, it).str("target_new"),
                     target_true=_Record(r.where, it).str(
                         "target_true", required=False)), "requests")
      for it in items)

  def pairs(field, size):
    out = []
    for j, item in enumerate(r.record.get(field) or ()):
      it = _Record(f"{r.where} {field}[{j}]", item)
      row = (it.str("prompt"), it.str("answer"))
      out.append(row + (it.str("old_answer", required=False),) if size == 3
                 else row)
    return tuple(out)

  return EditCase(
      r.record.get("case_id"), requests,
      paraphrase_prompts=r.strs("paraphrase_prompts"),
      neighborhood=pairs("neighborhood", 2),
      generation_prompts=r.strs("generation_prompts"),
      portability=pairs("portability", 3),
      reference_texts=r.strs("reference_texts"), source="jsonl")


_PARSERS = {"counterfact_flat": _counterfact_flat,
            "counterfact_rome": _counterfact_rome, "zsre": _zsre,
            "mquake": _mquake, "qaedit": _qaedit, "jsonl": _user}
_DATASET_SCHEMAS = {"counterfact": ("counterfact_flat", "counterfact_rome"),
                    "zsre": ("zsre",), "mquake": ("mquake",),
                    "qaedit": ("qaedit",),
                    "jsonl": ("jsonl", "counterfact_flat", "counterfact_rome",
                              "zsre", "mquake", "qaedit")}


def parse_cases(rows: Iterable[Mapping], dataset: str = "auto",
                where: str = "records", start: int = 0) -> list[EditCase]:
  """`EditCase`s from already-read records (e.g. a `datasets.Dataset`)."""
  if dataset != "auto" and dataset not in _DATASET_SCHEMAS:
    raise errors.InputError(
        f"unknown dataset {dataset!r}; use one of "
        f"{sorted(_DATASET_SCHEMAS) + ['auto']}.")
  cases = []
  for i, row in enumerate(rows):
    r = _Record(f"{where} record {start + i}", row)
    schema = detect_schema(row)
    allowed = _DATASET_SCHEMAS.get(dataset, tuple(_PARSERS))
    if schema not in allowed:
      raise errors.InputError(
          f"{r.where}: fields {sorted(row)} do not match the {dataset} "
          f"schema ({' or '.join(allowed)}).")
    case = _PARSERS[schema](r)
    if case.case_id is None:  # zsRE and user files may carry no id
      case = dataclasses.replace(case, case_id=start + i)
    cases.append(case)
  return cases


def load_cases(dataset: str, path: str | None = None, limit: int | None = None,
               start: int = 0) -> list[EditCase]:
  """Reads `limit` cases from record `start` of a dataset file.

  Args:
    dataset: "counterfact", "zsre", "mquake", "jsonl" or "auto" (detect the
      schema of each record).
    path: a .json (list) or .jsonl file, or "hf:<name>[:<split>]"; default:
      the bundled file for `dataset`.
    limit: at most this many cases (None: all).
    start: skip this many records first.

  Raises:
    InputError: missing file, invalid JSON, or a malformed record (named).
  """
  path = path or default_path(dataset)
  rows = data.read_records(path)
  if start < 0 or (limit is not None and limit < 1):
    raise errors.InputError(f"start={start}, limit={limit}: need start >= 0 "
                            "and limit >= 1.")
  end = None if limit is None else start + limit
  return parse_cases(rows[start:end], dataset, where=path, start=start)


def load_facts(path: str | None = None, limit: int | None = None,
               start: int = 0) -> list[Fact]:
  """Known facts from ROME's `known_1000.json` layout, or the true facts of
  any edit dataset (CounterFact, zsRE, ...).

  Raises:
    InputError: missing file or a malformed record (named).
  """
  path = path or default_path("known_1000")
  rows = data.read_records(path)
  end = None if limit is None else start + limit
  facts = []
  for i, row in enumerate(rows[start:end]):
    r = _Record(f"{path} record {start + i}", row)
    if detect_schema(row) == "known":
      template, subject = r.str("template"), r.str("subject")
      if "{}" not in template:
        raise r.error("template", "must contain '{}'")
      prompt = row.get("prompt")
      if isinstance(prompt, str) and subject in prompt:
        # ROME's `prompt` completes the template ("... continent of"); the
        # attribute is its answer.
        template = prompt.replace(subject, "{}", 1)
      facts.append(Fact(template, subject, r.str("attribute"),
                        row.get("known_id")))
    elif "answer" in row and "prompt" in row and "target_new" not in row:
      facts.append(Fact(r.str("prompt"), r.str("subject", required=False) or "",
                        r.str("answer"), row.get("case_id")))
    else:
      case = parse_cases([row], "auto", where=path, start=start + i)[0]
      facts.append(case.true_fact())
  return facts


LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


def load_claims(path: str | None = None,
                labels: Sequence[str] = ("SUPPORTS", "REFUTES"),
                limit: int | None = None) -> list[Claim]:
  """FEVER claims whose label is in `labels` (default: the verifiable ones).

  Raises:
    InputError: missing file, an unknown label, or a malformed record.
  """
  unknown = sorted(set(labels) - set(LABELS))
  if unknown:
    raise errors.InputError(f"unknown FEVER labels {unknown}; use {LABELS}.")
  path = path or default_path("fever")
  claims = []
  for i, row in enumerate(data.read_records(path)):
    r = _Record(f"{path} record {i}", row)
    label = r.str("label")
    if label not in LABELS:
      raise r.error("label", f"is {label!r}, not one of {LABELS}")
    if label in labels:
      claims.append(Claim(row.get("id", i), r.str("claim"), label))
    if limit is not None and len(claims) >= limit:
      break
  return claims


def to_jsonl(cases: Sequence[EditCase], path: str) -> None:
  """Writes cases in the documented JSONL format (`load_cases("jsonl")`)."""
  with open(path, "w") as f:
    for case in cases:
      f.write(json.dumps({
          "case_id": case.case_id,
          "requests": [{"prompt": q.prompt, "subject": q.subject,
                        "target_new": q.target_new.strip(),
                        "target_true": q.target_true and q.target_true.strip()}
                       for q in case.requests],
          "paraphrase_prompts": list(case.paraphrase_prompts),
          "neighborhood": [{"prompt": p, "answer": a}
                           for p, a in case.neighborhood],
          "generation_prompts": list(case.generation_prompts),
          "portability": [{"prompt": p, "answer": a, "old_answer": o}
                          for p, a, o in case.portability],
          "reference_texts": list(case.reference_texts)}) + "\n")
