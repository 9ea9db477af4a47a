"""T-Patcher's memory and learning rate, measured on CounterFact.

A patch neuron is a linear threshold on the MLP input: it must fire on its
edit and stay silent on neighbourhood prompts (same relation, another
subject), which lie close to the edit in activation space. This sweep edits
the first N records in sequence for each setting and reports the CounterFact
scores, the share of neighbourhood / paraphrase prompts on which any patch
neuron fires at the prompt's last token, and edit seconds.

  python -m experiments.tpatcher_sweep --num_records=50 \
      --output=docs/results/tpatcher_sweep.json
"""

import json
import time

import numpy as np
from absl import app, flags

from experiments import common
from keditjax import editors, models
from keditjax.editors import tpatcher
from keditjax.evaluation import cases as cases_lib, evaluator
from keditjax.models import lm, sites as sites_lib

flags.DEFINE_integer("num_records", 50, "Edit-split records, edited in turn.")
flags.DEFINE_string(
    "settings", '[{"memory_task": "", "lr": 0.03}, {"lr": 0.01}, {"lr": 0.03}, '
    '{"lr": 0.03, "memory_task_records": 3000}]',
    "JSON list of hyper-parameter overrides.")
flags.DEFINE_string("output", None, "JSON output path.")
FLAGS = flags.FLAGS
SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def fires(model, params, hparams, texts, batch=32):
  """Per text: whether any live neuron fires at its last token."""
  name = f"layer/{hparams.layer}/mlp/in"
  _, patch = tpatcher.patch(params, hparams)
  out = []
  for start in range(0, len(texts), batch):
    ids = [model.encode(t) for t in texts[start:start + batch]]
    length = lm.bucket(max(map(len, ids)), 32)
    tokens = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    last = np.zeros((batch, 1), np.int32)
    for row, i in enumerate(ids):
      tokens[row, :len(i)], mask[row, :len(i)], last[row, 0] = i, 1, len(i) - 1
    _, got = model.apply(model.params, tokens, attention_mask=mask,
                         sites=sites_lib.capture(name, positions=last))
    h = np.asarray(got[name])[:len(ids), 0]
    p = {k: np.asarray(v) for k, v in patch.params.items()}
    a = (h @ p["keys"].T + p["bias"])[:, p["active"] > 0]
    out += list((a > 0).any(axis=1))
  return np.asarray(out)


def main(argv):
  del argv
  common.setup()
  model = models.load()
  cases = cases_lib.load_cases("counterfact", limit=FLAGS.num_records)
  _, unedited = evaluator.evaluate(model, model.params, cases,
                                   families=("counterfact",))
  report = {"num_records": len(cases), "split": "counterfact edit",
            "unedited": {k: unedited[k] for k in SCORES}, "settings": []}
  for overrides in json.loads(FLAGS.settings):
    editor = editors.get("tpatcher", **overrides)
    state = editor.init(model)
    params, seconds, neurons = model.params, [], []
    for case in cases:
      start = time.perf_counter()
      params, state, info = editor.apply(model, params, list(case.requests),
                                         state)
      seconds.append(time.perf_counter() - start)
      neurons += info.extras["neurons"]
    _, scores = evaluator.evaluate(model, params, cases,
                                   families=("counterfact",))
    neigh = [p for c in cases for p, _ in c.neighborhood]
    para = [p for c in cases for p in c.paraphrase_prompts]
    row = {"overrides": overrides, **{k: scores[k] for k in SCORES},
           "neighborhood_fired": float(np.mean(fires(
               model, params, editor.hparams, neigh))),
           "paraphrase_fired": float(np.mean(fires(
               model, params, editor.hparams, para))),
           "neurons_per_edit": float(np.mean(neurons)),
           "edit_seconds_median": float(np.median(seconds)),
           "memory_rows": int(state.memory_count)}
    print(json.dumps(row), flush=True)
    report["settings"].append(row)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
