"""Quality and seconds per edit against batch size (the seed's third experiment).

  python -m experiments.batch_curve --methods=rome,memit,alphaedit \
      --batch_sizes=1,10,100 --output=docs/results/batch_curve.json

For every method and batch size b, max(b, --min_edits) CounterFact records
(from --start) are edited in batches of b, every batch into the unedited
model (the survey's batch protocol, `protocols.run(mode="batch")`), and each
batch's model is scored on its own records (efficacy / paraphrase /
neighbourhood, teacher-forced). Seconds per edit are the editing time only
(`timing.edit_seconds` / edits; scoring excluded). All settings run in one
process in the order given, so compiled programs are shared: each method's
first batch size pays its compiles (the `first_for_method` column says which
rows did). The table and the figure come from
`experiments.lifelong_render` (`batch_table`, `batch_plot`).
"""

import json

from absl import app, flags

from experiments import common
from experiments import lifelong_render
from experiments.configs import editors as editor_configs
from keditjax import editors, models
from keditjax.evaluation import cases as cases_lib
from keditjax.evaluation import protocols

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model.")
flags.DEFINE_list("methods", ["rome", "memit", "alphaedit"], "Methods.")
flags.DEFINE_list("batch_sizes", ["1", "10", "100"], "Batch sizes.")
flags.DEFINE_integer("start", 0, "First CounterFact record.")
flags.DEFINE_integer("min_edits", 10, "Edits per setting at least (small "
                     "batch sizes run several batches).")
flags.DEFINE_integer("max_rome_batch", 100, "ROME edits a batch one request "
                     "after another; larger batch sizes are skipped for it "
                     "(and listed as skipped).")
flags.DEFINE_string("output", None, "JSON to write (a PNG beside it).")
flags.mark_flag_as_required("output")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  common.setup()
  sizes = [int(b) for b in FLAGS.batch_sizes]
  model = models.load(FLAGS.model)
  rows, skipped = [], []
  for method in FLAGS.methods:
    editor = editors.get(method, editor_configs.hparams_from(
        editor_configs.get_config(), method))
    first = True
    for b in sizes:
      if method == "rome" and b > FLAGS.max_rome_batch:
        skipped.append({"method": method, "batch_size": b})
        continue
      n = max(b, FLAGS.min_edits)
      n -= n % b
      cases = cases_lib.load_cases("counterfact", None, limit=n,
                                   start=FLAGS.start)
      protocol = protocols.Protocol(mode="single" if b == 1 else "batch",
                                    batch_size=b, dd_every=0, fluency=False,
                                    families=("counterfact", "token"))
      out = protocols.run(model, editor, cases, protocol, progress=True)
      m, t = out["metrics"], out["timing"]
      row = {"method": method, "batch_size": b, "n": n,
             "batches": n // b, "first_for_method": first,
             "efficacy_score": m["efficacy_score"],
             "paraphrase_score": m["paraphrase_score"],
             "neighborhood_score": m["neighborhood_score"],
             "rewrite_acc": m.get("rewrite_acc"),
             "edit_seconds": t["edit_seconds"],
             "seconds_per_edit": t["edit_seconds"] / n}
      first = False
      print({k: round(v, 2) if isinstance(v, float) else v
             for k, v in row.items()}, flush=True)
      rows.append(row)
      data = {"command": {k: FLAGS[k].value for k in (
                  "model", "methods", "batch_sizes", "start", "min_edits",
                  "max_rome_batch")},
              "rows": rows, "skipped": skipped}
      with open(FLAGS.output, "w") as f:  # after every row: can be followed
        json.dump(data, f, indent=1)
      lifelong_render.batch_plot(data, FLAGS.output[:-len(".json")] + ".png")
  print("\n".join(lifelong_render.batch_table(data)))


if __name__ == "__main__":
  app.run(main)
