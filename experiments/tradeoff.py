r"""The reliability–locality trade-off: SR against DD over a strength sweep.

  python -m experiments.tradeoff --task=lm --num_edits=20 \
      --ftl=1e-3,3e-3,5e-3,1e-2 --ftkl=0.1,1,10,100,1e3,1e4 --ewc=10,1e3,1e4,1e5 \
      --output_dir=runs/tradeoff_lm
  python -m experiments.tradeoff --task=vision --num_edits=50 \
      --output_dir=runs/tradeoff_vision

Each listed value of FT-L's radius, FT+KL's KL weight and EWC's λ edits the
same cases (single, non-successive edits) and reports SR and DD. Writes
DIR/results.json ({"task", "rows", "monotonicity", "chosen"}),
DIR/summary.md and DIR/sr_dd.png (the ringed points are the config
defaults).
"""


from absl import app, flags

from experiments import common

flags.DEFINE_enum("task", "lm", ["lm", "vision"], "Default LM or the CNN.")
flags.DEFINE_integer("num_edits", 20, "Cases edited per point.")
flags.DEFINE_list("methods", ["ftl", "ftkl", "ewc"], "Methods to sweep.")
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
LM_DEFAULTS = {"ftl": "1e-3,3e-3,5e-3,1e-2", "ftkl": "0.1,1,10,100,1e3,1e4",
               "ewc": "10,1e3,1e4,1e5"}


def main(argv):
  del argv
  common.setup()
  from keditjax import editors
  from keditjax.evaluation import tradeoff
  defaults = LM_DEFAULTS if FLAGS.task == "lm" else VISION_DEFAULTS
  unknown = sorted(set(FLAGS.methods) - set(tradeoff.STRENGTH))
  if unknown or not FLAGS.methods:
    raise app.UsageError(f"--methods: {unknown or 'none'}; choose from "
                         f"{sorted(tradeoff.STRENGTH)}.")
  grid = {m: tradeoff.parse_values(getattr(FLAGS, m) or defaults[m])
          for m in FLAGS.methods}
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
  title = ("Default LM (CounterFact)" if FLAGS.task == "lm"
           else f"CNN ({FLAGS.dataset})")
  result = {"task": FLAGS.task, "num_edits": FLAGS.num_edits, "rows": rows,
            "chosen": chosen}
  print(tradeoff.write(result, FLAGS.output_dir,
                       f"{title}, {FLAGS.num_edits} single edits"))


if __name__ == "__main__":
  app.run(main)
