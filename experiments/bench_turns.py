"""Timing successive edit turns (no flags: tests import it; the
`lifelong` task of `experiments.benchmark` calls it)."""

import statistics
import time

import jax


def lifelong_turns(editor, model, params, records, batch: int,
                   compiles: list):
  """Edits `records` in successive turns of `batch`, state carried; times
  `init` and every turn (with the compilations it triggered).

  Returns:
    (row of timings, the final params, the final editor state).
  """
  if batch < 1 or not records or len(records) % batch:
    raise ValueError(f"{len(records)} records are not a positive multiple "
                     f"of the turn size {batch}.")
  start = time.perf_counter()
  state = editor.init(model, params)
  init_s = time.perf_counter() - start
  turns = []
  for i in range(0, len(records), batch):
    before = len(compiles)
    start = time.perf_counter()
    params, state, _ = editor.apply(model, params, records[i:i + batch], state)
    params = jax.block_until_ready(params)
    turns.append({"edits": i + batch, "s": time.perf_counter() - start,
                  "compiles": len(compiles) - before})
  total = sum(t["s"] for t in turns)
  rest = [t["s"] for t in turns[1:]]
  return {"method": editor.name, "num_edits": len(records), "batch": batch,
          "init_s": init_s, "edit_s_total": total,
          "s_per_edit": total / len(records),
          "first_turn_s": turns[0]["s"],
          "steady_s_per_turn": statistics.median(rest) if rest else None,
          "turns": turns}, params, state
