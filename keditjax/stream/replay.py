"""Replaying a stream of facts into a `LiveModel` while a reader asks it.

`replay` submits edit cases at a steady rate from a feeder thread; a reader
thread meanwhile takes a snapshot every `read_period_s`, asks it about facts
already visible in that snapshot (does it prefer the new answer?) and about
unrelated prompts (does it keep the true answer?), and times each read. The
result holds per-edit latency (arrival -> visible to readers), throughput,
reader latency and answer accuracy over time; `final_accuracy` scores every
fact at the end.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np

from keditjax import errors, progress


def _prefers(live, snapshot, prompts, first, second) -> np.ndarray:
  """1 where log P(first) > log P(second) for each prompt."""
  a = live.score(prompts, first, snapshot=snapshot)
  b = live.score(prompts, second, snapshot=snapshot)
  return (a > b).astype(np.float32)


def replay(live, cases: Sequence, *, rate_per_s: float,
           read_period_s: float = 1.0, read_sample: int = 8,
           unrelated: Sequence = (), seed: int = 0,
           show_progress: bool = True) -> dict:
  """Streams `cases` into `live` and reads it while it is being edited.

  Args:
    live: a `LiveModel` (its worker is started and stopped here).
    cases: `EditCase`s with `target_true` (one request each is submitted).
    rate_per_s: arrivals per second (steady).
    read_period_s: seconds between reads.
    read_sample: visible facts asked per read.
    unrelated: `(prompt, true answer, other answer)` triples the edits must
      not change; all are asked at every read.
    seed: the reader's sampling seed.
    show_progress: a progress bar over applied edits.

  Returns:
    A dict: `edits` (per case: arrival, visible, latency_s, batch_size,
    refused), `reads` (per read: time, latency_s, visible edits, efficacy
    and unrelated accuracy of the read), and `wall_s`.
  """
  if not rate_per_s > 0:
    raise errors.ConfigError(f"rate_per_s={rate_per_s} must be > 0.")
  missing = [c.case_id for c in cases if c.target_true is None]
  if missing:
    raise errors.InputError(f"cases {missing[:5]} have no target_true.")
  by_edit: dict[str, object] = {}
  futures, reads = [], []
  done = threading.Event()
  start = time.time()

  def register(case):
    def done_(future):   # in the writer's thread, right after the swap
      if future.exception() is None:
        by_edit[future.result().id] = case
    return done_

  def feed():
    for i, case in enumerate(cases):
      delay = start + i / rate_per_s - time.time()
      if delay > 0:
        time.sleep(delay)
      future = live.submit(case.request)
      future.add_done_callback(register(case))
      futures.append(future)

  def read():
    rng = np.random.default_rng(seed)
    while not done.is_set():
      t0 = time.time()
      snap = live.snapshot()
      # (an edit whose callback has not run yet is skipped this read)
      visible = [by_edit[i] for i in snap.edit_ids if i in by_edit]
      row = {"time_s": t0 - start, "visible": len(snap.edit_ids)}
      if visible:
        pick = rng.choice(len(visible), min(read_sample, len(visible)),
                          replace=False)
        asked = [visible[j] for j in pick]
        row["efficacy"] = float(_prefers(
            live, snap, [c.prompt for c in asked],
            [c.target_new for c in asked],
            [c.target_true for c in asked]).mean())
      if unrelated:
        row["unrelated"] = float(_prefers(
            live, snap, [u[0] for u in unrelated], [u[1] for u in unrelated],
            [u[2] for u in unrelated]).mean())
      row["latency_s"] = time.time() - t0
      reads.append(row)
      done.wait(max(0.0, read_period_s - row["latency_s"]))

  feeder = threading.Thread(target=feed, name="keditjax-replay-feed")
  reader = threading.Thread(target=read, name="keditjax-replay-read")
  bar = progress.bar(total=len(cases), desc="stream", unit="edit") if (
      show_progress) else None
  with live:
    feeder.start()
    reader.start()
    feeder.join()
    for future in futures:
      future.exception()   # waits; refusals are reported below
      if bar is not None:
        bar.update(1)
  wall = time.time() - start
  done.set()
  reader.join()
  if bar is not None:
    bar.close()
  edits = []
  for case, future in zip(cases, futures):
    error = future.exception()
    if error is not None:
      edits.append({"case_id": case.case_id, "refused": str(error)})
      continue
    a = future.result()
    edits.append({"case_id": case.case_id, "id": a.id,
                  "arrival_s": a.arrived - start, "visible_s": a.visible - start,
                  "latency_s": a.latency_s, "batch_size": a.batch_size})
  return {"edits": edits, "reads": reads, "wall_s": wall}


def summarize(result: dict) -> dict:
  """Latency, throughput and reader figures of one `replay` result."""
  ok = [e for e in result["edits"] if "refused" not in e]
  lat = np.array([e["latency_s"] for e in ok]) if ok else np.zeros(0)
  read_lat = np.array([r["latency_s"] for r in result["reads"]])
  span = (max(e["visible_s"] for e in ok) - min(e["arrival_s"] for e in ok)
          if ok else 0.0)
  pct = lambda x, q: float(np.percentile(x, q)) if len(x) else None
  return {
      "applied": len(ok), "refused": len(result["edits"]) - len(ok),
      "operations": len({e["visible_s"] for e in ok}),
      "mean_batch": float(np.mean([e["batch_size"] for e in ok])) if ok
                    else None,
      "edit_latency_s": {"median": pct(lat, 50), "p90": pct(lat, 90),
                         "max": pct(lat, 100)},
      "edits_per_s": len(ok) / span if span > 0 else None,
      "reader_latency_s": {"median": pct(read_lat, 50),
                           "p90": pct(read_lat, 90)},
      "reads": len(read_lat)}


def final_accuracy(model, params, cases, batch_size: int = 64) -> dict:
  """Efficacy (new preferred to true) and neighbourhood (true kept) over
  every case, under `params`."""
  prompts = [c.prompt for c in cases]
  new = model.score(params, prompts, [c.target_new for c in cases],
                    batch_size=batch_size)
  true = model.score(params, prompts, [c.target_true for c in cases],
                     batch_size=batch_size)
  out = {"efficacy": float(np.mean(new > true) * 100)}
  hood = [(p, c.target_true, c.target_new) for c in cases
          for p, _ in c.neighborhood[:1]]
  if hood:
    keep = model.score(params, [h[0] for h in hood], [h[1] for h in hood],
                       batch_size=batch_size)
    other = model.score(params, [h[0] for h in hood], [h[2] for h in hood],
                        batch_size=batch_size)
    out["neighbourhood"] = float(np.mean(keep > other) * 100)
  return out
