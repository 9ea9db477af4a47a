"""How well a rollback takes one older edit out of a run of successive edits.

  report = rollback.successive_then_rollback(live, requests, rollback=4)

Applies `requests` one after another to a `LiveModel`, recording each
prompt's P(target_new) just before its own edit (its pre-edit score), then
rolls one edit back with each mode, every mode from the same edited state
(`LiveModel.fork`), and reports the rolled-back prompt's P(target_new)
against its pre-edit score and which of the other edits still succeed
(P(target_new) > P(target_true)). The acceptance of a rollback mode: the
prompt back within 1 point, >= 95% of the others that succeeded still do.
Scores are in points (100 · P).
"""

from __future__ import annotations

import numpy as np

from keditjax import editors, errors, progress, stats
from keditjax.editors import base
from keditjax.models import tiny


def _scores(live, snapshot, requests):
  prompts = [r.text for r in requests]
  new = live.score(prompts, [r.target_new for r in requests],
                   snapshot=snapshot)
  true = live.score(prompts, [r.target_true for r in requests],
                    snapshot=snapshot)
  return 100 * np.exp(new), new > true


def oldest_held(p_new, success, threshold: float = 50.0) -> int:
  """The oldest edit, after the first, that still holds with P(new) above
  `threshold` points at the end (not the last: rolling it back is a
  restore). Raises `InputError` when there is none."""
  for i in range(1, len(p_new) - 1):
    if success[i] and p_new[i] > threshold:
      return i
  raise errors.InputError(
      f"no edit after the first holds with P(target_new) > {threshold} "
      "points; nothing to roll back.")


def successive_then_rollback(live, requests, rollback="oldest_held",
                             modes=("subtract", "rebuild"), *,
                             show_progress: bool = True) -> dict:
  """Applies `requests` one by one, then rolls one back with each mode.

  Args:
    live: a `LiveModel` (it is edited; the rollbacks run on forks).
    requests: requests with `target_true` (dicts or `Request`s), >= 3.
    rollback: the index of the edit to roll back, or "oldest_held"
      (`oldest_held` of the scores after all edits).
    modes: rollback modes (`live.ROLLBACK_MODES`) to compare.
    show_progress: a progress bar over the edits.

  Returns:
    A JSON-able dict: `pre_edit_p_new`, `edited_p_new`, `edited_success`,
    `rolled_back` and, per mode, `p_new_after`, `success_after`,
    `rolled_back_p_new` (pre_edit, edited, after, gap_points),
    `others_success_held` (percent of the others that succeeded before;
    None when none did), `others_succeeding_before` and `meets_acceptance`.
  """
  requests = base.make_requests(requests)
  missing = [i for i, r in enumerate(requests) if not r.target_true]
  if missing or len(requests) < 3:
    raise errors.InputError(
        f"need >= 3 requests, each with target_true (got {len(requests)}; "
        f"without target_true: {missing[:5]}).")
  if not (rollback == "oldest_held" or (isinstance(rollback, int) and
                                        0 <= rollback < len(requests))):
    raise errors.ConfigError(f"rollback={rollback!r}: an index below "
                             f"{len(requests)} or 'oldest_held'.")
  pre, ids = [], []
  steps = range(len(requests))
  for i in (progress.bar(steps, desc="edits", unit="edit")
            if show_progress else steps):
    pre.append(float(_scores(live, live.snapshot(), requests[i:i + 1])[0][0]))
    ids.append(live.edit(requests[i])[0].id)
  p_edited, ok_edited = _scores(live, live.snapshot(), requests)
  k = (oldest_held(p_edited, ok_edited) if rollback == "oldest_held"
       else rollback)
  held = [i for i in range(len(requests)) if i != k and ok_edited[i]]
  out = {"pre_edit_p_new": pre, "edited_p_new": p_edited.tolist(),
         "edited_success": ok_edited.tolist(), "rolled_back": k, "modes": {}}
  for mode in modes:
    snap = live.fork().rollback(ids[k], mode=mode)
    p_after, ok_after = _scores(live, snap, requests)
    kept = (100 * float(np.mean([ok_after[i] for i in held]))
            if held else None)
    gap = float(p_after[k] - pre[k])
    out["modes"][mode] = {
        "p_new_after": p_after.tolist(), "success_after": ok_after.tolist(),
        "rolled_back_p_new": {"pre_edit": pre[k], "edited": float(p_edited[k]),
                              "after": float(p_after[k]), "gap_points": gap},
        "others_success_held": kept, "others_succeeding_before": len(held),
        "meets_acceptance": bool(abs(gap) <= 1.0 and
                                 (kept is None or kept >= 95.0))}
  return out


def fact_rome(model, ridge: float = 1e-3):
  """(editor, state): ROME for `tiny.fact_lm`, as the rollback measurements
  on it use it: layer 0, the key covariance of `tiny.fact_corpus()` plus
  `ridge` · its mean eigenvalue, clamp_norm_factor 1.5 (smaller steps
  interfere less in a 64-wide model), float32, no context templates."""
  import datasets  # pylint: disable=import-outside-toplevel
  corpus = datasets.Dataset.from_dict({"text": tiny.fact_corpus()})
  cov = stats.second_moments(model, [0], corpus=corpus, cache_dir=False,
                             progress=False)[0]
  cov = cov + ridge * np.trace(cov) / len(cov) * np.eye(len(cov))
  editor = editors.get("rome", layer=0, v_compute_dtype="float32",
                       clamp_norm_factor=1.5)
  return editor, editor.init(model, covariance=cov, templates=("{}",))
