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
import numpy as np

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import editors, models, progress
from keditjax.evaluation import cases as cases_lib
from keditjax.stream import live as live_lib

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit.")
flags.DEFINE_enum("method", "rome", list(editors.METHODS), "Editing method.")
flags.DEFINE_integer("num_edits", 20, "Successive CounterFact edits.")
flags.DEFINE_integer("rollback", 4, "Index of the edit to roll back.")
flags.DEFINE_list("modes", ["subtract", "rebuild"], "Rollback modes to compare.")
flags.DEFINE_string("output_json", "runs/rollback.json", "Results JSON.")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py", "Editor hyper-parameters.")
FLAGS = flags.FLAGS


def scores(live, snapshot, cases):
  prompts = [c.prompt for c in cases]
  new = live.score(prompts, [c.target_new for c in cases], snapshot=snapshot)
  true = live.score(prompts, [c.target_true for c in cases], snapshot=snapshot)
  return 100 * np.exp(new), new > true


def main(argv):
  del argv
  common.setup()
  if not 0 <= FLAGS.rollback < FLAGS.num_edits:
    raise app.UsageError(f"--rollback={FLAGS.rollback} must index one of {FLAGS.num_edits} edits.")
  model = models.load(FLAGS.model)
  cases = cases_lib.load_cases("counterfact", limit=FLAGS.num_edits)
  editor = editors.get(FLAGS.method, editor_configs.hparams_from(FLAGS.config, FLAGS.method))
  live = live_lib.LiveModel(model, editor, track_manifest=False)
  pre, ids = [], []
  for i in progress.bar(range(len(cases)), desc="edits", unit="edit"):
    pre.append(float(scores(live, live.snapshot(), cases[i:i + 1])[0][0]))
    ids.append(live.edit(cases[i].request)[0].id)
  edited = live.snapshot()
  p_edited, ok_edited = scores(live, edited, cases)
  k = FLAGS.rollback
  others = [i for i in range(len(cases)) if i != k]
  out = {"command": f"python -m experiments.rollback --method={FLAGS.method} "
                    f"--num_edits={FLAGS.num_edits} --rollback={k} --modes={','.join(FLAGS.modes)}",
         "model": FLAGS.model, "pre_edit_p_new": pre, "edited_p_new": p_edited.tolist(),
         "edited_success": ok_edited.tolist(), "rolled_back": k, "modes": {}}
  for mode in FLAGS.modes:
    # Every mode starts from the same edited state.
    trial = live_lib.LiveModel(model, editor, params=model.params, state=live.state,
                               track_manifest=False)
    trial._snapshot, trial._edits, trial._operations = edited, dict(live._edits), list(live._operations)
    trial._checkpoint, trial._previous = live._checkpoint, live._previous
    snap = trial.rollback(ids[k], mode=mode)
    p_after, ok_after = scores(trial, snap, cases)
    held = [i for i in others if ok_edited[i]]
    out["modes"][mode] = {
        "p_new_after": p_after.tolist(), "success_after": ok_after.tolist(),
        "rolled_back_p_new": {"pre_edit": pre[k], "edited": float(p_edited[k]),
                              "after": float(p_after[k]), "gap_points": float(p_after[k] - pre[k])},
        "others_success_held": float(np.mean([ok_after[i] for i in held]) * 100) if held else None,
        "others_succeeding_before": len(held)}
    print(mode, json.dumps(out["modes"][mode]["rolled_back_p_new"]),
          "others held:", out["modes"][mode]["others_success_held"])
  with open(FLAGS.output_json, "w") as f:
    json.dump(out, f, indent=1)
  print("wrote", FLAGS.output_json)


if __name__ == "__main__":
  app.run(main)
