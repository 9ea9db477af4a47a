"""Lifelong editing: thousands of successive edits, checkpointed and resumable.

  plan = Plan(batch_size=100, checkpoint_every=100)
  out = run(model, editor, cases, plan, known=facts, ppl_rows=rows,
            workdir="runs/alphaedit_1000", settings={...})

Edits `cases` in turns of `plan.batch_size`, each on top of the last. After
every turn SR at edit time is recorded for that turn's edits (editing time is
clocked alone, evaluation excluded). Every `checkpoint_every` edits (and
after the last turn) a *checkpoint* measures, on the model edited so far:

  - the metric families on the edits so far (all of them, or a fixed random
    sample of at most `plan.sample`, the same order for every checkpoint);
    locality-type metrics compare with the *unedited* model's outputs,
    computed once before the first edit, never with the edited model;
  - RR: of the earlier edits that held at edit time, the share still held;
  - general ability: perplexity on held-out WikiText-2 text (`ppl_rows`) and
    exact-match accuracy on facts the unedited model was asked (`known`),
    with that accuracy before editing (DD's ceiling: DD cannot exceed it);

and, when `workdir` is given, writes a checkpoint there: the params' change
from f0 (changed leaves and any adapters), the editor state and the records
so far. A run started again with the same `workdir` resumes from the last
checkpoint and reaches the same final params and metrics as one that was
never stopped; one with other settings (method, hyper-parameters, data, plan,
model) is refused, the differing fields named. A checkpoint is written to a
temporary folder and moved into place, so a kill mid-write leaves the
previous one readable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax import progress as progress_lib
from keditjax.editors import base, state_io
from keditjax.evaluation import evaluator
from keditjax.evaluation import metrics as M
from keditjax.evaluation.cases import EditCase, Fact

_CKPT = "checkpoint"


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a lifelong run edits and measures.

  Attributes:
    batch_size: edits per turn (`apply` call).
    checkpoint_every: edits between checkpoints (a multiple of batch_size).
    sample: at checkpoints before the last, score at most this many of the
      edits so far (a fixed random sample; 0: all). The last checkpoint
      always scores every edit.
    families: metric families (`evaluator.FAMILIES`).
    scoring_batch: rows per scoring forward pass.
    seed: the sample's seed.
  """
  batch_size: int = 100
  checkpoint_every: int = 100
  sample: int = 0
  families: tuple = ("counterfact",)
  scoring_batch: int = 64
  seed: int = 0

  def validate(self) -> "Plan":
    if self.batch_size < 1:
      raise errors.ConfigError(f"batch_size={self.batch_size} must be >= 1.")
    if (self.checkpoint_every < self.batch_size or
        self.checkpoint_every % self.batch_size):
      raise errors.ConfigError(
          f"checkpoint_every={self.checkpoint_every} must be a positive "
          f"multiple of batch_size={self.batch_size}.")
    if self.sample < 0:
      raise errors.ConfigError(f"sample={self.sample} must be >= 0.")
    evaluator._check_families(self.families)  # pylint: disable=protected-access
    return self


# -- general ability ---------------------------------------------------------

def heldout_text_rows(model, num_tokens: int = 8192, seq_len: int = 256,
                      corpus: str | None = None) -> np.ndarray:
  """`[N, seq_len]` token rows of held-out text (default: the bundled
  WikiText-2 *test* split, which no editor reads)."""
  from keditjax import data, stats  # pylint: disable=import-outside-toplevel
  if corpus is None:
    corpus = os.path.join(data.path("wikitext-2"), "wiki.test.raw")
    corpus = corpus if os.path.exists(corpus) else corpus + ".gz"
  rows = [r for r in stats.packed_rows(model.tokenizer,
                                       stats.corpus_texts(corpus), seq_len,
                                       num_tokens) if len(r) == seq_len]
  if not rows:
    raise errors.InputError(f"{corpus} holds fewer than {seq_len} tokens.")
  return np.stack(rows)


def perplexity(model, params, rows_NxL: np.ndarray, batch: int = 8) -> float:
  """exp(mean next-token NLL) over every predicted token of `rows`."""
  total, count = 0.0, 0
  for i in range(0, len(rows_NxL), batch):
    chunk = np.asarray(rows_NxL[i:i + batch], np.int32)
    logits = model.apply(params, chunk).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, chunk[:, 1:, None], -1)
    total += float(nll.sum())
    count += nll.size
  return float(np.exp(total / count))


# -- checkpoints ---------------------------------------------------------------

def _walk(tree, prefix=()):
  """`{path: array}` of a nested dict of arrays (None: not one)."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      sub = _walk(v, prefix + (str(k),))
      if sub is None:
        return None
      out.update(sub)
    return out
  if isinstance(tree, (np.ndarray, jax.Array)):
    return {prefix: tree}
  return None


def params_delta(params0, params) -> dict:
  """What `params` changed from `params0`: `{"changed": {"a/b": array},
  "extra": {top-level key: subtree}}` (new keys such as adapters, or
  subtrees that are not plain dicts of arrays, are kept whole)."""
  changed, extra = {}, {}
  for top, sub in params.items():
    old = params0.get(top) if isinstance(params0, dict) else None
    flat, flat0 = _walk(sub, (top,)), _walk(old, (top,)) if old is not None else None
    if flat is None or flat0 is None or set(flat) != set(flat0):
      if sub is not old:
        extra[top] = sub
      continue
    for path, leaf in flat.items():
      leaf0 = flat0[path]
      if leaf is leaf0:
        continue
      if (np.shape(leaf) == np.shape(leaf0) and leaf.dtype == leaf0.dtype
          and np.array_equal(np.asarray(leaf), np.asarray(leaf0))):
        continue
      changed["/".join(path)] = leaf
  return {"changed": changed, "extra": extra}


def params_from_delta(params0, delta: dict):
  """The inverse of `params_delta`."""
  params = base.replace_leaves(
      params0, {tuple(k.split("/")): v for k, v in delta["changed"].items()})
  if delta["extra"]:
    params = dict(params)
    params.update(delta["extra"])
  return params


def _save(workdir, params0, params, state, progress: dict) -> None:
  final = os.path.join(workdir, _CKPT)
  tmp, old = final + ".tmp", final + ".old"
  shutil.rmtree(tmp, ignore_errors=True)
  tree = {"params": params_delta(params0, params), "state": state}
  state_io.save_tree(tmp, tree, progress)
  if os.path.exists(final):
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
  os.replace(tmp, final)
  shutil.rmtree(old, ignore_errors=True)


def _load(workdir):
  """`(tree, progress)` of the last finished checkpoint, or None."""
  for name in (_CKPT, _CKPT + ".old"):  # .old: killed between the renames
    path = os.path.join(workdir, name)
    if os.path.exists(os.path.join(path, "tree.json")):
      return state_io.load_tree(path)
  return None


def fingerprint(cases: Sequence[EditCase]) -> str:
  """sha256 of the cases' ids and requests (what is edited, in order)."""
  h = hashlib.sha256()
  for c in cases:
    h.update(json.dumps([str(c.case_id), base.request_items(c.requests)],
                        sort_keys=True, default=str).encode())
  return h.hexdigest()


def _check_settings(saved: dict, now: dict, workdir: str) -> None:
  diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if diff:
    detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
                       for k in diff)
    raise errors.ConfigError(
        f"{workdir} holds a lifelong run with other settings ({detail}). "
        "Resume with the same settings, or use another workdir.")


# -- the run -----------------------------------------------------------------

def run(model, editor, cases: Sequence[EditCase], plan: Plan, *,
        known: Sequence[Fact] | None = None, ppl_rows=None,
        workdir: str | None = None, settings: dict | None = None,
        state=None, progress: bool = True,
        on_checkpoint: Callable[[dict], None] | None = None,
        on_results: Callable[[dict], None] | None = None) -> dict:
  """Edits `cases` in successive turns and measures at checkpoints.

  Args:
    model: a `LanguageModel` (its params are f0, never modified).
    editor: an `Editor`.
    cases: the cases, in edit order (unique ids).
    plan: a `Plan`.
    known: facts for general-ability accuracy (None: not measured).
    ppl_rows: `[N, L]` held-out token rows for perplexity (None: not
      measured).
    workdir: where checkpoints are written and resumed from (None: none).
    settings: what else defines the run (method, hparams, data...): saved
      with each checkpoint and compared when resuming.
    state: the editor state to start from (default: `editor.init(model)`).
    progress: show a tqdm bar.
    on_checkpoint: called with each checkpoint record after it is saved.
    on_results: called after each checkpoint with the results so far (as
      returned, without params and state, `"complete": False` until the
      last), e.g. to write them where a reader can follow a long run.

  Returns:
    {"plan", "method", "n", "baseline", "checkpoints", "steps", "final",
     "timing", "resumed_from"}: metrics in percent, perplexity as is.
  """
  plan.validate()
  cases = list(cases)
  if not cases:
    raise errors.InputError("no cases to edit.")
  if len({str(c.case_id) for c in cases}) != len(cases):
    raise errors.InputError("case ids must be unique within a run.")
  now_settings = dict(settings or {}, plan=dataclasses.asdict(plan),
                      method=editor.name,
                      hparams=state_io._plain(  # pylint: disable=protected-access
                          dataclasses.asdict(editor.hparams)),
                      model=state_io.model_fingerprint(model),
                      cases=fingerprint(cases), n=len(cases))
  now_settings = json.loads(json.dumps(now_settings, default=str))
  params0 = model.params
  groups = [cases[i:i + plan.batch_size]
            for i in range(0, len(cases), plan.batch_size)]
  per_ckpt = plan.checkpoint_every // plan.batch_size
  order = np.random.default_rng(plan.seed).permutation(len(cases))
  kw = dict(families=plan.families, batch_size=plan.scoring_batch)

  saved = _load(workdir) if workdir else None
  if saved is not None:
    tree, record = saved
    _check_settings(record["settings"], now_settings, workdir)
    params = params_from_delta(params0, tree["params"])
    state = tree["state"]
    resumed_from = record["steps_done"]
  else:
    record = None
    params = params0
    state = editor.init(model) if state is None else state
    resumed_from = 0

  if record is None:
    t = time.perf_counter()
    ref = (evaluator.reference(model, params0, cases, plan.scoring_batch)
           if "token" in plan.families else None)
    baseline = {"edits": 0}
    _, summ = evaluator.evaluate(model, params0, cases, ref, **kw)
    baseline.update(summ)
    if known:
      baseline["known_accuracy"] = evaluator.fact_accuracy(
          model, params0, known, plan.scoring_batch)["accuracy"]
    if ppl_rows is not None:
      baseline["perplexity"] = perplexity(model, params0, ppl_rows)
    baseline["seconds"] = time.perf_counter() - t
    record = {"settings": now_settings, "baseline": baseline,
              "ref": None if ref is None else
              [[list(map(str, k)), np.asarray(v).tolist()]
               for k, v in ref.argmax.items()],
              "steps": [], "checkpoints": [], "held_at_edit": [],
              "steps_done": 0}
  ref = None
  if record["ref"] is not None:
    by_id = {str(c.case_id): c.case_id for c in cases}
    ref = evaluator.Reference({(by_id[k[0]], int(k[1])): np.asarray(v)
                               for k, v in record["ref"]})
  baseline = record["baseline"]
  held_at_edit = list(record["held_at_edit"])

  bar = progress_lib.bar(range(record["steps_done"], len(groups)),
                         desc=f"{editor.name} lifelong", disable=not progress,
                         unit="turn", total=len(groups),
                         initial=record["steps_done"])
  for g in bar:
    group = groups[g]
    t = time.perf_counter()
    params, state, info = editor.apply(model, params,
                                       [q for c in group for q in c.requests],
                                       state)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t
    now = evaluator.edit_success(model, params, group, plan.scoring_batch)
    held_at_edit += now.tolist()
    done = (g + 1) * plan.batch_size if g + 1 < len(groups) else len(cases)
    record["steps"].append({"step": g + 1, "edits": done,
                            "sr_at_edit": 100.0 * float(now.mean()),
                            "edit_seconds": seconds})
    last = g + 1 == len(groups)
    if (g + 1) % per_ckpt and not last:
      continue
    t = time.perf_counter()
    so_far = cases[:done]
    if plan.sample and not last and done > plan.sample:
      pick = [i for i in order if i < done][:plan.sample]
      scored = [so_far[i] for i in sorted(pick)]
    else:
      scored = so_far
    _, summ = evaluator.evaluate(model, params, scored, ref, **kw)
    point = {"edits": done, "scored": len(scored), **summ,
             "edit_seconds_total": float(sum(s["edit_seconds"]
                                             for s in record["steps"]))}
    earlier = done - len(group)
    if earlier:
      held = evaluator.edit_success(model, params, cases[:earlier],
                                    plan.scoring_batch)
      rr = M.retain_rate(held_at_edit[:earlier], held)
      # None: no earlier edit held at edit time, so nothing to retain.
      point["rr"] = None if np.isnan(rr) else 100.0 * rr
    else:
      point["rr"] = None
    point["sr_at_edit_so_far"] = 100.0 * float(np.mean(held_at_edit))
    if known:
      acc = evaluator.fact_accuracy(model, params, known,
                                    plan.scoring_batch)["accuracy"]
      point["known_accuracy"] = acc
      point["dd"] = M.drawdown(baseline["known_accuracy"], acc)
      point["dd_ceiling"] = baseline["known_accuracy"]
    if ppl_rows is not None:
      point["perplexity"] = perplexity(model, params, ppl_rows)
      point["perplexity_ratio"] = point["perplexity"] / baseline["perplexity"]
    point["nan"] = not all(bool(np.all(np.isfinite(np.asarray(x))))
                           for x in jax.tree.leaves(params)
                           if np.issubdtype(np.asarray(x).dtype, np.floating))
    point["eval_seconds"] = time.perf_counter() - t
    record["checkpoints"].append(point)
    record["held_at_edit"] = held_at_edit
    record["steps_done"] = g + 1
    if workdir:
      _save(workdir, params0, params, state, record)
    bar.set_postfix({k: round(point[k], 1) for k in
                     ("efficacy_score", "paraphrase_score",
                      "neighborhood_score", "rr", "perplexity")
                     if isinstance(point.get(k), float)})
    if on_checkpoint is not None:
      on_checkpoint(point)
    if on_results is not None:
      on_results(_results(plan, editor, cases, record, resumed_from, last))

  return dict(_results(plan, editor, cases, record, resumed_from, True),
              params=params, state=state)


def _results(plan, editor, cases, record, resumed_from, complete) -> dict:
  edits = record["checkpoints"][-1]["edits"] if record["checkpoints"] else 0
  edit_total = float(sum(s["edit_seconds"] for s in record["steps"]))
  return {"plan": dataclasses.asdict(plan), "method": editor.name,
          "n": len(cases), "complete": complete, "edits_done": edits,
          "settings": record["settings"], "baseline": record["baseline"],
          "checkpoints": record["checkpoints"], "steps": record["steps"],
          "final": record["checkpoints"][-1] if record["checkpoints"] else None,
          "resumed_from": resumed_from,
          "timing": {"edit_seconds_total": edit_total,
                     "edit_seconds_per_edit": edit_total / max(
                         1, record["steps"][-1]["edits"] if record["steps"]
                         else 0),
                     "eval_seconds_total": float(sum(
                         c["eval_seconds"] for c in record["checkpoints"])
                                                 + record["baseline"]["seconds"])}}


__all__ = ["Plan", "fingerprint", "heldout_text_rows", "params_delta",
           "params_from_delta", "perplexity", "run"]
