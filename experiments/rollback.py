r"""Roll back an older weight edit on the default model and measure what is left.

  python -m experiments.rollback --method=rome --num_edits=20 --rollback=4 \
      --output_json=docs/results/rollback_rome_cf20.json

Applies `--num_edits` CounterFact edits one after another to a live model,
recording each prompt's P(target_new) just before its own edit (its pre-edit
score). Then rolls back edit `--rollback` with each of `--modes` (from the same
edited state) and reports its prompt's P(target_new) against the pre-edit
score (in points, 0-100) and how many of the other edits still succeed
(P(new) > P(true)).
"""

import json

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import editors, models
from keditjax.evaluation import cases as cases_lib
from keditjax.stream import live as live_lib, rollback

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit.")
flags.DEFINE_enum("method", "rome", list(editors.METHODS), "Editing method.")
flags.DEFINE_integer("num_edits", 20, "Successive CounterFact edits.")
flags.DEFINE_integer("rollback", 4, "Index of the edit to roll back.")
flags.DEFINE_list("modes", ["subtract", "rebuild"], "Rollback modes to compare.")
flags.DEFINE_string("output_json", "runs/rollback.json", "Results JSON.")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py", "Editor hyper-parameters.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  common.setup()
  if not 0 <= FLAGS.rollback < FLAGS.num_edits:
    raise app.UsageError(f"--rollback={FLAGS.rollback} must index one of {FLAGS.num_edits} edits.")
  model = models.load(FLAGS.model)
  cases = cases_lib.load_cases("counterfact", limit=FLAGS.num_edits)
  editor = editors.get(FLAGS.method, editor_configs.hparams_from(FLAGS.config, FLAGS.method))
  live = live_lib.LiveModel(model, editor, track_manifest=False)
  report = rollback.successive_then_rollback(live, [c.request for c in cases], FLAGS.rollback,
                                             FLAGS.modes)
  out = {"command": f"python -m experiments.rollback --method={FLAGS.method} "
                    f"--num_edits={FLAGS.num_edits} --rollback={FLAGS.rollback} "
                    f"--modes={','.join(FLAGS.modes)}",
         "model": FLAGS.model, **report}
  for mode, r in report["modes"].items():
    print(mode, json.dumps(r["rolled_back_p_new"]), "others held:", r["others_success_held"])
  with open(FLAGS.output_json, "w") as f:
    json.dump(out, f, indent=1)
  print("wrote", FLAGS.output_json)


if __name__ == "__main__":
  app.run(main)
