r"""The reliability–locality trade-off: SR against DD over a strength sweep.

  python -m experiments.tradeoff --task=lm --num_edits=20 \
      --ftl=1e-3,2e-3,3e-3,5e-3,1e-2 --ftkl=0.1,1,10 --ewc=1e2,1e4,1e6 \
      --output_dir=runs/tradeoff_lm
  python -m experiments.tradeoff --task=vision --num_edits=50 \
      --output_dir=runs/tradeoff_vision

Each listed value of FT-L's radius, FT+KL's KL weight and EWC's λ edits the
same cases (single, non-successive edits) and reports SR and DD. Writes
DIR/results.json ({"task", "rows", "monotonicity", "chosen"}),
DIR/summary.md and DIR/sr_dd.png (the ringed points are the config
defaults).
"""

import json
import os

from absl import app, flags

from experiments import common

flags.DEFINE_enum("task", "lm", ["lm", "vision"], "Default LM or the CNN.")
flags.DEFINE_integer("num_edits", 20, "Cases edited per point.")
flags.DEFINE_string("ftl", None, "FT-L radii (comma-separated).")
flags.DEFINE_string("ftkl", None, "FT+KL weights.")
flags.DEFINE_string("ewc", None, "EWC lambdas.")
flags.DEFINE_integer("heldout_size", 50, "LM: known_1000 facts for DD.")
flags.DEFINE_string("dataset", "mnist", "Vision: dataset (mnist or digits).")
flags.DEFINE_string("output_dir", None, "Where to write results.")
flags.mark_flag_as_required("output_dir")
FLAGS = flags.FLAGS

VISION_DEFAULTS = {"ftl": "2e-3,3e-3,5e-3,7e-3,1e-2,2e-2",
                   "ftkl": "0.1,1,10,100,1000", "ewc": "1e3,1e4,1e5,1e6,1e7"}
LM_DEFAULTS = {"ftl": "1e-3,2e-3,3e-3,5e-3,1e-2", "ftkl": "0.1,1,10",
               "ewc": "1e2,1e4,1e6"}


def main(argv):
  del argv
  common.setup()
  from keditjax import editors
  from keditjax.evaluation import tradeoff
  defaults = LM_DEFAULTS if FLAGS.task == "lm" else VISION_DEFAULTS
  grid = {m: tradeoff.parse_values(getattr(FLAGS, m) or defaults[m])
          for m in ("ftl", "ftkl", "ewc")}
  if FLAGS.num_edits < 1:
    raise app.UsageError("--num_edits must be >= 1.")
  if FLAGS.task == "lm":
    from keditjax import models
    from keditjax.evaluation import cases as cases_lib
    cases = cases_lib.load_cases("counterfact", limit=FLAGS.num_edits)
    heldout = cases_lib.load_facts(None, limit=FLAGS.heldout_size)
    evaluate = tradeoff.language_model_evaluator(models.load(), cases,
                                                 heldout=heldout)
  else:
    from keditjax.evaluation import vision
    evaluate = vision.sweep_evaluator(FLAGS.dataset, FLAGS.num_edits)
  rows = []
  for method, values in grid.items():
    rows += tradeoff.sweep(evaluate, method, values)
  chosen = {m: getattr(editors.hparams_class(m)(), tradeoff.STRENGTH[m][0])
            for m in grid}
  if FLAGS.task == "vision":
    chosen = vision.default_strengths()
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  out = {"task": FLAGS.task, "num_edits": FLAGS.num_edits, "rows": rows,
         "monotonicity": {m: tradeoff.monotonicity(
             [r for r in rows if r["method"] == m]) for m in grid},
         "chosen": chosen}
  with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  lines = ["| method | param | value | SR | DD | " +
           " | ".join(k for k in rows[0] if k not in (
               "method", "param", "value", "sr", "dd")) + " |"]
  lines.append("|" + "---|" * (len(rows[0]) + 0))
  for r in rows:
    rest = [f"{v:.3g}" if isinstance(v, float) else str(v)
            for k, v in r.items() if k not in ("method", "param", "value",
                                               "sr", "dd")]
    lines.append(f"| {r['method']} | {r['param']} | {r['value']:g} | "
                 f"{r['sr']:.1f} | {r['dd']:.2f} | " + " | ".join(rest) + " |")
  with open(os.path.join(FLAGS.output_dir, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  title = ("Default LM (CounterFact)" if FLAGS.task == "lm"
           else f"CNN ({FLAGS.dataset})")
  tradeoff.plot(rows, os.path.join(FLAGS.output_dir, "sr_dd.png"),
                title=f"SR vs DD, {title}, {FLAGS.num_edits} single edits",
                chosen=chosen)
  tradeoff.plot_strength(rows, os.path.join(FLAGS.output_dir, "strength.png"),
                         title=f"SR and DD vs strength, {title}",
                         chosen=chosen)
  if FLAGS.task == "lm":  # the field's locality measure, more sensitive
    tradeoff.plot(rows, os.path.join(FLAGS.output_dir,
                                     "efficacy_neighborhood.png"),
                  title=f"Efficacy vs neighbourhood drop, {title}",
                  x="neighborhood_drop", y="efficacy_score",
                  xlabel="neighbourhood drop (points)",
                  ylabel="efficacy (%)", chosen=chosen)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
