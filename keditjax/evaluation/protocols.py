"""Edit protocols: how edits are applied and when the model is evaluated.

  results = run(model, editor, cases, Protocol(mode="sequential",
                batch_size=1), heldout=facts)

Modes (the survey's four protocols are mode x batch size):

  single      non-successive, one edit at a time: every case is edited into
              the unedited model f0 and evaluated on that edited model.
  batch       non-successive batches: every group of `batch_size` cases is
              edited into f0 in one `apply` and evaluated on that model.
  sequential  successive: groups of `batch_size` (1 = single successive) are
              edited on top of each other; SR at edit time is recorded for
              every step (the step's own cases), and at checkpoints (every
              `eval_every` steps; by default 10 evenly spaced ones, so the
              cost grows linearly with the number of edits) RR over all
              earlier edits and DD on the held-out facts; every case is
              evaluated on the final model at the end.

`editor=None` evaluates the unedited model (the baseline row). The harness
only calls `editor.init` and `editor.apply`: it has no method-specific code.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from keditjax import errors
from keditjax import progress as progress_lib
from keditjax.evaluation import evaluator
from keditjax.evaluation import metrics as M
from keditjax.evaluation.cases import EditCase, Fact

MODES = ("single", "batch", "sequential")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How to edit and when to evaluate.

  Attributes:
    mode: "single", "batch" or "sequential" (see the module docstring).
    batch_size: cases per `apply` call (1 in single mode).
    eval_every: sequential mode: a checkpoint (SR/RR/DD over all edits so
      far) every this many steps; None: ceil(steps / 10), i.e. 10
      checkpoints, linear in the number of edits (1 re-scores every earlier
      edit after every step: quadratic) (0:
      only after the last step).
    dd_every: non-successive modes: measure held-out accuracy on every
      this-many-th edited model (0: never); DD is the mean over those.
    families: metric families (`evaluator.FAMILIES`).
    fluency: generate from every case and report fluency (and consistency
      when a case has reference texts).
    fluency_tokens: tokens generated per prompt for fluency.
    scoring_batch: rows per scoring forward pass.
    seed: sampling seed for the fluency generations.
  """
  mode: str = "single"
  batch_size: int = 1
  eval_every: int | None = None
  dd_every: int = 10
  families: tuple[str, ...] = evaluator.FAMILIES
  fluency: bool = True
  fluency_tokens: int = 50
  scoring_batch: int = 64
  seed: int = 0

  def validate(self) -> "Protocol":
    if self.mode not in MODES:
      raise errors.ConfigError(f"mode={self.mode!r}; use one of {MODES}.")
    if self.batch_size < 1:
      raise errors.ConfigError(f"batch_size={self.batch_size} must be >= 1.")
    if self.mode == "single" and self.batch_size != 1:
      raise errors.ConfigError(
          "mode='single' edits one case at a time; use mode='batch' for "
          f"batch_size={self.batch_size}.")
    for name in ("eval_every", "dd_every"):
      if getattr(self, name) is not None and getattr(self, name) < 0:
        raise errors.ConfigError(f"{name}={getattr(self, name)} must be >= 0.")
    if self.fluency_tokens < 1:
      raise errors.ConfigError(f"fluency_tokens={self.fluency_tokens} must be >= 1.")
    evaluator._check_families(self.families)  # pylint: disable=protected-access
    return self

  def describe(self, edited: bool = True) -> dict:
    """The protocol record every result carries."""
    if not edited:
      return {"mode": "unedited", "edit_type": None, "successive": False,
              "evaluated": "once, on the unedited model",
              "metric_families": list(self.families), "fluency": self.fluency}
    successive = self.mode == "sequential"
    if successive:
      when = ("after every edit step" if self.eval_every == 1 else
              f"every {self.eval_every} edit steps and at the end"
              if self.eval_every else "once, after the last edit")
    else:
      when = "after each edit, on that edit's own model (each from f0)"
    return {"mode": self.mode,
            "edit_type": "single" if self.batch_size == 1 else "batch",
            "successive": successive, "batch_size": self.batch_size,
            "evaluated": when, "eval_every": self.eval_every,
            "dd_every": None if successive else self.dd_every,
            "metric_families": list(self.families), "fluency": self.fluency,
            "fluency_tokens": self.fluency_tokens,
            "scoring": ("teacher-forced; prompt and target tokenized "
                        "separately; CounterFact scores compare mean "
                        "per-token log-probabilities (_score_sum: summed)")}


def _requests(group):
  return [q for case in group for q in case.requests]


def _case_row(case: EditCase, metrics: dict, **extra) -> dict:
  row = {"case_id": case.case_id, "subject": case.subject,
         "target_new": case.target_new.strip(),
         "target_true": case.target_true and case.target_true.strip(), **extra}
  gens = metrics.pop("generations", None)
  row.update(metrics)
  if gens:
    row["generation"] = gens[0]
  return row


class _Clock:
  def __init__(self):
    self.seconds = {}

  def add(self, key, start):
    self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


def run(model, editor, cases: Sequence[EditCase], protocol: Protocol,
        heldout: Sequence[Fact] | None = None, state=None,
        progress: bool = True,
        on_step: Callable[[dict], None] | None = None) -> dict:
  """Edits `cases` with `editor` under `protocol` and measures everything.

  Args:
    model: a `LanguageModel` (its `params` are f0, never modified).
    editor: an `Editor` (`init`/`apply`), or None for the unedited baseline.
    cases: the cases, in edit order.
    protocol: a `Protocol`.
    heldout: facts unrelated to the edits, for DD (None: no DD).
    state: the editor state (default: `editor.init(model)`).
    progress: show a tqdm bar.
    on_step: called with each step record (sequential mode) as it is made.

  Returns:
    {"protocol", "n", "metrics", "cases", "steps", "heldout", "timing"}:
    metrics in percent (DD in points), one row per case, one record per
    step in sequential mode.
  """
  protocol.validate()
  cases = list(cases)
  if not cases:
    raise errors.InputError("no cases to evaluate.")
  ids = [c.case_id for c in cases]
  if len(set(map(str, ids))) != len(ids):
    raise errors.InputError("case ids must be unique within a run.")
  clock, start_all = _Clock(), time.perf_counter()
  params0 = model.params
  t = time.perf_counter()
  if editor is not None and state is None:
    state = editor.init(model)
  clock.add("init", t)
  t = time.perf_counter()
  ref = (evaluator.reference(model, params0, cases, protocol.scoring_batch)
         if "token" in protocol.families else None)
  before = (evaluator.fact_accuracy(model, params0, heldout,
                                    protocol.scoring_batch)
            if heldout else None)
  clock.add("reference", t)
  kw = dict(families=protocol.families, batch_size=protocol.scoring_batch)

  def score(params, group, extra_rows):
    t = time.perf_counter()
    per_case, _ = evaluator.evaluate(model, params, group, ref, **kw)
    clock.add("score", t)
    if protocol.fluency:
      t = time.perf_counter()
      gen = evaluator.generation_metrics(model, params, group,
                                         protocol.fluency_tokens, protocol.seed)
      for m, g in zip(per_case, gen):
        m.update(g)
      clock.add("generate", t)
    return [_case_row(c, m, **extra_rows) for c, m in zip(group, per_case)]

  def heldout_dd(params):
    t = time.perf_counter()
    after = evaluator.fact_accuracy(model, params, heldout,
                                    protocol.scoring_batch)
    clock.add("heldout", t)
    return {"dd": M.drawdown(before["accuracy"], after["accuracy"]),
            "dd_token_acc": M.drawdown(before["token_accuracy"],
                                       after["token_accuracy"]),
            "heldout_accuracy": after["accuracy"]}

  rows, steps, edit_seconds, dds = [], [], [], []
  if editor is None:
    rows = score(params0, cases, {})
    if heldout:
      dds.append(heldout_dd(params0))
  else:
    size = 1 if protocol.mode == "single" else protocol.batch_size
    groups = [cases[i:i + size] for i in range(0, len(cases), size)]
    if protocol.eval_every is None:  # 10 checkpoints: linear cost
      protocol = dataclasses.replace(protocol,
                                     eval_every=-(-len(groups) // 10))
    bar = progress_lib.bar(groups, desc=f"{editor.name} {protocol.mode}",
                    disable=not progress, unit="step")
    params, held_at_edit, done = params0, [], []
    for g, group in enumerate(bar):
      base = params if protocol.mode == "sequential" else params0
      t = time.perf_counter()
      new_params, new_state, info = editor.apply(model, base, _requests(group),
                                                 state)
      jax.block_until_ready(new_params)
      edit_seconds.append(time.perf_counter() - t)
      clock.add("edit", t)
      if protocol.mode != "sequential":
        rows += score(new_params, group, {"group": g})
        if heldout and protocol.dd_every and g % protocol.dd_every == 0:
          dds.append(heldout_dd(new_params))
        bar.set_postfix(efficacy=_running(rows, "efficacy_score", "sr"))
        continue
      params, state = new_params, new_state
      t = time.perf_counter()
      now = evaluator.edit_success(model, params, group, protocol.scoring_batch)
      clock.add("retain", t)
      held_at_edit += now.tolist()
      done += group
      record = {"step": g + 1, "edits": len(done),
                "sr_at_edit": 100.0 * float(now.mean()),
                "sr_at_edit_so_far": 100.0 * float(np.mean(held_at_edit)),
                "edit_seconds": edit_seconds[-1],
                "changed": sorted(info.changed),
                "records": len(info.records),
                # Method-specific scalars, e.g. GRACE's codebook_size.
                "extras": {k: v for k, v in info.extras.items()
                           if isinstance(v, (int, float, bool))}}
      last = g == len(groups) - 1
      if (protocol.eval_every and (g + 1) % protocol.eval_every == 0) or last:
        t = time.perf_counter()
        held = evaluator.edit_success(model, params, done,
                                      protocol.scoring_batch)
        clock.add("retain", t)
        record["sr"] = 100.0 * float(held.mean())
        # RR counts *earlier* edits only (docs/metrics.md): this step's own
        # edits were just measured, so including them would pull RR to 100.
        earlier = len(done) - len(group)
        record["rr"] = (100.0 * M.retain_rate(held_at_edit[:earlier],
                                              held[:earlier])
                        if earlier else None)
        if heldout:
          record.update(heldout_dd(params))
      steps.append(record)
      if on_step is not None:
        on_step(record)
      bar.set_postfix({k: round(record[k], 1) for k in ("sr_at_edit", "rr", "dd")
                       if record.get(k) is not None})
    if protocol.mode == "sequential":
      step_of = {}
      for g, group in enumerate(groups):
        for c in group:
          step_of[str(c.case_id)] = g + 1
      rows = score(params, cases, {})
      for row in rows:
        row["step"] = step_of[str(row["case_id"])]
      if heldout:
        dds = [{k: steps[-1][k] for k in ("dd", "dd_token_acc",
                                          "heldout_accuracy")}]
  summary = evaluator.summarize(
      [{k: v for k, v in r.items() if isinstance(v, float)} for r in rows])
  if dds:
    summary["dd"] = float(np.mean([d["dd"] for d in dds]))
    # DD cannot exceed the held-out accuracy before editing: its ceiling.
    summary["dd_ceiling"] = before["accuracy"]
    summary["dd_token_acc"] = float(np.mean([d["dd_token_acc"] for d in dds]))
  if steps:
    summary["rr"] = steps[-1]["rr"]
    summary["sr_at_edit"] = 100.0 * float(np.mean(held_at_edit))
  total = time.perf_counter() - start_all
  timing = {"total_seconds": total, **{f"{k}_seconds": v
                                       for k, v in clock.seconds.items()}}
  if edit_seconds:
    timing.update(edit_seconds_median=float(np.median(edit_seconds)),
                  edits_per_second=len(cases) / sum(edit_seconds))
  if clock.seconds.get("score"):
    timing["score_records_per_second"] = len(cases) / clock.seconds["score"]
  if protocol.eval_every is None:  # unedited: no steps
    protocol = dataclasses.replace(protocol, eval_every=0)
  return {
      "protocol": protocol.describe(edited=editor is not None),
      "method": editor.name if editor is not None else "unedited",
      "n": len(cases),
      "metrics": summary,
      "heldout": None if not heldout else {
          "n": len(heldout), "accuracy_before": before["accuracy"],
          "token_accuracy_before": before["token_accuracy"],
          "measured_on": len(dds)},
      "steps": steps,
      "cases": rows,
      "timing": timing,
  }


def _running(rows, *keys):
  for key in keys:
    values = [r[key] for r in rows if key in r]
    if values:
      return round(100.0 * float(np.mean(values)), 1)
  return None
