"""The `edit` task of `experiments.benchmark`: seconds per edit, by phase.

ROME (and KN): `--num_edits` CounterFact records edited one at a time from
the unedited model. An edit whose prompt shapes were seen before must not
compile; `compile_s` is the mean extra time of the edits that did compile,
`steady_*` are medians over those that did not. MEMIT/AlphaEdit: one batch
of N records for each N in `--batch_sizes_edit`, timed cold (with whatever
compilations the batch needs) and, up to `--warm_max` edits, again warm with
the same shapes.

The `lifelong` task: `--num_edits` records written in successive turns of
`--lifelong_batch` (params and editor state carried from turn to turn, no
evaluation), each turn timed with its compilations; the first turn is the
cold one, `steady_s_per_turn` the median of the rest.

What a user waits for (ROME, KN): with `--fresh_processes` the same edits are
also timed in two new processes sharing a new, empty persistent compilation
cache: the first fills it ("empty cache"), the second reads it ("warm
cache"); each reports its first edit, the median of edits 2..N and the
seconds from process start to the first edit done (the covariance cache is
the user's, so both measure compilation, not statistics).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from experiments import bench_turns
from keditjax import data, editors

_METHOD = flags.DEFINE_enum("method", "rome", list(editors.METHODS), "Editor (task=edit).")
_NUM_EDITS = flags.DEFINE_integer("num_edits", 10, "Edits to time (task=edit, single-edit methods).")
_BATCH_EDITS = flags.DEFINE_list("batch_sizes_edit", ["1", "10", "100", "1000"],
                                 "Batch sizes (task=edit, MEMIT/AlphaEdit).")
_WARM_MAX = flags.DEFINE_integer("warm_max", 100, "Batch edits repeated for a steady (compiled) "
                                 "timing only up to this size (task=edit, memit/alphaedit).")
_EDITOR_CKPT = flags.DEFINE_string(
    "editor_checkpoint", None, "A train_hypernet workdir (task=edit, method=mend).")
_DATA = flags.DEFINE_string("data_path", "counterfact",
                            "CounterFact records (task=edit): a name, path or hf:<id>.")
_FRESH = flags.DEFINE_bool("fresh_processes", True, "task=edit, single-edit methods: also time "
                           "the edits in new processes with an empty, then a warm, XLA cache.")
_LIFELONG_BATCH = flags.DEFINE_integer("lifelong_batch", 100, "Edits per turn (task=lifelong).")
_START = time.perf_counter()  # ~ process start (this module loads with the launcher)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed_edit(editor, model, params, requests, state, compiles):
  before = len(compiles)
  start = time.perf_counter()
  _, _, info = editor.apply(model, params, requests, state)
  return time.perf_counter() - start, len(compiles) - before, info.seconds


def bench_edit(model, params, compiles):
  """Rows of timings for `--method` (see the module docstring)."""
  records = data.read_records(_DATA.value)
  extra = {"checkpoint": _EDITOR_CKPT.value} if _EDITOR_CKPT.value else {}
  editor = editors.get(_METHOD.value, **extra)
  start = time.perf_counter()
  state = editor.init(model, params)
  init_s = time.perf_counter() - start
  if _METHOD.value in ("memit", "alphaedit"):
    rows = []
    for n in map(int, _BATCH_EDITS.value):
      cold, n_comp, phases = _timed_edit(editor, model, params, records[:n], state, compiles)
      row = {"method": _METHOD.value, "num_edits": n, "init_s": init_s,
             "first_call_s": cold, "first_call_s_per_edit": cold / n, "compiles": n_comp,
             "first_call_phases_s": phases}
      if n <= _WARM_MAX.value:  # a second, compiled call
        warm, warm_comp, warm_phases = _timed_edit(editor, model, params, records[:n], state, compiles)
        row.update({"compile_s": cold - warm, "steady_s": warm, "steady_compiles": warm_comp,
                    "steady_s_per_edit": warm / n, "phases_s": warm_phases})
      rows.append({**row, "peak_rss_mb": _peak_rss_mb()})
    return rows
  steady, compiled, phases, per_edit = [], [], [], []
  for record in records[:_NUM_EDITS.value]:
    seconds, n_comp, phase = _timed_edit(editor, model, params, record, state, compiles)
    (compiled if n_comp else steady).append((seconds, n_comp))
    per_edit.append({"s": seconds, "compiles": n_comp,
                     "since_process_start_s": time.perf_counter() - _START})
    if not n_comp:
      phases.append(phase)
  steady_s = statistics.median(s for s, _ in steady) if steady else float("nan")
  row = {"method": _METHOD.value, "num_edits": _NUM_EDITS.value, "init_s": init_s,
         "per_edit": per_edit,
         "edits_that_compiled": len(compiled),
         "compiles": sum(c for _, c in compiled),
         "compile_s": (statistics.mean(s for s, _ in compiled) - steady_s) if compiled else 0.0,
         "steady_edits": len(steady), "steady_s": steady_s,
         "steady_phases_s": {k: statistics.median(p[k] for p in phases)
                             for k in (phases[0] if phases else {})},
         "peak_rss_mb": _peak_rss_mb()}
  row["fresh_processes"] = fresh_process_rows() if _FRESH.value else []
  return [row]


def bench_lifelong(model, params, compiles):
  """One row: `--num_edits` successive edits in turns (module docstring)."""
  records = data.read_records(_DATA.value)[:_NUM_EDITS.value]
  row, _, _ = bench_turns.lifelong_turns(editors.get(_METHOD.value), model, params,
                             records, _LIFELONG_BATCH.value, compiles)
  return [dict(row, peak_rss_mb=_peak_rss_mb())]


def fresh_process_rows() -> list[dict]:
  """The same edits in a new process, with an empty then a warm XLA cache."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="keditjax-xla-") as cache:
    for label in ("empty cache", "warm cache"):
      out = os.path.join(cache, "child.json")
      cmd = [sys.executable, "-m", "experiments.benchmark", "--task=edit",
             f"--method={_METHOD.value}", f"--num_edits={_NUM_EDITS.value}",
             f"--data_path={_DATA.value}", "--fresh_processes=false",
             f"--compilation_cache={os.path.join(cache, 'xla')}", f"--output_json={out}"]
      start = time.perf_counter()
      subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                     env=dict(os.environ, KEDITJAX_PROGRESS="0"))
      wall = time.perf_counter() - start
      with open(out) as f:
        child = json.load(f)["results"][0]
      edits = [e["s"] for e in child["per_edit"]]
      rows.append({"process": label, "first_edit_s": edits[0],
                   "median_edits_2_to_n_s": statistics.median(edits[1:]) if edits[1:] else None,
                   "first_edit_done_since_start_s": child["per_edit"][0]["since_process_start_s"],
                   "process_wall_s": wall, "init_s": child["init_s"],
                   "compiles_per_edit": [e["compiles"] for e in child["per_edit"]],
                   "edit_s": edits, "peak_rss_mb": child["peak_rss_mb"]})
  return rows
