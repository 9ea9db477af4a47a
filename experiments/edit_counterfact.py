r"""Edit CounterFact records and report efficacy / paraphrase / neighbourhood.

  python -m experiments.edit_counterfact --method=rome --num_records=200 \
      --mode=single --output_json=runs/rome_cf200.json
  python -m experiments.edit_counterfact --method=memit --num_records=200 \
      --mode=batch

`single`: every record is edited alone, from the unedited model, and scored
on that edited model. `batch`: all records in one `apply`, scored once.
Scores: CounterFact's probability comparisons (`keditjax.evaluation.counterfact`).
"""

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np
import tqdm

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import editors, models
from keditjax.evaluation import counterfact

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit.")
flags.DEFINE_enum("method", "rome", list(editors.METHODS), "Editing method.")
flags.DEFINE_string("data_path", "../shared/data/counterfact/counterfact-edit.json", "Records.")
flags.DEFINE_integer("num_records", 200, "First N records.")
flags.DEFINE_enum("mode", "single", ["single", "batch"], "Edit one at a time or all at once.")
flags.DEFINE_string("output_json", None, "Write results here (single mode also appends "
                    "each record's margins to <output_json>.jsonl as it goes).")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py", "Editor hyper-parameters.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  common.setup()
  model = models.load(FLAGS.model)
  records = counterfact.load_records(FLAGS.data_path, FLAGS.num_records)
  hparams = editor_configs.hparams_from(FLAGS.config, FLAGS.method)
  editor = editors.get(FLAGS.method, hparams)
  start = time.perf_counter()
  state = editor.init(model)
  init_s = time.perf_counter() - start
  unedited = counterfact.scores(model, model.params, records)
  times, per_record = [], {k: [] for k in ("efficacy", "paraphrase", "neighborhood")}
  if FLAGS.output_json and os.path.exists(FLAGS.output_json + "l"):
    os.remove(FLAGS.output_json + "l")
  if FLAGS.mode == "batch":
    start = time.perf_counter()
    params, _, info = editor.apply(model.params, records, state)
    times.append(time.perf_counter() - start)
    edited = counterfact.scores(model, params, records)
    phases = info.seconds
  else:
    phases = {}
    for record in tqdm.tqdm(records, desc=f"{FLAGS.method} edits"):
      start = time.perf_counter()
      params, _, info = editor.apply(model.params, record, state)
      times.append(time.perf_counter() - start)
      for k, v in info.seconds.items():
        phases[k] = phases.get(k, 0.0) + v
      one = counterfact.scores(model, params, [record])["per_record"]
      for k in per_record:
        per_record[k] += one[k]
      if FLAGS.output_json:
        with open(FLAGS.output_json + "l", "a") as f:
          f.write(json.dumps({"case_id": record.get("case_id"), "seconds": times[-1],
                              "phases": info.seconds, "steps": info.extras.get("steps"),
                              **{k: v[0] for k, v in one.items()}}) + "\n")
    edited = {f"{k}_score": float(np.mean(np.array(v) > 0) * 100) for k, v in per_record.items()}
    edited.update({f"{k}_magnitude": float(np.mean(v)) for k, v in per_record.items()})
  rows = [("unedited", unedited), (FLAGS.method, edited)]
  print(f"{'':10} {'efficacy':>9} {'paraphrase':>10} {'neighborhood':>12}")
  for name, s in rows:
    print(f"{name:10} {s['efficacy_score']:9.1f} {s['paraphrase_score']:10.1f} "
          f"{s['neighborhood_score']:12.1f}")
  print(f"init {init_s:.1f} s; edit time total {sum(times):.1f} s, median {np.median(times):.2f} s")
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump({"method": FLAGS.method, "mode": FLAGS.mode, "n": len(records),
                 "hparams": FLAGS.config[FLAGS.method].to_dict(),
                 "unedited": {k: v for k, v in unedited.items() if k != "per_record"},
                 "edited": {k: v for k, v in edited.items() if k != "per_record"},
                 "init_s": init_s, "edit_seconds": times, "phase_seconds": phases},
                f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
