"""GRACE: edit N CounterFact facts in sequence, then remove edits one by one.

For each removed edit k (from the full N-edit model): the largest logit
difference on k's prompt against the unedited model (0 means removal is
exact), whether k's target is still preferred, and the edit success (SR,
every target token greedy) of the other N−1 edits.

  python -m experiments.grace_remove --num_edits=100 --remove=0,49,99 \
      --output=docs/results/grace_remove_cf100.json
"""

import dataclasses
import json
import time

import numpy as np
from absl import app, flags

from experiments import common
from keditjax import editors, models
from keditjax.editors import grace
from keditjax.evaluation import cases as cases_lib, evaluator

flags.DEFINE_integer("num_edits", 100, "Records edited in sequence.")
flags.DEFINE_list("remove", ["0", "49", "99"], "Edits to remove, one at a time.")
flags.DEFINE_string("output", None, "JSON output path.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  common.setup()
  model = models.load()
  cases = cases_lib.load_cases("counterfact", limit=FLAGS.num_edits)
  editor = editors.get("grace")
  state = editor.init(model)
  params, records = model.params, []
  start = time.perf_counter()
  for case in cases:
    params, state, info = editor.apply(model, params, list(case.requests), state)
    records += info.records
  edit_s = time.perf_counter() - start
  logits = lambda p, text: np.asarray(model.apply(p, np.asarray([model.encode(text)])))
  all_sr = evaluator.edit_success(model, params, cases)
  rows = []
  for k in map(int, FLAGS.remove):
    removed = grace.remove(params, editor.hparams, records[k])
    text = cases[k].prompt
    others = [c for i, c in enumerate(cases) if i != k]
    sr_k = evaluator.edit_success(model, removed, [cases[k]])
    rows.append({
        "removed": k, "case_id": cases[k].case_id,
        "max_abs_logit_diff_vs_unedited": float(np.abs(
            logits(removed, text) - logits(model.params, text)).max()),
        "removed_edit_still_succeeds": bool(sr_k[0]),
        "others_sr": 100.0 * float(evaluator.edit_success(model, removed,
                                                          others).mean()),
        "codebook_size": grace.size(removed, editor.hparams)})
    print(json.dumps(rows[-1]))
  report = {"command": "python -m experiments.grace_remove " + " ".join(
                f"--{k}={v}" for k, v in (("num_edits", FLAGS.num_edits),
                                          ("remove", ",".join(FLAGS.remove)))),
            "hparams": dataclasses.asdict(editor.hparams),
            "num_edits": len(cases), "edit_seconds": edit_s,
            "sr_all_edits": 100.0 * float(all_sr.mean()),
            "codebook_size": grace.size(params, editor.hparams),
            "removals": rows}
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
